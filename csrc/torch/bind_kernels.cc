#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

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
  m.def("cuda_sm_count", [] { return plait::cuda::smCount(); },
        "Multiprocessors of the current CUDA device (0 without a device or without CUDA support).");
}

}  // namespace plait_torch
