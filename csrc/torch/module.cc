#include <torch/csrc/utils/pybind.h>

namespace py = pybind11;

namespace plait_torch {
void register_backend(py::module_& m);
void register_kernels(py::module_& m);
void register_server(py::module_& m);
}  // namespace plait_torch

PYBIND11_MODULE(_C, m) {
  m.doc() = "plait native core: the torch.distributed backend and CPU/CUDA kernels";
  py::module_::import("torch.distributed");  // registers c10d::Backend / Store with pybind11
  plait_torch::register_backend(m);
  plait_torch::register_kernels(m);
  plait_torch::register_server(m);
}
