// The thin torch layer: c10d::Backend over plait::Comm. Turns tensors into buffers, checks arguments, orders work on
// one progress thread per process group (small collectives run inline when nothing is queued), and completes
// Work futures with the output tensor list.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "plait/comm.h"
#include "torch/cuda_glue.h"

namespace plait_torch {

// torch's c10d::Store as the core's plait::Store (the group's store, the rendezvous root, a server's store).
struct StoreAdapter : plait::Store {
  c10::intrusive_ptr<c10d::Store> s;
  explicit StoreAdapter(c10::intrusive_ptr<c10d::Store> st) : s(std::move(st)) {}
  void set(const std::string& k, const std::string& v) override { s->set(k, std::vector<uint8_t>(v.begin(), v.end())); }
  std::string get(const std::string& k) override {
    auto v = s->get(k);
    return std::string(v.begin(), v.end());
  }
  int64_t add(const std::string& k, int64_t d) override { return s->add(k, d); }
  bool check(const std::string& k) override { return s->check({k}); }
};

class PlaitWork : public c10d::Work {
 public:
  PlaitWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs);
  // The future is made on first request (most synchronous calls never ask), and completes with the outputs.
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  std::vector<at::Tensor> result() override { return outputs_; }
  void complete(std::exception_ptr error);
  // CUDA work: wait() returns once the work is enqueued and makes the caller's current stream wait for it; the
  // future is CUDA-aware.
  void setCuda(std::shared_ptr<CudaCall> call) { cuda_ = std::move(call); }
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  bool isCompleted() override;
  void synchronize() override;
  void blockCurrentStream() override;
  // recv / recvAnysource: the rank the message came from (set before the Work completes).
  int sourceRank() const override;
  void setSourceRank(int src) { srcRank_.store(src, std::memory_order_release); }

 private:
  void markFuture(const c10::intrusive_ptr<c10::ivalue::Future>& f);
  std::vector<at::Tensor> outputs_;
  std::mutex futureMu_;
  std::condition_variable doneCv_;
  bool done_ = false;
  std::exception_ptr error_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  std::shared_ptr<CudaCall> cuda_;
  std::atomic<int> srcRank_{-1};
};

class PlaitBackend : public c10d::Backend {
 public:
  PlaitBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, std::chrono::milliseconds timeout,
               const plait::Options& opts);
  ~PlaitBackend() override;

  const std::string getBackendName() const override { return "plait"; }
  void setTimeout(std::chrono::milliseconds timeout) override;
  // What torch reads back (split_group's default options, ProcessGroup.options): name, timeout, group name.
  c10::intrusive_ptr<c10d::Backend::Options> getBackendOptions() override;

  // Sequence numbers (TORCH_DISTRIBUTED_DEBUG=DETAIL's wrapper, split_group): every rank starts at 0 and counts the
  // collectives it issued on this group, so ranks that issued the same collectives agree.
  void setSequenceNumberForGroup() override;
  uint64_t getSequenceNumberForGroup() override;

  // split: a new plait communicator over `store` for the sorted group ranks `ranks` (nullptr if this rank is not
  // among them); the parent's algorithm/transport settings carry over.
  bool supportsSplitting() const override { return true; }
  c10::intrusive_ptr<c10d::Backend> split(const c10::intrusive_ptr<c10d::Store>& store, const std::vector<int>& ranks,
                                          const c10::intrusive_ptr<c10d::Backend::Options>& opts) override;

  // abort(): fails the group now (peers are told): the collective or transfers in flight raise, queued work completes
  // with the error. shutdown() (destroy_process_group): queued collectives run first; point-to-point transfers still
  // pending after a short grace are aborted. Both join the progress thread; later calls raise.
  void abort() override;
  void shutdown() override;

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts = c10d::BroadcastOptions()) override;
  // all_reduce with this call's compression ("" / "group": the group's setting; "none", "auto" or a codec name).
  // plait.all_reduce's entry point (it bypasses torch's Python wrapper).
  // residual (defined: plait.hooks' error feedback): float32, the tensor's size, receives what this rank's quantization
  // dropped; needs one contiguous float32 tensor, SUM and an explicit codec.
  c10::intrusive_ptr<c10d::Work> allreduceWith(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts,
                                               const std::string& compression, at::Tensor residual = {});
  // The group's compression setting and block.
  const std::string& compression() const { return compression_; }
  uint32_t compressionBlock() const { return compressionBlock_; }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts = c10d::AllreduceOptions()) override;
  // Sparse COO tensors (DDP with sparse gradients): all-gather every rank's coalesced indices and values, add them in
  // rank order, coalesce (gloo's result). CPU all_reduce of a sparse tensor comes here too.
  c10::intrusive_ptr<c10d::Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                  const c10d::AllreduceOptions& opts = c10d::AllreduceOptions()) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors,
      const c10d::AllreduceCoalescedOptions& opts = c10d::AllreduceCoalescedOptions()) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts = c10d::ReduceOptions()) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>& outputLists, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts = c10d::GatherOptions()) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts = c10d::ScatterOptions()) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(
      std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
      const c10d::ReduceScatterOptions& opts = c10d::ReduceScatterOptions()) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input,
      const c10d::ReduceScatterOptions& opts = c10d::ReduceScatterOptions()) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts = c10d::ReduceScatterOptions()) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& outputSplitSizes,
                                               std::vector<int64_t>& inputSplitSizes,
                                               const c10d::AllToAllOptions& opts = c10d::AllToAllOptions()) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts = c10d::AllToAllOptions()) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts = c10d::BarrierOptions()) override;
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks = false) override;

  // Blocks until every queued collective has run.
  void waitForPendingWorks() override;
  plait::Comm& comm() { return *comm_; }

 private:
  using Task = std::function<void()>;
  // Runs fn in issue order. Only a synchronous call (the caller waits at once) or the posting of a point-to-point
  // transfer runs on the caller's thread, when nothing is queued and bytes <= PLAIT_INLINE_BYTES; an async_op
  // collective always goes to the progress thread, so the caller is free to issue other work meanwhile. With `deferred`, fn posts a
  // point-to-point transfer whose completion callback completes the Work later.
  // `sync`: the caller will wait at once (opts.asyncOp false), so it may as well run the collective itself.
  // `timeout`: a per-operation timeout (opts.timeout; kUnsetTimeout: the group's).
  // CUDA tensors (outputs, else inputs, decide the device): fn runs on the communication stream after the caller's
  // (cuda_glue.h), with the communicator in device mode for collectives; PLAIT_DEVICE=emulate puts CPU collectives
  // through the device engine too (tests).
  struct When {
    bool sync;
    std::chrono::milliseconds timeout = c10d::kUnsetTimeout;
    When(bool s) : sync(s) {}  // NOLINT: point-to-point calls pass a plain bool
    When(bool s, std::chrono::milliseconds t) : sync(s), timeout(t) {}
  };
  c10::intrusive_ptr<c10d::Work> submit(c10d::OpType type, std::vector<at::Tensor> outputs, size_t bytes, When when,
                                        Task fn, bool deferred = false, std::vector<at::Tensor> inputs = {});
  c10::intrusive_ptr<c10d::Work> sparseAllreduce(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts);
  // What one all-reduce sends: "none", "auto" or a codec name (checked against op and dtype before anything runs).
  struct Compression {
    std::string mode = "none";
    plait::codec::Spec spec;  // explicit codec
  };
  Compression resolveCompression(const std::string& mode, const at::Tensor& t, bool sumOrAvg, const char* opName) const;
  // Stops the group (abort / shutdown / destructor: `what` is "aborted", "shut down", "destroyed"); `drain`: let
  // queued collectives run first.
  void stop(bool drain, const std::string& what);
  void run(const c10::intrusive_ptr<PlaitWork>& work, const Task& fn, bool deferred);
  // Posts a point-to-point transfer through `post(done)`; the Work completes when `done` runs. Counted in
  // p2pPending_ only while the transfer is really posted (a post that throws leaves nothing pending).
  using AnyDone = plait::Comm::AnyDone;
  void postP2P(const c10::intrusive_ptr<PlaitWork>& work, at::Tensor keep, at::Tensor copyBackTo,
               const std::function<void(AnyDone)>& post);
  void loop();

  plait::Options opts_;
  std::chrono::milliseconds groupTimeout_;
  std::string compression_ = "none";  // the group's setting (Options.compression, else PLAIT_COMPRESSION)
  uint32_t compressionBlock_ = 0;
  std::atomic<uint64_t> seqNum_{0};
  std::unique_ptr<plait::Comm> comm_;
  std::shared_ptr<CudaStreams> streams_ = cudaStreams();
  std::mutex mu_;  // guards queue_, busy_
  std::condition_variable cv_, idleCv_;
  struct Item {
    c10::intrusive_ptr<PlaitWork> work;
    Task fn;
    bool deferred;
  };
  std::deque<Item> queue_;
  std::atomic<int> p2pPending_{0};
  // Every posted transfer not yet completed (stop() fails those the core never reports).
  struct P2PEntry {
    c10::intrusive_ptr<PlaitWork> work;
    std::shared_ptr<std::atomic<bool>> fired;
  };
  std::mutex p2pMu_;
  uint64_t p2pNextId_ = 0;
  std::unordered_map<uint64_t, P2PEntry> p2pLive_;
  void settleP2P(uint64_t id);
  c10::intrusive_ptr<PlaitWork> current_;  // the Work a deferred task is posting
  bool busy_ = false;
  bool taskRunning_ = false;  // a queued or inline task is running (busy_ also covers point-to-point progress)
  bool stop_ = false;
  std::string stopped_;  // why the group no longer takes work ("" while it does); guarded by mu_
  std::thread worker_;
};

}  // namespace plait_torch
