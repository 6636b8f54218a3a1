#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "plait/kernels/reduce.h"
#include "plait/kernels/cuda_info.h"

namespace py = pybind11;

namespace plait_torch {


namespace {
plait::RedOp parseOp(const std::string& s) {
  static const char* names[] = {"sum", "prod", "min", "max", "band", "bor", "bxor"};
  for (int i = 0; i < int(plait::RedOp::kCount); ++i)
    if (s == names[i]) return plait::RedOp(i);
  throw std::invalid_argument("plait.reduce: unknown op '" + s + "' (sum, prod, min, max, band, bor, bxor)");
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
      [](const std::string& op, at::Tensor dst, const at::Tensor& src) {
        TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "plait.reduce: CPU tensors only");
        TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "plait.reduce: contiguous tensors only");
        TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "plait.reduce: dtypes differ");
        TORCH_CHECK(dst.numel() == src.numel(), "plait.reduce: sizes differ");
        plait::reduce(parseOp(op), dtypeOf(dst), dst.data_ptr(), dst.data_ptr(), src.data_ptr(),
                      size_t(dst.numel()));
        return dst;
      },
      py::arg("op"), py::arg("dst"), py::arg("src"),
      "dst = dst (op) src elementwise, in place, with plait's CPU kernels.");
  m.def("kernel_isa", [] { return std::string(plait::kernelIsa()); });
  m.def("cuda_compiled", [] { return plait::cudaCompiled(); });
  m.def("cuda_device_count", [] { return plait::cudaDeviceCount(); });
}

}  // namespace plait_torch
