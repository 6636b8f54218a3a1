#include "torch/cuda_glue.h"

#include <c10/util/Exception.h>

#if PLAIT_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#endif

namespace plait_torch {

#if PLAIT_TORCH_CUDA

struct CudaStreams {
  std::mutex mu;
  std::map<int, c10::cuda::CUDAStream> byDevice;
  c10::cuda::CUDAStream get(c10::DeviceIndex d) {
    std::lock_guard<std::mutex> lk(mu);
    auto it = byDevice.find(d);
    if (it == byDevice.end()) it = byDevice.emplace(d, c10::cuda::getStreamFromPool(/*isHighPriority=*/true, d)).first;
    return it->second;
  }
};

// A CUDA event on one device (created on first record).
class Event {
 public:
  explicit Event(c10::DeviceIndex d) : device_(d) {}
  ~Event() {
    if (e_) {
      c10::cuda::CUDAGuard g(device_);
      cudaEventDestroy(e_);
    }
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(const c10::cuda::CUDAStream& s) {
    c10::cuda::CUDAGuard g(device_);
    if (!e_) C10_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(e_, s.stream()));
  }
  void block(const c10::cuda::CUDAStream& s) const {
    if (!e_) return;
    c10::cuda::CUDAGuard g(device_);
    C10_CUDA_CHECK(cudaStreamWaitEvent(s.stream(), e_, 0));
  }
  bool query() const {
    if (!e_) return true;
    c10::cuda::CUDAGuard g(device_);
    cudaError_t r = cudaEventQuery(e_);
    if (r == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    C10_CUDA_CHECK(r);
    return true;
  }

 private:
  c10::DeviceIndex device_;
  cudaEvent_t e_ = nullptr;
};

struct CudaCall {
  c10::Device device;
  c10::cuda::CUDAStream comm;
  Event ready, done;
  CudaCall(c10::Device d, c10::cuda::CUDAStream s) : device(d), comm(s), ready(d.index()), done(d.index()) {}
};

struct CudaScope::Impl {
  c10::cuda::CUDAGuard device;
  c10::cuda::CUDAStreamGuard stream;
  Impl(CudaCall& c) : device(c.device.index()), stream(c.comm) {}
};

std::shared_ptr<CudaStreams> cudaStreams() { return std::make_shared<CudaStreams>(); }

std::shared_ptr<CudaCall> cudaCapture(CudaStreams& streams, const at::Device& device) {
  auto call = std::make_shared<CudaCall>(device, streams.get(device.index()));
  call->ready.record(c10::cuda::getCurrentCUDAStream(device.index()));
  return call;
}

CudaScope::CudaScope(CudaCall& call, const std::vector<at::Tensor>& used) {
  call.ready.block(call.comm);  // the communication stream waits for the caller's work on its inputs
  impl_ = std::make_unique<Impl>(call);
  for (const auto& t : used)
    if (t.defined() && t.is_cuda() && t.storage().data_ptr().get())
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), call.comm);
}
CudaScope::~CudaScope() = default;
void* CudaScope::stream() const { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }
int CudaScope::device() const { return int(c10::cuda::current_device()); }

void cudaRecordDone(CudaCall& call) { call.done.record(call.comm); }
void cudaBlockCurrentStream(CudaCall& call) {
  call.done.block(c10::cuda::getCurrentCUDAStream(call.device.index()));
}
bool cudaQueryDone(CudaCall& call) { return call.done.query(); }
std::vector<c10::Device> cudaDevices(const CudaCall& call) { return {call.device}; }
void cudaMarkFuture(CudaCall& call, c10::ivalue::Future& f, const c10::IValue& value) {
  c10::cuda::CUDAStreamGuard g(call.comm);
  f.markCompleted(value);
}

#else  // torch without CUDA

namespace {
[[noreturn]] void noCuda() {
  TORCH_CHECK(false, "plait: this build of plait was compiled against a torch without CUDA; rebuild it against a "
                     "CUDA torch (pip install --no-build-isolation -e .) to use CUDA tensors");
}
}  // namespace
struct CudaStreams {};
struct CudaCall {};
struct CudaScope::Impl {};
std::shared_ptr<CudaStreams> cudaStreams() { return std::make_shared<CudaStreams>(); }
std::shared_ptr<CudaCall> cudaCapture(CudaStreams&, const at::Device&) { noCuda(); }
CudaScope::CudaScope(CudaCall&, const std::vector<at::Tensor>&) { noCuda(); }
CudaScope::~CudaScope() = default;
void* CudaScope::stream() const { noCuda(); }
int CudaScope::device() const { noCuda(); }
void cudaRecordDone(CudaCall&) { noCuda(); }
void cudaBlockCurrentStream(CudaCall&) { noCuda(); }
bool cudaQueryDone(CudaCall&) { noCuda(); }
std::vector<c10::Device> cudaDevices(const CudaCall&) { noCuda(); }
void cudaMarkFuture(CudaCall&, c10::ivalue::Future&, const c10::IValue&) { noCuda(); }

#endif

}  // namespace plait_torch
