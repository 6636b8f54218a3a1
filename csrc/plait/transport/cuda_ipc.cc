// The CUDA device (transport/device.h): staging memory from cudaMalloc shared as IPC handles (cudaIpcGetMemHandle /
// cudaIpcOpenMemHandle, which also works between processes that use the same GPU), flag segments in host shared
// memory registered with the device, flags written and waited for by the stream itself (cuStreamWriteValue32 /
// cuStreamWaitValue32, reached through cudaGetDriverEntryPointByVersion so that nothing links libcuda), and the
// kernels of kernels/cuda. Compiled only in the CUDA build.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstring>
#include <thread>
#include <vector>

#include "plait/kernels/cuda_info.h"
#include "plait/transport/device.h"

namespace plait {

namespace {

using WriteValue32 = CUresult(CUDAAPI*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WaitValue32 = CUresult(CUDAAPI*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error(cat("plait: CUDA ", what, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
  }
}
void checkRc(int rc, const char* what) { check(cudaError_t(rc), what); }

class CudaDeviceOps : public DeviceOps {
 public:
  CudaDeviceOps(WriteValue32 w, WaitValue32 wt) : write_(w), wait_(wt) {}
  ~CudaDeviceOps() override {
    if (down_ || up_) {
      cudaStreamSynchronize(down_);
      cudaStreamSynchronize(up_);
      cudaStreamDestroy(down_);
      cudaStreamDestroy(up_);
    }
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    if (fenceEv_) cudaEventDestroy(fenceEv_);
    if (forkEv_) cudaEventDestroy(forkEv_);
    if (joinEv_[0]) cudaEventDestroy(joinEv_[0]);
    if (joinEv_[1]) cudaEventDestroy(joinEv_[1]);
  }
  const char* name() const override { return "cuda"; }
  void bind(int device, void* stream) override {
    device_ = device;
    stream_ = static_cast<cudaStream_t>(stream);
    check(cudaSetDevice(device_), "cudaSetDevice");
  }

  void* alloc(size_t bytes) override {
    void* p = nullptr;
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaMalloc(&p, bytes), "cudaMalloc of the staging buffer");
    check(cudaMemset(p, 0, bytes), "cudaMemset");
    return p;
  }
  void release(void* p) override { cudaFree(p); }
  std::string exportMem(void* p) override {
    cudaIpcMemHandle_t h;
    check(cudaIpcGetMemHandle(&h, p), "cudaIpcGetMemHandle");
    return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
  }
  void* importMem(const std::string& bytes) override {
    PLAIT_CHECK(bytes.size() == sizeof(cudaIpcMemHandle_t), "plait: malformed CUDA IPC handle (", bytes.size(),
                " bytes)");
    cudaIpcMemHandle_t h;
    std::memcpy(&h, bytes.data(), sizeof(h));
    void* p = nullptr;
    check(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
    return p;
  }
  void closeImported(void* p) override { cudaIpcCloseMemHandle(p); }
  void* allocHost(size_t bytes) override {
    void* p = nullptr;
    check(cudaHostAlloc(&p, bytes, cudaHostAllocDefault), "cudaHostAlloc of the host staging buffer");
    return p;
  }
  void releaseHost(void* p) override { cudaFreeHost(p); }
  void* mapHost(void* p, size_t bytes) override {
    check(cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable),
          "cudaHostRegister of the flag segment");
    void* d = nullptr;
    check(cudaHostGetDevicePointer(&d, p, 0), "cudaHostGetDevicePointer");
    return d;
  }
  void unmapHost(void* p) override { cudaHostUnregister(p); }

  void copy(void* dst, const void* src, size_t bytes) override {
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
  }
  void reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t count) override {
    checkRc(cuda::reduce(op, dt, dst, a, b, count, stream_), "reduce kernel launch");
  }
  void pull(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
            PullKey key, uint32_t* err, uint32_t errCode) override {
    checkRc(cuda::pullKeyed(withReduce, op, dt, dst, peerBase, desc, bytes, key, err, errCode, stream_),
            "pull kernel launch");
  }
  void write32(uint32_t* addr, uint32_t v) override {
    // The default flags put a fence before the write: the peer sees every write enqueued before it.
    CUresult r = write_(reinterpret_cast<CUstream>(stream_), reinterpret_cast<CUdeviceptr>(addr), v,
                        CU_STREAM_WRITE_VALUE_DEFAULT);
    PLAIT_CHECK(r == CUDA_SUCCESS, "plait: cuStreamWriteValue32 failed (CUresult ", int(r), ")");
  }
  void waitGeq(const uint32_t* addr, uint32_t v, const std::function<std::string()>& what) override {
    CUresult r = wait_(reinterpret_cast<CUstream>(stream_), reinterpret_cast<CUdeviceptr>(addr), v,
                       CU_STREAM_WAIT_VALUE_GEQ);
    PLAIT_CHECK(r == CUDA_SUCCESS, what(), ": cuStreamWaitValue32 failed (CUresult ", int(r), ")");
  }
  void synchronize() override {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (down_) {
      check(cudaStreamSynchronize(down_), "cudaStreamSynchronize (host path downloads)");
      check(cudaStreamSynchronize(up_), "cudaStreamSynchronize (host path uploads)");
    }
  }

  // ---- the host path: two copy streams and events, created on first use ----
  void fork() override {
    streams();
    check(cudaEventRecord(forkEv_, stream_), "cudaEventRecord (host path fork)");
    check(cudaStreamWaitEvent(down_, forkEv_, 0), "cudaStreamWaitEvent (host path fork)");
    check(cudaStreamWaitEvent(up_, forkEv_, 0), "cudaStreamWaitEvent (host path fork)");
    fence();
  }
  void fence() override {
    streams();
    check(cudaEventRecord(fenceEv_, up_), "cudaEventRecord (host path fence)");
    check(cudaStreamWaitEvent(down_, fenceEv_, 0), "cudaStreamWaitEvent (host path fence)");
  }
  uint64_t download(void* dst, const void* src, size_t bytes) override {
    streams();
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, down_), "cudaMemcpyAsync (host path download)");
    const uint64_t t = ++tickets_;
    cudaEvent_t& e = events_[t % events_.size()];
    if (!e) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventRecord(e, down_), "cudaEventRecord (host path download)");
    return t;
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    streams();
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, up_), "cudaMemcpyAsync (host path upload)");
  }
  void waitDownload(uint64_t t) override {
    if (t == 0) return;
    // Tickets older than the ring of events are long done (a window never has that many chunks in flight).
    PLAIT_CHECK(tickets_ - t < events_.size(), "plait: internal: host path download ticket too old");
    waitEvent(events_[t % events_.size()]);
  }
  void waitUploads() override {
    if (!up_) return;
    check(cudaEventRecord(fenceEv_, up_), "cudaEventRecord (host path uploads)");
    waitEvent(fenceEv_, "the host path's uploads");
  }
  void waitIdle() override {
    streams();
    check(cudaEventRecord(joinEv_[0], stream_), "cudaEventRecord (wait idle)");
    waitEvent(joinEv_[0], "the communication stream");
    check(cudaEventRecord(joinEv_[0], down_), "cudaEventRecord (wait idle)");
    waitEvent(joinEv_[0], "the host path's downloads");
    waitUploads();
  }
  void abandon(bool drain) noexcept override {
    if (!down_) return;
    try {
      join();
    } catch (...) {
    }
    if (drain) {
      cudaStreamSynchronize(down_);
      cudaStreamSynchronize(up_);
      cudaGetLastError();
    }
  }
  void setWaitTimeout(std::chrono::milliseconds t) override { waitTimeout_ = t; }
  // The host polls (a blocking synchronize would neither notice a failed peer nor give up).
  void waitEvent(cudaEvent_t e, const char* what = "a host path download") {
    const auto deadline = Clock::now() + waitTimeout_;
    for (int i = 0;; ++i) {
      cudaError_t r = cudaEventQuery(e);
      if (r == cudaSuccess) return;
      if (r != cudaErrorNotReady) check(r, "cudaEventQuery (host path)");
      if (poll_ && i % 64 == 63) poll_();  // a peer that failed (or an abort) makes the wait give up
      if (Clock::now() >= deadline)
        throw Error(cat("plait: CUDA: ", what, " did not finish within ", waitTimeout_.count(), " ms"));
      std::this_thread::sleep_for(std::chrono::microseconds(i < 100 ? 5 : 50));
    }
  }
  void join() override {
    if (!down_) return;
    check(cudaEventRecord(joinEv_[0], down_), "cudaEventRecord (host path join)");
    check(cudaEventRecord(joinEv_[1], up_), "cudaEventRecord (host path join)");
    check(cudaStreamWaitEvent(stream_, joinEv_[0], 0), "cudaStreamWaitEvent (host path join)");
    check(cudaStreamWaitEvent(stream_, joinEv_[1], 0), "cudaStreamWaitEvent (host path join)");
  }
  void pin(void* p, size_t bytes) override {
    check(cudaHostRegister(p, bytes, cudaHostRegisterPortable), "cudaHostRegister of the host path's staging");
  }
  void unpin(void* p) override { cudaHostUnregister(p); }

 private:
  void streams() {
    if (down_) return;
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&down_, cudaStreamNonBlocking), "cudaStreamCreate (host path downloads)");
    check(cudaStreamCreateWithFlags(&up_, cudaStreamNonBlocking), "cudaStreamCreate (host path uploads)");
    for (cudaEvent_t* e : {&forkEv_, &fenceEv_, &joinEv_[0], &joinEv_[1]})
      check(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate");
    events_.assign(1024, nullptr);
  }
  cudaStream_t down_ = nullptr, up_ = nullptr;
  cudaEvent_t forkEv_ = nullptr, fenceEv_ = nullptr, joinEv_[2] = {nullptr, nullptr};
  std::vector<cudaEvent_t> events_;
  uint64_t tickets_ = 0;
  std::chrono::milliseconds waitTimeout_{std::chrono::minutes(30)};

  WriteValue32 write_;
  WaitValue32 wait_;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
};

template <typename Fn>
Fn entryPoint(const char* sym, std::string* why) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  cudaError_t e = cudaGetDriverEntryPointByVersion(sym, &fn, 12000, cudaEnableDefault, &q);
  if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !fn) {
    cudaGetLastError();
    *why = cat("the driver has no ", sym, " (", cudaGetErrorName(e), ")");
    return nullptr;
  }
  return reinterpret_cast<Fn>(fn);
}

}  // namespace

std::unique_ptr<DeviceOps> makeCudaDeviceOps(std::string* why) {
  if (cudaDeviceCount() == 0) {
    *why = "no CUDA device or driver in this process";
    return nullptr;
  }
  auto w = entryPoint<WriteValue32>("cuStreamWriteValue32", why);
  auto wt = entryPoint<WaitValue32>("cuStreamWaitValue32", why);
  if (!w || !wt) return nullptr;
  return std::make_unique<CudaDeviceOps>(w, wt);
}

}  // namespace plait
