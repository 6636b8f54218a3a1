#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "plait/kernels/codec.h"
#include "plait/kernels/reduce.h"
#include "plait/kernels/cuda/kernels.h"
#include "plait/kernels/cuda_info.h"

namespace py = pybind11;

namespace plait_torch {


namespace {
plait::RedOp parseOp(const std::string& s, const char* who = "plait.reduce") {
  static const char* names[] = {"sum", "prod", "min", "max", "band", "bor", "bxor"};
  for (int i = 0; i < int(plait::RedOp::kCount); ++i)
    if (s == names[i]) return plait::RedOp(i);
  throw std::invalid_argument(std::string(who) + ": unknown op '" + s + "' (sum, prod, min, max, band, bor, bxor)");
}
// dtype names of the raw-pointer CUDA entry points, in plait::DType order (torch's names without "torch.").
plait::DType parseDtype(const std::string& s, const char* who) {
  static const char* names[] = {"float32", "float64", "float16", "bfloat16", "int8",
                                "uint8",   "int32",   "int64",   "bool"};
  for (int i = 0; i < int(plait::DType::kCount); ++i)
    if (s == names[i]) return plait::DType(i);
  throw std::invalid_argument(std::string(who) + ": unknown dtype '" + s +
                              "' (float32, float64, float16, bfloat16, int8, uint8, int32, int64, bool)");
}
// The cudaError_t names a caller is likely to meet (this file sees no CUDA header).
const char* cudaErrorName(int code) {
  switch (code) {
    case 1: return "cudaErrorInvalidValue";
    case 2: return "cudaErrorMemoryAllocation";
    case 3: return "cudaErrorInitializationError";
    case 35: return "cudaErrorInsufficientDriver";
    case 36: return "cudaErrorCallRequiresNewerDriver";
    case 98: return "cudaErrorInvalidDeviceFunction";
    case 100: return "cudaErrorNoDevice";
    case 101: return "cudaErrorInvalidDevice";
    case 209: return "cudaErrorNoKernelImageForDevice";
    case 222: return "cudaErrorUnsupportedPtxVersion";
    case 400: return "cudaErrorInvalidResourceHandle";
    case 700: return "cudaErrorIllegalAddress";
    case 701: return "cudaErrorLaunchOutOfResources";
    case 716: return "cudaErrorMisalignedAddress";
    case 719: return "cudaErrorLaunchFailure";
    default: return "see cudaGetErrorName";
  }
}
void checkCuda(int rc, const char* who, const std::string& what) {
  if (rc == 0) return;
  std::string hint = plait::cudaCompiled() ? "" : "; plait was built without CUDA (nvcc not found at build time)";
  throw std::runtime_error(std::string(who) + ": CUDA error " + std::to_string(rc) + " (" + cudaErrorName(rc) +
                           ") enqueuing " + what + hint);
}
template <typename P>
P* ptr(uint64_t v) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(v));
}
plait::DType dtypeOf(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return plait::DType::kFloat32;
    case at::kDouble: return plait::DType::kFloat64;
    case at::kHalf: return plait::DType::kFloat16;
    case at::kBFloat16: return plait::DType::kBFloat16;
    case at::kChar: return plait::DType::kInt8;
    case at::kByte: return plait::DType::kUInt8;
    case at::kInt: return plait::DType::kInt32;
    case at::kLong: return plait::DType::kInt64;
    case at::kBool: return plait::DType::kBool;
    default: throw std::invalid_argument("plait.reduce: unsupported dtype");
  }
}

// ---- codecs ----
namespace codec = plait::codec;

codec::Spec codecSpec(const std::string& name, int64_t block, const char* who) {
  TORCH_CHECK(block >= 0 && block <= int64_t(UINT32_MAX), who, ": block must be 0 (the default) or a positive block "
              "size, got ", block);
  const codec::Spec spec = codec::makeSpec(codec::parseCodec(name), uint32_t(block));
  TORCH_CHECK(spec.codec != codec::Codec::kNone, who, ": codec none has no wire format (int8, int4, fp8 or bf16)");
  return spec;
}
// The codec value type of a dtype (float32, bfloat16, float16), else a clear error naming it.
plait::DType codecDtype(at::ScalarType t, const char* who, const char* what) {
  switch (t) {
    case at::kFloat: return plait::DType::kFloat32;
    case at::kBFloat16: return plait::DType::kBFloat16;
    case at::kHalf: return plait::DType::kFloat16;
    default:
      throw std::invalid_argument(std::string(who) + ": " + what + " dtype " +
                                  std::string(c10::getDtypeNames(t).first) +
                                  " is not supported (float32, bfloat16 or float16)");
  }
}
void checkCpuContiguous(const at::Tensor& t, const char* who, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), who, ": ", what, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), who, ": ", what, " must be contiguous");
}
// The encoded buffer of n values: a contiguous CPU uint8 tensor holding at least encodedBytes(spec, n) bytes.
void checkEncoded(const at::Tensor& enc, const codec::Spec& spec, size_t n, const char* who) {
  checkCpuContiguous(enc, who, "enc");
  TORCH_CHECK(enc.scalar_type() == at::kByte, who, ": enc must be uint8, got ", enc.scalar_type());
  const size_t need = codec::encodedBytes(spec, n);
  TORCH_CHECK(size_t(enc.numel()) >= need, who, ": enc holds ", enc.numel(), " bytes, ", codec::codecName(spec.codec),
              " block ", spec.block, " needs ", need, " for ", n, " values");
}
}  // namespace

void register_kernels(py::module_& m) {
  m.def(
      "reduce",
      [](const std::string& op, at::Tensor dst, const at::Tensor& src, int threads) {
        TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "plait.reduce: CPU tensors only");
        TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "plait.reduce: contiguous tensors only");
        TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "plait.reduce: dtypes differ");
        TORCH_CHECK(dst.numel() == src.numel(), "plait.reduce: sizes differ");
        TORCH_CHECK(threads >= 1, "plait.reduce: threads must be >= 1, got ", threads);
        plait::reduce(parseOp(op), dtypeOf(dst), dst.data_ptr(), dst.data_ptr(), src.data_ptr(),
                      size_t(dst.numel()), threads);
        return dst;
      },
      py::arg("op"), py::arg("dst"), py::arg("src"), py::arg("threads") = 1,
      "dst = dst (op) src elementwise, in place, with plait's CPU kernels; buffers of 1 MiB and more are split "
      "across up to `threads` threads (the calling thread and helper threads), as collectives do.");
  m.def("kernel_isa", [] { return std::string(plait::kernelIsa()); });

  // Block-quantization codecs (wire format: csrc/plait/kernels/codec.h). block 0 is the codec's default.
  m.def(
      "codec_encoded_bytes",
      [](const std::string& name, int64_t block, int64_t n) {
        const char* who = "plait.codec_encoded_bytes";
        TORCH_CHECK(n >= 0, who, ": n must be >= 0, got ", n);
        return codec::encodedBytes(codecSpec(name, block, who), size_t(n));
      },
      py::arg("codec"), py::arg("block"), py::arg("n"), "Wire bytes of n values encoded with codec and block.");
  m.def(
      "codec_encode",
      [](const std::string& name, int64_t block, const at::Tensor& src, double div, std::optional<at::Tensor> into) {
        const char* who = "plait.codec_encode";
        const codec::Spec spec = codecSpec(name, block, who);
        checkCpuContiguous(src, who, "src");
        const plait::DType dt = codecDtype(src.scalar_type(), who, "src");
        const size_t n = size_t(src.numel());
        const int64_t bytes = int64_t(codec::encodedBytes(spec, n));
        at::Tensor out;
        if (into) {
          out = *into;
          checkCpuContiguous(out, who, "out");
          TORCH_CHECK(out.scalar_type() == at::kByte && out.numel() == bytes, who, ": out must be a uint8 tensor of ",
                      bytes, " bytes (", codec::codecName(spec.codec), " block ", spec.block, ", ", n,
                      " values), got ", out.scalar_type(), " with ", out.numel());
        } else {
          out = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
        }
        const void* s = src.data_ptr();
        void* d = out.data_ptr();
        {
          py::gil_scoped_release nogil;
          codec::encode(spec, dt, s, n, float(div), d);
        }
        return out;
      },
      py::arg("codec"), py::arg("block"), py::arg("src"), py::arg("div") = 1.0, py::arg("out") = py::none(),
      "Encodes the values of a contiguous CPU float32 / bfloat16 / float16 tensor (each first divided by div unless "
      "div == 1) into a 1-D uint8 tensor of codec_encoded_bytes(codec, block, src.numel()) bytes: `out` when given "
      "(contiguous, exactly that size; benchmarks reuse it), else a new tensor. Returns it.");
  m.def(
      "codec_decode",
      [](const std::string& name, int64_t block, const at::Tensor& enc, int64_t n, at::ScalarType dtype,
         std::optional<at::Tensor> into) {
        const char* who = "plait.codec_decode";
        const codec::Spec spec = codecSpec(name, block, who);
        TORCH_CHECK(n >= 0, who, ": n must be >= 0, got ", n);
        checkEncoded(enc, spec, size_t(n), who);
        const plait::DType dt = codecDtype(dtype, who, "output");
        at::Tensor out;
        if (into) {
          out = *into;
          checkCpuContiguous(out, who, "out");
          TORCH_CHECK(out.scalar_type() == dtype && out.numel() == n, who, ": out must hold ", n, " values of ",
                      dtype, ", got ", out.numel(), " of ", out.scalar_type());
        } else {
          out = at::empty({n}, at::TensorOptions().dtype(dtype));
        }
        const void* s = enc.data_ptr();
        void* d = out.data_ptr();
        {
          py::gil_scoped_release nogil;
          codec::decode(spec, s, size_t(n), dt, d);
        }
        return out;
      },
      py::arg("codec"), py::arg("block"), py::arg("enc"), py::arg("n"), py::arg("dtype"), py::arg("out") = py::none(),
      "Decodes n values from the uint8 tensor enc into a 1-D tensor of dtype (float32, bfloat16 or float16; each "
      "decoded float32 value rounded to nearest even once): `out` when given (contiguous, n values of dtype), else a "
      "new tensor. Returns it.");
  m.def(
      "codec_decode_accumulate",
      [](const std::string& name, int64_t block, const at::Tensor& enc, at::Tensor acc) {
        const char* who = "plait.codec_decode_accumulate";
        const codec::Spec spec = codecSpec(name, block, who);
        checkCpuContiguous(acc, who, "acc");
        TORCH_CHECK(acc.scalar_type() == at::kFloat, who, ": acc must be float32, got ", acc.scalar_type());
        const size_t n = size_t(acc.numel());
        checkEncoded(enc, spec, n, who);
        const void* s = enc.data_ptr();
        float* a = acc.data_ptr<float>();
        {
          py::gil_scoped_release nogil;
          codec::decodeAccumulate(spec, s, n, a);
        }
      },
      py::arg("codec"), py::arg("block"), py::arg("enc"), py::arg("acc"),
      "acc += decoded values of enc (acc.numel() of them), in float32, in place.");
  m.def("codec_isa", [] { return std::string(codec::codecIsa()); },
        "Which CPU codec kernels this process runs: avx2 or scalar (PLAIT_KERNELS=scalar forces scalar).");
  m.def("cuda_compiled", [] { return plait::cudaCompiled(); });
  m.def("cuda_device_count", [] { return plait::cudaDeviceCount(); });

  // Raw-pointer CUDA kernels (device addresses and a cudaStream_t as ints: tensor.data_ptr(),
  // torch.cuda.current_stream().cuda_stream); the binding needs no torch CUDA support. Work is enqueued on `stream`
  // and not waited for.
  m.def(
      "cuda_reduce",
      [](const std::string& op, const std::string& dtype, uint64_t dst, uint64_t a, uint64_t b, uint64_t n,
         uint64_t stream) {
        const char* who = "plait.cuda_reduce";
        plait::RedOp o = parseOp(op, who);
        plait::DType t = parseDtype(dtype, who);
        int rc = plait::cuda::reduce(o, t, ptr<void>(dst), ptr<const void>(a), ptr<const void>(b), size_t(n),
                                     ptr<void>(stream));
        checkCuda(rc, who, "op=" + op + " dtype=" + dtype + " n=" + std::to_string(n));
      },
      py::arg("op"), py::arg("dtype"), py::arg("dst_ptr"), py::arg("a_ptr"), py::arg("b_ptr"), py::arg("n"),
      py::arg("stream") = 0, "dst[i] = a[i] (op) b[i] for i < n on the GPU (dst may alias a or b exactly).");
  m.def(
      "cuda_copy",
      [](uint64_t dst, uint64_t src, uint64_t nbytes, uint64_t stream) {
        int rc = plait::cuda::copy(ptr<void>(dst), ptr<const void>(src), size_t(nbytes), ptr<void>(stream));
        checkCuda(rc, "plait.cuda_copy", "nbytes=" + std::to_string(nbytes));
      },
      py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("nbytes"), py::arg("stream") = 0,
      "dst[0, nbytes) = src[0, nbytes) on the GPU.");
  m.def(
      "cuda_pull",
      [](bool withReduce, const std::string& op, const std::string& dtype, uint64_t dst, uint64_t peerBase,
         uint64_t desc, uint64_t nbytes, uint64_t err, uint32_t errCode, uint64_t stream) {
        const char* who = "plait.cuda_pull";
        plait::RedOp o = parseOp(op, who);
        plait::DType t = parseDtype(dtype, who);
        int rc = plait::cuda::pull(withReduce, o, t, ptr<void>(dst), ptr<const char>(peerBase),
                                   ptr<const plait::cuda::PullDesc>(desc), size_t(nbytes), ptr<uint32_t>(err),
                                   errCode, ptr<void>(stream));
        checkCuda(rc, who,
                  std::string(withReduce ? "reduce op=" + op : "copy") + " dtype=" + dtype +
                      " nbytes=" + std::to_string(nbytes));
      },
      py::arg("with_reduce"), py::arg("op"), py::arg("dtype"), py::arg("dst_ptr"), py::arg("peer_base_ptr"),
      py::arg("desc_ptr"), py::arg("nbytes"), py::arg("err_ptr"), py::arg("err_code"), py::arg("stream") = 0,
      "Fused receive: src = peer_base + desc.offset (desc = two uint32 {offset, bytes} read on the device); "
      "dst = src, or dst = dst (op) src with with_reduce. If desc.bytes != nbytes nothing is written and *err_ptr, "
      "if 0, becomes err_code.");
  // Raw-pointer CUDA codec kernels (cuda/kernels.h): same bytes and decoded bits as codec_encode / codec_decode /
  // codec_decode_accumulate on the CPU.
  m.def(
      "cuda_codec_encode",
      [](const std::string& name, int64_t block, const std::string& dtype, uint64_t src, uint64_t n, double div,
         uint64_t dst, uint64_t stream) {
        const char* who = "plait.cuda_codec_encode";
        const codec::Spec spec = codecSpec(name, block, who);
        plait::DType t = parseDtype(dtype, who);
        TORCH_CHECK(codec::codecSupports(t), who, ": dtype ", dtype,
                    " is not supported (float32, bfloat16 or float16)");
        int rc = plait::cuda::codecEncode(uint8_t(spec.codec), spec.block, t, ptr<const void>(src), size_t(n),
                                          float(div), ptr<void>(dst), ptr<void>(stream));
        checkCuda(rc, who, "codec=" + name + " block=" + std::to_string(spec.block) + " dtype=" + dtype +
                               " n=" + std::to_string(n));
      },
      py::arg("codec"), py::arg("block"), py::arg("dtype"), py::arg("src_ptr"), py::arg("n"), py::arg("div"),
      py::arg("dst_ptr"), py::arg("stream") = 0,
      "Encodes n values at src_ptr (dtype float32/bfloat16/float16, divided by div unless 1) into "
      "codec_encoded_bytes(codec, block, n) bytes at dst_ptr, on the GPU.");
  m.def(
      "cuda_codec_decode",
      [](const std::string& name, int64_t block, uint64_t src, uint64_t n, const std::string& dtype, uint64_t dst,
         uint64_t stream) {
        const char* who = "plait.cuda_codec_decode";
        const codec::Spec spec = codecSpec(name, block, who);
        plait::DType t = parseDtype(dtype, who);
        TORCH_CHECK(codec::codecSupports(t), who, ": dtype ", dtype,
                    " is not supported (float32, bfloat16 or float16)");
        int rc = plait::cuda::codecDecode(uint8_t(spec.codec), spec.block, ptr<const void>(src), size_t(n), t,
                                          ptr<void>(dst), ptr<void>(stream));
        checkCuda(rc, who, "codec=" + name + " block=" + std::to_string(spec.block) + " dtype=" + dtype +
                               " n=" + std::to_string(n));
      },
      py::arg("codec"), py::arg("block"), py::arg("src_ptr"), py::arg("n"), py::arg("dtype"), py::arg("dst_ptr"),
      py::arg("stream") = 0, "Decodes n values at src_ptr into dtype values at dst_ptr, on the GPU.");
  m.def(
      "cuda_codec_decode_accumulate",
      [](const std::string& name, int64_t block, uint64_t src, uint64_t n, uint64_t acc, uint64_t stream) {
        const char* who = "plait.cuda_codec_decode_accumulate";
        const codec::Spec spec = codecSpec(name, block, who);
        int rc = plait::cuda::codecDecodeAccumulate(uint8_t(spec.codec), spec.block, ptr<const void>(src), size_t(n),
                                                    ptr<float>(acc), ptr<void>(stream));
        checkCuda(rc, who, "codec=" + name + " block=" + std::to_string(spec.block) + " n=" + std::to_string(n));
      },
      py::arg("codec"), py::arg("block"), py::arg("src_ptr"), py::arg("n"), py::arg("acc_ptr"), py::arg("stream") = 0,
      "acc[i] += decoded value i (float32) for i < n, on the GPU.");
  m.def("cuda_sm_count", [] { return plait::cuda::smCount(); },
        "Multiprocessors of the current CUDA device (0 without a device or without CUDA support).");
}

}  // namespace plait_torch
