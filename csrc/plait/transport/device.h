// Device memory and the operations the device engine (plait/device.h) enqueues on one stream, in order. A
// DeviceOps moves bytes and flags; it knows nothing of ranks or schedules.
//
// Two implementations:
//   - CUDA (transport/cuda_ipc.cc): memory from cudaMalloc shared with local peers as IPC handles, flags in host
//     shared memory registered with the device and driven by stream memory operations (cuStreamWriteValue32 /
//     cuStreamWaitValue32), kernels from kernels/cuda. Nothing here makes the host wait for the device or a peer.
//   - Emulated (transport/device_emu.cc, PLAIT_DEVICE=emulate, tests on machines with no GPU): "device" memory is
//     host shared memory and every operation runs at once on the calling thread, which is one valid execution of
//     the stream's order; a wait on a flag spins with a deadline. It runs the device engine's protocol (descriptors,
//     ready / ack flags, write-after-read waits, staging) on CPU tensors, so CI tests it without a GPU.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "plait/common.h"
#include "plait/kernels/cuda/kernels.h"

namespace plait {

using cuda::PullDesc;
using cuda::PullKey;

class DeviceOps {
 public:
  virtual ~DeviceOps() = default;
  virtual const char* name() const = 0;
  // The device and stream the following calls use (a cudaStream_t as void*; ignored by the emulation).
  virtual void bind(int device, void* stream) = 0;

  // ---- memory local peers can read ----
  virtual void* alloc(size_t bytes) = 0;  // zero-filled
  virtual void release(void* p) = 0;
  virtual std::string exportMem(void* p) = 0;               // opaque bytes, sent through the store
  virtual void* importMem(const std::string& handle) = 0;  // a peer's export, mapped here
  virtual void closeImported(void* p) = 0;
  // Page-locked host memory for staging device buffers through the host (groups that span hosts).
  virtual void* allocHost(size_t bytes) = 0;
  virtual void releaseHost(void* p) = 0;
  // Host memory (the flag segments, in shared memory) made addressable by the device; returns its device address.
  virtual void* mapHost(void* p, size_t bytes) = 0;
  virtual void unmapHost(void* p) = 0;

  // ---- stream-ordered ----
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // device or page-locked host memory, either way
  virtual void reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t count) = 0;
  // See cuda::pullKeyed: reads *desc when it runs, dst (op)= peerBase + desc->offset, or flags *err (with what it
  // saw after it) when the length or the key disagrees.
  virtual void pull(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc,
                    size_t bytes, PullKey key, uint32_t* err, uint32_t errCode) = 0;
  // *addr = v once everything enqueued before has finished and its writes are visible (a fence, then the write).
  virtual void write32(uint32_t* addr, uint32_t v) = 0;
  // Everything enqueued after waits until (int32_t)(*addr - v) >= 0. `what` names the peer and flag for errors.
  virtual void waitGeq(const uint32_t* addr, uint32_t v, const std::function<std::string()>& what) = 0;
  // The host waits for everything enqueued so far (used only when staging memory is replaced).
  virtual void synchronize() = 0;
  // ---- the host path's copies (a DeviceOps that stages device buffers through page-locked host memory) ----
  // Downloads (device -> host) and uploads (host -> device) run on two copy streams beside the bound stream, so both
  // directions of the link move at once and neither waits behind the bound stream's own work. fork(): both copy
  // streams wait for everything enqueued on the bound stream so far, and downloads for every upload enqueued so far
  // (the staging memory they write may still be read by an upload). fence(): only the latter (a new window of the
  // staging buffer). download() returns a ticket that waitDownload() makes the host wait for (the poll callback runs
  // meanwhile). join(): the bound stream waits for every download and upload enqueued so far; the host does not.
  // The defaults run each copy at once (the emulation without a modelled link).
  virtual void fork() {}
  virtual void fence() {}
  virtual uint64_t download(void* dst, const void* src, size_t bytes) {
    copy(dst, src, bytes);
    return 0;
  }
  virtual void upload(void* dst, const void* src, size_t bytes) { copy(dst, src, bytes); }
  virtual void waitDownload(uint64_t /*ticket*/) {}
  // The host waits for every upload enqueued so far (before it writes staging memory that an upload may still read).
  virtual void waitUploads() {}
  // The host waits for everything enqueued so far on the bound stream and the copy streams, polling (the poll
  // callback runs) and giving up after the wait timeout.
  virtual void waitIdle() { synchronize(); }
  // After a failure: no queued copy may touch memory once this returns (the emulation drops the copies not yet
  // started and waits for the running one; CUDA makes the bound stream wait for the copy streams and, with `drain`,
  // the host too). Never throws.
  virtual void abandon(bool /*drain*/) noexcept {}
  // How long the host waits above may take before they throw (the group's timeout).
  virtual void setWaitTimeout(std::chrono::milliseconds) {}
  virtual void join() {}
  // Host memory allocated elsewhere (the host path's shared staging) made page-locked once, for fast copies.
  virtual void pin(void* /*p*/, size_t /*bytes*/) {}
  virtual void unpin(void* /*p*/) {}

  // Called now and then while the host itself waits (only the emulation does): throws to give up, e.g. when a peer
  // failed.
  void setPoll(std::function<void()> poll) { poll_ = std::move(poll); }

 protected:
  std::function<void()> poll_;
};

// CUDA: nullptr when the CUDA build is off or no device is usable here (the reason in *why).
std::unique_ptr<DeviceOps> makeCudaDeviceOps(std::string* why);
// The emulation; waits give up after `timeout`. `pcieGBps` > 0 (PLAIT_EMU_PCIE_GBPS) models a GPU's link for the
// host path: downloads and uploads then run on two threads of their own (the copy engines), each taking at least
// bytes / pcieGBps; 0 runs them at once on the calling thread. `pinWith` (optional): memory this emulation allocates
// is pinned (DeviceOps::pin) with it, e.g. the host path's shared staging with the CUDA device.
std::unique_ptr<DeviceOps> makeEmulatedDeviceOps(std::chrono::milliseconds timeout, double pcieGBps = 0,
                                                 DeviceOps* pinWith = nullptr);

}  // namespace plait
