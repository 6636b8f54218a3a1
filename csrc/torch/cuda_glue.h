// Stream semantics of CUDA collectives, as NCCL's (the only file of the binding that touches torch's CUDA API):
//   - at the call, an event is recorded on the caller's current stream (cudaCapture);
//   - the work runs on a communication stream that first waits for that event (CudaScope, which also makes the
//     communication stream current, so the binding's own tensor ops and the core's enqueued work share it, and
//     tells the caching allocator the tensors are used there: record_stream);
//   - when it is enqueued, a "done" event is recorded on the communication stream (cudaRecordDone);
//   - Work.wait() makes the caller's current stream wait for "done" without blocking the host
//     (cudaBlockCurrentStream); futures are CUDA-aware (their callbacks wait on the same stream position).
// Built against a torch without CUDA, every function throws: no CUDA tensor can reach them there.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <vector>

namespace plait_torch {

struct CudaStreams;  // the communication stream per device, one set per process group
struct CudaCall;     // one collective: the caller's event, the communication stream, the done event

std::shared_ptr<CudaStreams> cudaStreams();
std::shared_ptr<CudaCall> cudaCapture(CudaStreams& streams, const at::Device& device);

class CudaScope {
 public:
  CudaScope(CudaCall& call, const std::vector<at::Tensor>& used);
  ~CudaScope();
  void* stream() const;  // the communication stream (a cudaStream_t)
  int device() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

void cudaRecordDone(CudaCall& call);
void cudaBlockCurrentStream(CudaCall& call);
bool cudaQueryDone(CudaCall& call);
std::vector<c10::Device> cudaDevices(const CudaCall& call);
// Marks f completed with `value` as of the communication stream's current position.
void cudaMarkFuture(CudaCall& call, c10::ivalue::Future& f, const c10::IValue& value);

}  // namespace plait_torch
