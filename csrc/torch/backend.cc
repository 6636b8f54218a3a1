#include "torch/backend.h"
#include "plait/algo/collectives.h"
#include "plait/algo/cost_model.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <numeric>

namespace plait_torch {

using plait::DType;
using plait::RedOp;

namespace {

DType toDType(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kChar: return DType::kInt8;
    case at::kByte: return DType::kUInt8;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    case at::kBool: return DType::kBool;
    default:
      TORCH_CHECK(false, "plait: ", op, ": ", arg, " has dtype ", t.scalar_type(),
                  ", which plait does not support (float32, float64, float16, bfloat16, int8, uint8, int32, int64, "
                  "bool)");
  }
}

void checkTensor(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), "plait: ", op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, "plait: ", op, ": ", arg,
              " is a sparse (or non-strided) tensor; plait supports dense tensors only");
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "plait: ", op, ": ", arg, " is on device ", t.device(),
              ", plait supports CPU and CUDA tensors");
}

void checkSameKind(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg) {
  checkTensor(t, op, arg);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "plait: ", op, ": ", arg, " has dtype ", t.scalar_type(),
              " but the input has dtype ", ref.scalar_type(), " (mixed dtypes)");
  TORCH_CHECK(t.device() == ref.device(), "plait: ", op, ": ", arg, " is on ", t.device(), " but the input is on ",
              ref.device(), " (mixed devices)");
}

void checkSingle(const std::vector<at::Tensor>& ts, const char* op) {
  TORCH_CHECK(ts.size() == 1, "plait: ", op, " takes exactly one tensor per rank, got ", ts.size());
}

size_t nbytes(const at::Tensor& t) { return size_t(t.numel()) * t.element_size(); }

struct Reduction {
  RedOp op = RedOp::kSum;
  bool avg = false;
  bool premul = false;
  double factor = 1.0;
  at::Tensor tensorFactor;
};

Reduction toReduction(const c10d::ReduceOp& rop, const at::Tensor& t, const char* opName) {
  Reduction r;
  switch (rop.op_) {
    case c10d::ReduceOp::SUM: r.op = RedOp::kSum; break;
    case c10d::ReduceOp::AVG: r.op = RedOp::kSum; r.avg = true; break;
    case c10d::ReduceOp::PRODUCT: r.op = RedOp::kProd; break;
    case c10d::ReduceOp::MIN: r.op = RedOp::kMin; break;
    case c10d::ReduceOp::MAX: r.op = RedOp::kMax; break;
    case c10d::ReduceOp::BAND: r.op = RedOp::kBand; break;
    case c10d::ReduceOp::BOR: r.op = RedOp::kBor; break;
    case c10d::ReduceOp::BXOR: r.op = RedOp::kBxor; break;
    case c10d::ReduceOp::PREMUL_SUM: {
      r.op = RedOp::kSum;
      r.premul = true;
      auto* s = dynamic_cast<c10d::PreMulSumSupplement*>(rop.supplement_.get());
      TORCH_CHECK(s != nullptr, "plait: ", opName, ": PREMUL_SUM without a factor");
      if (s->tensor_factor.defined()) r.tensorFactor = s->tensor_factor;
      else r.factor = s->double_factor;
      break;
    }
    default: TORCH_CHECK(false, "plait: ", opName, ": reduce op ", int(rop.op_), " is not supported");
  }
  DType dt = toDType(t, opName, "tensor");
  TORCH_CHECK(!(r.avg && dt == DType::kBool), "plait: ", opName, ": ReduceOp.AVG is not defined for bool tensors");
  TORCH_CHECK(!(r.premul && !at::isFloatingType(t.scalar_type())), "plait: ", opName,
              ": PREMUL_SUM needs a floating-point tensor, got ", t.scalar_type());
  try {
    plait::reduceFn(r.op, dt);
  } catch (const plait::Error& e) {
    TORCH_CHECK(false, "plait: ", opName, ": ", e.what());
  }
  return r;
}

// The scaling runs in the kernels' fixed floating-point mode (no flush-to-zero), whatever the calling thread set:
// otherwise a rank whose thread flushes denormals scales differently from the others.
void preReduce(const Reduction& r, at::Tensor& t) {
  if (!r.premul) return;
  plait::IeeeFpScope fp;
  if (r.tensorFactor.defined()) t.mul_(r.tensorFactor.to(t.device()));
  else t.mul_(r.factor);
}

void postReduce(const Reduction& r, at::Tensor& t, int size) {
  if (!r.avg) return;
  plait::IeeeFpScope fp;
  if (at::isFloatingType(t.scalar_type())) t.div_(size);
  else t.div_(size, "trunc");
}

// Runs fn on a contiguous version of t, writing the result back into t if a copy was needed.
template <typename F>
void onContiguous(at::Tensor& t, F&& fn) {
  if (t.is_contiguous()) {
    fn(t);
    return;
  }
  at::Tensor c = t.contiguous();
  fn(c);
  t.copy_(c);
}

std::exception_ptr asDistError(const std::string& msg) {
  try {
    C10_THROW_ERROR(DistBackendError, msg);
  } catch (...) {
    return std::current_exception();
  }
}

}  // namespace

PlaitWork::PlaitWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs)
    : c10d::Work(rank, type), outputs_(std::move(outputs)) {}

void PlaitWork::markFuture(const c10::intrusive_ptr<c10::ivalue::Future>& f) {
  if (error_) f->setError(error_);
  else if (cuda_) cudaMarkFuture(*cuda_, *f, c10::IValue(outputs_));
  else f->markCompleted(c10::IValue(outputs_));
}

bool PlaitWork::wait(std::chrono::milliseconds timeout) {
  // The base waits until the work is done (CUDA: enqueued), rethrows its error and calls synchronize(); block again
  // in case a torch version does not (a second stream wait on the same event costs nothing).
  bool ok = c10d::Work::wait(timeout);
  if (cuda_) synchronize();
  return ok;
}

bool PlaitWork::isCompleted() {
  bool enqueued = c10d::Work::isCompleted();
  if (!cuda_ || !enqueued) return enqueued;
  return exception() != nullptr || cudaQueryDone(*cuda_);
}

void PlaitWork::synchronize() {
  if (!cuda_) return;
  // The caller's current stream waits for the work; the host waits only until it is enqueued (done_).
  {
    std::unique_lock<std::mutex> lk(futureMu_);
    doneCv_.wait(lk, [&] { return done_; });
    if (error_) return;
  }
  cudaBlockCurrentStream(*cuda_);
}

void PlaitWork::blockCurrentStream() { synchronize(); }

int PlaitWork::sourceRank() const {
  int src = srcRank_.load(std::memory_order_acquire);
  if (src >= 0) return src;
  return c10d::Work::sourceRank();  // raises: not a completed receive
}

c10::intrusive_ptr<c10::ivalue::Future> PlaitWork::getFuture() {
  c10::intrusive_ptr<c10::ivalue::Future> f;
  bool markNow = false;
  {
    std::lock_guard<std::mutex> lk(futureMu_);
    if (!future_) {
      future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()),
                                                         cuda_ ? cudaDevices(*cuda_) : std::vector<c10::Device>{});
      markNow = done_;
    }
    f = future_;
  }
  if (markNow) markFuture(f);
  return f;
}

void PlaitWork::complete(std::exception_ptr error) {
  c10::intrusive_ptr<c10::ivalue::Future> f;
  {
    std::lock_guard<std::mutex> lk(futureMu_);
    if (done_) return;  // completed once already (a deferred transfer's callback ran before its task ended)
    error_ = error;
    done_ = true;
    f = future_;
  }
  doneCv_.notify_all();
  finish(error);
  if (f) markFuture(f);
}

PlaitBackend::PlaitBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                           std::chrono::milliseconds timeout, const plait::Options& opts)
    : c10d::Backend(rank, size), opts_(opts), groupTimeout_(timeout) {
  compression_ = opts.compression.empty() ? plait::knobs().compression : opts.compression;
  TORCH_CHECK(opts.compressionBlock || plait::knobs().compressionBlock <= 65536,
              "plait: PLAIT_COMPRESSION_BLOCK=", plait::knobs().compressionBlock,
              " is out of range (0, or a multiple of 8 in [8, 65536])");
  compressionBlock_ = opts.compressionBlock ? opts.compressionBlock : uint32_t(plait::knobs().compressionBlock);
  try {
    if (compression_ != "none" && compression_ != "auto") plait::codec::makeSpec(plait::codec::parseCodec(compression_), compressionBlock_);
    else if (compressionBlock_) plait::codec::makeSpec(plait::codec::Codec::kInt8, compressionBlock_);
  } catch (const plait::Error& e) {
    TORCH_CHECK(false, "plait: compression (Options.compression / PLAIT_COMPRESSION): ", e.what());
  }
  try {
    comm_ = std::make_unique<plait::Comm>(std::make_shared<StoreAdapter>(store), rank, size, timeout, opts);
  } catch (const plait::Error& e) {
    C10_THROW_ERROR(DistBackendError, e.what());
  }
  worker_ = std::thread([this] { loop(); });
}

PlaitBackend::~PlaitBackend() {
  try {
    stop(true, "destroyed");
  } catch (...) {
  }
}

void PlaitBackend::stop(bool drain, const std::string& what) {
  // The core prefixes "plait: rank R: " to an abort's reason; the Works failed here get the whole message.
  const std::string why = plait::cat("the process group was ", what, " with this operation pending");
  const std::string msg = plait::cat("plait: rank ", getRank(), ": ", why);
  std::unique_lock<std::mutex> lk(mu_);
  if (stop_) return;
  if (drain) {
    // Queued collectives run (each is bounded by the group's timeout; the peers are expected to issue them too).
    // (taskRunning_, not busy_: with point-to-point pending the worker holds the lock from one 20 ms progress slice
    // to the next whenever busy_ is false, so a wait for !busy_ could starve.)
    idleCv_.wait(lk, [&] { return queue_.empty() && !taskRunning_; });
    // Sends in flight usually finish at once; a receive nobody will match never does: give them a moment.
    auto grace = std::min<std::chrono::milliseconds>(comm_->timeout(), std::chrono::milliseconds(1000));
    idleCv_.wait_for(lk, grace, [&] { return p2pPending_ == 0 && queue_.empty() && !taskRunning_; });
  }
  if (stopped_.empty())
    stopped_ = plait::cat("plait: rank ", getRank(), ": the process group was ", what, "; it takes no further calls");
  std::deque<Item> dropped;
  dropped.swap(queue_);
  const bool inFlight = busy_ || p2pPending_ > 0 || !dropped.empty();
  lk.unlock();
  if (inFlight || !drain) comm_->requestAbort(why);
  for (auto& item : dropped) item.work->complete(asDistError(msg));
  lk.lock();
  // The abort makes the running task and the pending transfers fail within milliseconds (their Works complete with
  // the error); the bound only guards against a transfer the core never reports.
  idleCv_.wait_for(lk, std::chrono::seconds(10), [&] { return !busy_ && p2pPending_ == 0; });
  stop_ = true;
  lk.unlock();
  std::vector<std::pair<uint64_t, P2PEntry>> left;
  {
    std::lock_guard<std::mutex> g(p2pMu_);
    left.assign(p2pLive_.begin(), p2pLive_.end());
  }
  for (auto& [id, e] : left) {
    if (e.fired->exchange(true)) continue;
    e.work->complete(asDistError(msg));
    settleP2P(id);
  }
  cv_.notify_all();
  comm_->interrupt();
  if (worker_.joinable()) {
    // stop() from the worker itself (a future callback that aborts or destroys the group): the thread cannot join
    // itself; it finishes loop() on its own once stop_ is seen, so let it go rather than destroy what it uses.
    if (worker_.get_id() != std::this_thread::get_id()) worker_.join();
    else worker_.detach();
  }
  // Peers hear of an abort even when nothing was in flight here (nobody drives the engine any more).
  if (!drain) comm_->abortNow(why);
}

void PlaitBackend::abort() { stop(false, "aborted"); }

void PlaitBackend::shutdown() { stop(true, "shut down"); }

void PlaitBackend::setTimeout(std::chrono::milliseconds timeout) {
  waitForPendingWorks();
  comm_->setTimeout(timeout);
  groupTimeout_ = timeout;
}

c10::intrusive_ptr<c10d::Backend::Options> PlaitBackend::getBackendOptions() {
  auto o = c10::make_intrusive<c10d::Backend::Options>("plait", groupTimeout_);
  o->group_name = getGroupUid();
  o->group_desc = getGroupDesc();
  return o;
}

void PlaitBackend::setSequenceNumberForGroup() { seqNum_.store(0); }

uint64_t PlaitBackend::getSequenceNumberForGroup() { return seqNum_.load(); }

c10::intrusive_ptr<c10d::Backend> PlaitBackend::split(const c10::intrusive_ptr<c10d::Store>& store,
                                                      const std::vector<int>& ranks,
                                                      const c10::intrusive_ptr<c10d::Backend::Options>& opts) {
  std::vector<int> sorted = ranks;
  std::sort(sorted.begin(), sorted.end());
  auto it = std::find(sorted.begin(), sorted.end(), getRank());
  if (it == sorted.end()) return nullptr;
  for (int r : sorted)
    TORCH_CHECK(r >= 0 && r < getSize(), "plait: split: rank ", r, " is outside the parent group of size ",
                getSize());
  plait::Options o = opts_;
  o.groupName = opts && !opts->group_name.empty() ? opts->group_name : opts_.groupName + ":split";
  auto timeout = opts && opts->timeout.count() > 0 ? opts->timeout : groupTimeout_;
  auto child = c10::make_intrusive<PlaitBackend>(store, int(it - sorted.begin()), int(sorted.size()), timeout, o);
  if (!o.groupName.empty()) child->setGroupUid(o.groupName);
  return child;
}

void PlaitBackend::run(const c10::intrusive_ptr<PlaitWork>& work, const Task& fn, bool deferred) {
  std::exception_ptr err;
  current_ = work;
  try {
    fn();
    comm_->traceClose();  // the flight recorder's entry of the collective this task ran ends now
  } catch (const plait::Error& e) {
    err = asDistError(e.what());
    comm_->recorder().abandon(e.what());  // no-op when the communicator failed (its entries say so already)
  } catch (const std::exception& e) {
    err = std::current_exception();
    comm_->recorder().abandon(e.what());
  } catch (...) {
    err = std::current_exception();
    comm_->recorder().abandon("unknown exception");
  }
  current_.reset();
  if (!deferred || err) work->complete(err);
}

void PlaitBackend::settleP2P(uint64_t id) {
  {
    std::lock_guard<std::mutex> lk(p2pMu_);
    p2pLive_.erase(id);
  }
  if (--p2pPending_ == 0) {
    { std::lock_guard<std::mutex> lk(mu_); }
    idleCv_.notify_all();
  }
}

void PlaitBackend::postP2P(const c10::intrusive_ptr<PlaitWork>& work, at::Tensor keep, at::Tensor copyBackTo,
                           const std::function<void(AnyDone)>& post) {
  // `fired` makes the completion one-shot, whichever comes first: the core's callback, a post that throws, or stop()
  // failing a transfer the core never reported.
  auto fired = std::make_shared<std::atomic<bool>>(false);
  uint64_t id;
  {
    std::lock_guard<std::mutex> lk(p2pMu_);
    id = p2pNextId_++;
    p2pLive_.emplace(id, P2PEntry{work, fired});
  }
  ++p2pPending_;
  try {
    post([this, id, work, keep, copyBackTo, fired](const std::string* error, int src) mutable {
      if (fired->exchange(true)) return;
      // The copy back can raise (a view of a leaf that requires grad): the Work completes with that error either
      // way, then the exception goes on to the core, which fails the group.
      std::exception_ptr copyErr;
      if (!error && copyBackTo.defined() && !copyBackTo.is_same(keep)) {
        try {
          copyBackTo.copy_(keep);
        } catch (...) {
          copyErr = std::current_exception();
        }
      }
      if (!error && !copyErr && src >= 0) work->setSourceRank(src);
      work->complete(error ? asDistError(*error) : copyErr);
      settleP2P(id);
      if (copyErr) std::rethrow_exception(copyErr);
    });
  } catch (...) {
    // Nothing was posted (e.g. the group failed earlier): run() completes the Work with the error.
    if (!fired->exchange(true)) settleP2P(id);
    throw;
  }
}

void PlaitBackend::loop() {
  std::unique_lock<std::mutex> lk(mu_);
  while (true) {
    if (!queue_.empty() && !busy_) {
      Item item = std::move(queue_.front());
      queue_.pop_front();
      busy_ = taskRunning_ = true;
      lk.unlock();
      run(item.work, item.fn, item.deferred);
      lk.lock();
      busy_ = taskRunning_ = false;
      idleCv_.notify_all();
      continue;
    }
    if (p2pPending_ > 0 && !busy_ && !stop_) {
      // Drive point-to-point transfers in flight; new work interrupts this (see submit).
      busy_ = true;
      lk.unlock();
      try {
        comm_->progressP2P(std::chrono::milliseconds(20));
      } catch (...) {
        // the failure reached every pending transfer's Work through its completion callback
      }
      lk.lock();
      busy_ = false;
      idleCv_.notify_all();
      continue;
    }
    if (stop_) return;
    auto ready = [&] { return stop_ || (!queue_.empty() && !busy_) || (p2pPending_ > 0 && !busy_); };
    if (!comm_->hasDeviceEngine()) {
      cv_.wait(lk, ready);
      continue;
    }
    // Device work never makes the host wait, so nothing else would notice a peer that died while this rank's
    // stream waits for it: check every second, and fail the group (which releases the stream's waits).
    if (!cv_.wait_for(lk, std::chrono::seconds(1), ready) && !busy_) {
      busy_ = true;
      lk.unlock();
      try {
        comm_->checkDevicePeers();
      } catch (...) {
        // the group is failed: the next call on it raises with the reason
      }
      lk.lock();
      busy_ = false;
      idleCv_.notify_all();
    }
  }
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::submit(c10d::OpType type, std::vector<at::Tensor> outputs, size_t bytes,
                                                    When when, Task fn, bool deferred,
                                                    std::vector<at::Tensor> inputs) {
  const bool sync = when.sync;
  const auto timeout = when.timeout;
  if (timeout != c10d::kUnsetTimeout && timeout.count() > 0) {
    // A per-operation timeout: the communicator's timeout for this one task (set and restored on the thread that
    // runs it, the only one that uses the communicator meanwhile).
    fn = [this, timeout, fn = std::move(fn)]() {
      auto before = comm_->timeout();
      comm_->setTimeout(timeout);
      try {
        fn();
      } catch (...) {
        comm_->setTimeout(before);
        throw;
      }
      comm_->setTimeout(before);
    };
  }
  at::Device device(at::kCPU);
  for (const auto* ts : {&outputs, &inputs})
    for (const auto& t : *ts)
      if (t.defined() && device.is_cpu() && t.is_cuda()) device = t.device();
  const bool collective = !deferred && type != c10d::OpType::BARRIER;
  std::shared_ptr<CudaCall> call;
  if (device.is_cuda()) {
    call = cudaCapture(*streams_, device);
    std::vector<at::Tensor> used = outputs;
    used.insert(used.end(), inputs.begin(), inputs.end());
    fn = [this, call, used = std::move(used), fn = std::move(fn), collective]() {
      CudaScope scope(*call, used);
      if (collective) comm_->setDevice(scope.device(), scope.stream());
      try {
        fn();
      } catch (...) {
        if (collective) comm_->clearDevice();
        throw;
      }
      if (collective) comm_->clearDevice();
      cudaRecordDone(*call);
    };
  } else if (collective && plait::knobs().device == "emulate") {
    fn = [this, fn = std::move(fn)]() {
      comm_->setDevice(-1, nullptr);
      try {
        fn();
      } catch (...) {
        comm_->clearDevice();
        throw;
      }
      comm_->clearDevice();
    };
  }
  auto work = c10::make_intrusive<PlaitWork>(getRank(), type, std::move(outputs));
  if (call) work->setCuda(call);
  std::unique_lock<std::mutex> lk(mu_);
  if (!stopped_.empty()) C10_THROW_ERROR(DistBackendError, stopped_);
  if (!deferred) ++seqNum_;
  if (queue_.empty() && !busy_ && (sync || deferred) && bytes <= plait::knobs().inlineBytes) {
    // Nothing ahead of it, and the caller waits for it anyway (or it only posts a transfer): run on the caller's
    // thread, which keeps issue order and skips two thread hand-offs. An async_op collective never runs here: it
    // could block the caller until every peer arrives, which a program may only let happen later (another group,
    // point-to-point on another group).
    busy_ = taskRunning_ = true;
    lk.unlock();
    run(work, fn, deferred);
    lk.lock();
    busy_ = taskRunning_ = false;
    idleCv_.notify_all();
    cv_.notify_one();
  } else {
    queue_.push_back(Item{work, std::move(fn), deferred});
    cv_.notify_one();
    if (busy_) comm_->interrupt();
  }
  return work;
}

void PlaitBackend::waitForPendingWorks() {
  std::unique_lock<std::mutex> lk(mu_);
  idleCv_.wait(lk, [&] { return queue_.empty() && !busy_ && p2pPending_ == 0; });
}

// ---------------------------------------------------------------------------------------------------------------

PlaitBackend::Compression PlaitBackend::resolveCompression(const std::string& mode, const at::Tensor& t, bool sumOrAvg,
                                                         const char* opName) const {
  Compression r;
  r.mode = mode;
  if (mode == "none") return r;
  if (mode == "auto") {
    // auto only ever picks a codec where it is valid; anything else runs full precision.
    if (!sumOrAvg || !t.device().is_cpu() || t.layout() != at::kStrided) r.mode = "none";
    return r;
  }
  plait::codec::Codec codec;
  try {
    codec = plait::codec::parseCodec(mode);
    r.spec = plait::codec::makeSpec(codec, compressionBlock_);
  } catch (const plait::Error& e) {
    TORCH_CHECK(false, "plait: ", opName, ": ", e.what());
  }
  const plait::DType dt = toDType(t, opName, "tensor");
  TORCH_CHECK(sumOrAvg, "plait: ", opName, " with compression ", mode, ": the reduce op must be SUM or AVG (rank ",
              getRank(), "); compressed all-reduce does not support this op. Nothing was sent");
  TORCH_CHECK(plait::codec::codecSupports(dt), "plait: ", opName, " with compression ", mode, ": dtype ",
              t.scalar_type(), " is not supported (float32, bfloat16, float16 only; rank ", getRank(),
              "). Nothing was sent");
  TORCH_CHECK(t.device().is_cpu(), "plait: ", opName, " with compression ", mode, ": tensors on ", t.device(),
              " are not supported yet (CPU tensors only; rank ", getRank(), "). Nothing was sent");
  if (r.mode == "none") r.mode = "none";
  return r;
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::AllreduceOptions& opts) {
  return allreduceWith(tensors, opts, "");
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allreduceWith(std::vector<at::Tensor>& tensors,
                                                           const c10d::AllreduceOptions& opts,
                                                           const std::string& compression, at::Tensor residual) {
  TORCH_CHECK(!tensors.empty(), "plait: all_reduce needs at least one tensor");
  const bool fromGroup = compression.empty() || compression == "group";
  std::string mode = fromGroup ? compression_ : compression;
  if (tensors[0].defined() && tensors[0].layout() == at::kSparse) {
    TORCH_CHECK(mode == "none" || mode == "auto", "plait: all_reduce with compression ", mode,
                ": sparse tensors are not supported. Nothing was sent");
    return sparseAllreduce(tensors, opts);
  }
  for (auto& t : tensors) checkSameKind(t, tensors[0], "all_reduce", "tensor");
  Reduction red = toReduction(opts.reduceOp, tensors[0], "all_reduce");
  DType dt = toDType(tensors[0], "all_reduce", "tensor");
  const bool sumOrAvg = red.op == RedOp::kSum && !red.premul;
  // The group's codec applies to the all-reduces it can compress (float SUM / AVG on CPU tensors); the others (an
  // integer count, a MAX, torch's own bookkeeping) run in full precision. A codec asked for in the call is checked.
  if (fromGroup && mode != "none" && mode != "auto" &&
      (!sumOrAvg || !plait::codec::codecSupports(dt) || !tensors[0].device().is_cpu()))
    mode = "none";
  Compression comp = resolveCompression(mode, tensors[0], sumOrAvg, "all_reduce");
  if (residual.defined()) {
    TORCH_CHECK(tensors.size() == 1 && comp.mode != "none" && comp.mode != "auto" && red.op == RedOp::kSum &&
                    !red.avg && !red.premul && tensors[0].scalar_type() == at::kFloat && tensors[0].is_contiguous(),
                "plait: all_reduce with a residual needs one contiguous float32 tensor, SUM and a codec");
    TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.device().is_cpu() &&
                    residual.numel() == tensors[0].numel() && !residual.is_alias_of(tensors[0]),
                "plait: all_reduce: the residual must be a contiguous float32 CPU tensor of the tensor's size, "
                "apart from it");
  }
  size_t bytes = 0;
  for (auto& t : tensors) bytes += nbytes(t);
  const uint32_t block = compressionBlock_;
  return submit(c10d::OpType::ALLREDUCE, tensors, bytes, When{!opts.asyncOp, opts.timeout},
                [this, tensors, red, dt, comp, block, residual]() mutable {
    for (auto& t : tensors) {
      onContiguous(t, [&](at::Tensor& c) {
        const size_t count = size_t(c.numel());
        plait::codec::Spec spec = comp.spec;
        if (comp.mode != "none") {
          plait::CompressionPlan plan = plait::planCompression(
              comm_->topology(), count, dt, comp.mode == "auto", comp.spec, block, comm_->forcedAlgo(),
              plait::coll::compressedHierarchical(*comm_));
          spec = plan.spec;
          if (plait::infoEnabled()) {
            static thread_local std::string last;
            std::string key = plait::cat(plait::codec::codecName(spec.codec), spec.block, plan.why.substr(0, 20));
            if (key != last)
              plait::logInfo(plait::cat("rank ", getRank(), ": all_reduce of ", count, " x ", plait::dtypeName(dt),
                                        ": compression ", plait::codec::codecName(spec.codec),
                                        spec.codec != plait::codec::Codec::kNone ? plait::cat(" block ", spec.block) : "",
                                        plan.hier ? " (hierarchical)" : "", ": ", plan.why));
            last = key;
          }
        }
        if (spec.codec != plait::codec::Codec::kNone) {
          plait::coll::allreduceCompressed(*comm_, c.data_ptr(), count, dt, red.avg, spec,
                                           residual.defined() ? residual.data_ptr<float>() : nullptr);
          return;
        }
        preReduce(red, c);
        plait::coll::allreduce(*comm_, c.data_ptr(), count, dt, red.op);
        postReduce(red, c, getSize());
      });
    }
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                              const c10d::AllreduceOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "plait: all_reduce (sparse) needs at least one tensor");
  return sparseAllreduce(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::sparseAllreduce(std::vector<at::Tensor>& tensors,
                                                             const c10d::AllreduceOptions& opts) {
  const char* op = "all_reduce (sparse)";
  for (auto& t : tensors) {
    TORCH_CHECK(t.defined() && t.layout() == at::kSparse, "plait: ", op,
                ": every tensor must be a sparse COO tensor (no mixing with dense ones)");
    TORCH_CHECK(t.device().is_cpu(), "plait: ", op, ": tensor is on ", t.device(),
                "; plait reduces sparse tensors on the CPU only");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type() && t.sizes() == tensors[0].sizes(), "plait: ", op,
                ": tensors of one call must share dtype and size");
  }
  TORCH_CHECK(opts.reduceOp.op_ == c10d::ReduceOp::SUM, "plait: ", op,
              ": only ReduceOp.SUM is supported for sparse tensors (as in gloo)");
  toDType(tensors[0], op, "tensor");
  return submit(c10d::OpType::ALLREDUCE, tensors, 0, When{!opts.asyncOp, opts.timeout}, [this, tensors]() mutable {
    at::Tensor in = tensors[0];
    for (size_t i = 1; i < tensors.size(); ++i) in = in + tensors[i];
    in = in.coalesce();
    // 1. Metadata of every rank: nnz, sparse dims, dense dims, dims, sizes (fixed record, so ranks that disagree
    //    about the shape still exchange equal byte counts and the mismatch is reported by name).
    constexpr int kMaxDims = 16;
    const int64_t ndim = in.dim();
    TORCH_CHECK(ndim <= kMaxDims, "plait: all_reduce (sparse): tensors of more than ", kMaxDims,
                " dimensions are not supported (got ", ndim, ")");
    const int n = getSize();
    const int64_t rec = 4 + kMaxDims;
    at::Tensor meta = at::zeros({rec}, at::kLong);
    auto* m = meta.data_ptr<int64_t>();
    m[0] = in._nnz();
    m[1] = in.sparse_dim();
    m[2] = in.dense_dim();
    m[3] = ndim;
    for (int64_t d = 0; d < ndim; ++d) m[4 + d] = in.size(d);
    at::Tensor all = at::empty({n, rec}, at::kLong);
    plait::coll::allgather(*comm_, meta.data_ptr(), all.data_ptr(), std::vector<size_t>(n, size_t(rec) * sizeof(int64_t)));
    auto* a = all.data_ptr<int64_t>();
    for (int r = 0; r < n; ++r)
      for (int64_t k = 1; k < rec; ++k)
        TORCH_CHECK(a[r * rec + k] == m[k], "plait: all_reduce (sparse): rank ", r,
                    " has a sparse tensor of another shape or sparse/dense split than rank ", getRank(),
                    " (sizes ", all[r].narrow(0, 4, a[r * rec + 3]), " vs ", in.sizes(), ")");
    // 2. Indices ([sparse_dim, nnz] int64) and values ([nnz, dense...]) of every rank, packed rank after rank.
    at::Tensor idx = in._indices().contiguous();
    at::Tensor val = in._values().contiguous();
    const size_t idxPerNnz = size_t(in.sparse_dim()) * sizeof(int64_t);
    size_t valPerNnz = size_t(val.element_size());
    for (int64_t d = 1; d < val.dim(); ++d) valPerNnz *= size_t(val.size(d));
    std::vector<size_t> idxBytes(n), valBytes(n);
    size_t idxTotal = 0, valTotal = 0;
    for (int r = 0; r < n; ++r) {
      idxBytes[r] = size_t(a[r * rec]) * idxPerNnz;
      valBytes[r] = size_t(a[r * rec]) * valPerNnz;
      idxTotal += idxBytes[r];
      valTotal += valBytes[r];
    }
    at::Tensor idxAll = at::empty({int64_t(idxTotal)}, at::kByte);
    at::Tensor valAll = at::empty({int64_t(valTotal)}, at::kByte);
    plait::coll::allgather(*comm_, idx.data_ptr(), idxAll.data_ptr(), idxBytes);
    plait::coll::allgather(*comm_, val.data_ptr(), valAll.data_ptr(), valBytes);
    // 3. Sum in rank order and coalesce (what gloo returns).
    std::vector<int64_t> valShape = val.sizes().vec();
    at::Tensor out;
    size_t io = 0, vo = 0;
    for (int r = 0; r < n; ++r) {
      int64_t nnz = a[r * rec];
      at::Tensor ri = idxAll.narrow(0, int64_t(io), int64_t(idxBytes[r])).view(at::kLong).view({in.sparse_dim(), nnz});
      valShape[0] = nnz;
      at::Tensor rv =
          valAll.narrow(0, int64_t(vo), int64_t(valBytes[r])).view(val.scalar_type()).view(valShape);
      io += idxBytes[r];
      vo += valBytes[r];
      at::Tensor part = at::sparse_coo_tensor(ri, rv, in.sizes(), in.options());
      out = r == 0 ? part : out + part;
    }
    out = out.coalesce();
    for (auto& t : tensors) t.copy_(out);
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                 const c10d::AllreduceCoalescedOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "plait: all_reduce_coalesced needs at least one tensor");
  for (auto& t : tensors) checkSameKind(t, tensors[0], "all_reduce_coalesced", "tensor");
  Reduction red = toReduction(opts.reduceOp, tensors[0], "all_reduce_coalesced");
  DType dt = toDType(tensors[0], "all_reduce_coalesced", "tensor");
  size_t bytes = 0;
  for (auto& t : tensors) bytes += nbytes(t);
  return submit(c10d::OpType::ALLREDUCE_COALESCED, tensors, bytes, When{!opts.asyncOp, opts.timeout}, [this, tensors, red, dt]() mutable {
    std::vector<at::Tensor> flat;
    for (auto& t : tensors) flat.push_back(t.reshape({-1}));
    at::Tensor buf = at::cat(flat);
    preReduce(red, buf);
    plait::coll::allreduce(*comm_, buf.data_ptr(), size_t(buf.numel()), dt, red.op);
    postReduce(red, buf, getSize());
    int64_t off = 0;
    for (auto& t : tensors) {
      t.copy_(buf.narrow(0, off, t.numel()).view(t.sizes()));
      off += t.numel();
    }
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                       const c10d::BroadcastOptions& opts) {
  checkSingle(tensors, "broadcast");
  checkTensor(tensors[0], "broadcast", "tensor");
  toDType(tensors[0], "broadcast", "tensor");
  TORCH_CHECK(opts.rootRank >= 0 && opts.rootRank < getSize(), "plait: broadcast: root rank ", opts.rootRank,
              " is outside the group of size ", getSize());
  int root = int(opts.rootRank);
  return submit(c10d::OpType::BROADCAST, tensors, nbytes(tensors[0]), When{!opts.asyncOp, opts.timeout}, [this, tensors, root]() mutable {
    onContiguous(tensors[0], [&](at::Tensor& c) { plait::coll::broadcast(*comm_, c.data_ptr(), nbytes(c), root); });
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) {
  checkSingle(tensors, "reduce");
  checkTensor(tensors[0], "reduce", "tensor");
  Reduction red = toReduction(opts.reduceOp, tensors[0], "reduce");
  DType dt = toDType(tensors[0], "reduce", "tensor");
  TORCH_CHECK(opts.rootRank >= 0 && opts.rootRank < getSize(), "plait: reduce: root rank ", opts.rootRank,
              " is outside the group of size ", getSize());
  int root = int(opts.rootRank);
  return submit(c10d::OpType::REDUCE, tensors, nbytes(tensors[0]), When{!opts.asyncOp, opts.timeout}, [this, tensors, red, dt, root]() mutable {
    onContiguous(tensors[0], [&](at::Tensor& c) {
      at::Tensor work = c;
      if (red.premul && getRank() != root) work = c.clone();  // non-root inputs stay as they were
      preReduce(red, work);
      plait::coll::reduce(*comm_, work.data_ptr(), size_t(work.numel()), dt, red.op, root);
      if (getRank() == root) postReduce(red, c, getSize());
    });
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::AllgatherOptions& opts) {
  checkSingle(inputs, "all_gather");
  TORCH_CHECK(outputs.size() == 1, "plait: all_gather takes one output list per rank, got ", outputs.size());
  checkTensor(inputs[0], "all_gather", "input");
  toDType(inputs[0], "all_gather", "input");
  auto& outs = outputs[0];
  TORCH_CHECK(int(outs.size()) == getSize(), "plait: all_gather: the output list has ", outs.size(),
              " tensors, the group has ", getSize(), " ranks");
  std::vector<size_t> bytes;
  for (size_t i = 0; i < outs.size(); ++i) {
    checkSameKind(outs[i], inputs[0], "all_gather", "output tensor");
    bytes.push_back(nbytes(outs[i]));
  }
  TORCH_CHECK(outs[getRank()].numel() == inputs[0].numel(), "plait: all_gather: output tensor ", getRank(),
              " has ", outs[getRank()].numel(), " elements but the input has ", inputs[0].numel(), " (size mismatch)");
  size_t total = std::accumulate(bytes.begin(), bytes.end(), size_t(0));
  return submit(c10d::OpType::ALLGATHER, outs, total, When{!opts.asyncOp, opts.timeout}, [this, outs, inputs, bytes, total]() mutable {
    at::Tensor in = inputs[0].contiguous();
    at::Tensor flat = at::empty({int64_t(total)}, in.options().dtype(at::kByte));
    plait::coll::allgather(*comm_, in.data_ptr(), flat.data_ptr(), bytes);
    size_t off = 0;
    for (size_t i = 0; i < outs.size(); ++i) {
      at::Tensor piece = flat.narrow(0, int64_t(off), int64_t(bytes[i]));
      outs[i].copy_(piece.view(outs[i].scalar_type()).view(outs[i].sizes()));
      off += bytes[i];
    }
  }, false, inputs);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                             const c10d::AllgatherOptions& opts) {
  checkTensor(input, "all_gather_into_tensor", "input");
  checkSameKind(output, input, "all_gather_into_tensor", "output");
  toDType(input, "all_gather_into_tensor", "input");
  TORCH_CHECK(output.numel() == input.numel() * getSize(), "plait: all_gather_into_tensor: output size ",
              output.numel(), " must be world size (", getSize(), ") times input size ", input.numel());
  std::vector<size_t> bytes(getSize(), nbytes(input));
  return submit(c10d::OpType::_ALLGATHER_BASE, {output}, nbytes(output), When{!opts.asyncOp, opts.timeout},
                [this, output, input, bytes]() mutable {
                  at::Tensor in = input.contiguous();
                  onContiguous(output, [&](at::Tensor& c) { plait::coll::allgather(*comm_, in.data_ptr(), c.data_ptr(), bytes); });
                }, false, {input});
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputLists,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) {
  // output_tensor_lists[r][i] receives input i of rank r (torch's and gloo's layout).
  TORCH_CHECK(!inputs.empty(), "plait: all_gather_coalesced needs at least one input tensor (got an empty list)");
  TORCH_CHECK(int(outputLists.size()) == getSize(), "plait: all_gather_coalesced: ", outputLists.size(),
              " output lists for a group of ", getSize(), " ranks (one list per rank)");
  for (size_t r = 0; r < outputLists.size(); ++r)
    TORCH_CHECK(outputLists[r].size() == inputs.size(), "plait: all_gather_coalesced: output list ", r, " has ",
                outputLists[r].size(), " tensors for ", inputs.size(), " inputs");
  c10::intrusive_ptr<c10d::Work> last;
  std::vector<at::Tensor> all;
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::vector<std::vector<at::Tensor>> o(1);
    for (auto& list : outputLists) o[0].push_back(list[i]);
    std::vector<at::Tensor> in{inputs[i]};
    last = allgather(o, in, opts);
  }
  for (auto& list : outputLists)
    for (auto& t : list) all.push_back(t);
  // Collectives complete in issue order, so the last one completing means all did.
  return submit(c10d::OpType::ALLGATHER_COALESCED, all, 0, When{!opts.asyncOp, opts.timeout}, [last]() {
    if (last) last->wait();
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                             std::vector<at::Tensor>& inputs,
                                                                             const c10d::AllgatherOptions& opts) {
  TORCH_CHECK(outputs.size() == inputs.size(), "plait: all_gather_into_tensor_coalesced: ", outputs.size(),
              " outputs for ", inputs.size(), " inputs");
  c10::intrusive_ptr<c10d::Work> last;
  for (size_t i = 0; i < inputs.size(); ++i) last = _allgather_base(outputs[i], inputs[i], opts);
  return submit(c10d::OpType::COALESCED, outputs, 0, When{!opts.asyncOp, opts.timeout}, [last]() {
    if (last) last->wait();
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                    std::vector<at::Tensor>& inputs, const c10d::GatherOptions& opts) {
  checkSingle(inputs, "gather");
  checkTensor(inputs[0], "gather", "input");
  toDType(inputs[0], "gather", "input");
  TORCH_CHECK(opts.rootRank >= 0 && opts.rootRank < getSize(), "plait: gather: root rank ", opts.rootRank,
              " is outside the group of size ", getSize());
  int root = int(opts.rootRank);
  std::vector<at::Tensor> outs;
  if (getRank() == root) {
    TORCH_CHECK(outputs.size() == 1 && int(outputs[0].size()) == getSize(), "plait: gather: root rank ", root,
                " needs a list of ", getSize(), " output tensors");
    outs = outputs[0];
    for (auto& o : outs) {
      checkSameKind(o, inputs[0], "gather", "output tensor");
      TORCH_CHECK(o.numel() == inputs[0].numel(), "plait: gather: output tensor has ", o.numel(),
                  " elements but the input has ", inputs[0].numel(), " (size mismatch)");
    }
  } else {
    TORCH_CHECK(outputs.empty() || outputs[0].empty(), "plait: gather: non-root rank ", getRank(),
                " must not pass output tensors");
  }
  return submit(c10d::OpType::GATHER, outs, nbytes(inputs[0]), When{!opts.asyncOp, opts.timeout}, [this, outs, inputs, root]() mutable {
    at::Tensor in = inputs[0].contiguous();
    size_t b = nbytes(in);
    if (getRank() != root) {
      plait::coll::gather(*comm_, in.data_ptr(), b, nullptr, root);
      return;
    }
    at::Tensor flat = at::empty({int64_t(b * outs.size())}, in.options().dtype(at::kByte));
    plait::coll::gather(*comm_, in.data_ptr(), b, flat.data_ptr(), root);
    for (size_t i = 0; i < outs.size(); ++i)
      outs[i].copy_(flat.narrow(0, int64_t(i * b), int64_t(b)).view(in.scalar_type()).view(outs[i].sizes()));
  }, false, inputs);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::scatter(std::vector<at::Tensor>& outputs,
                                                     std::vector<std::vector<at::Tensor>>& inputs,
                                                     const c10d::ScatterOptions& opts) {
  checkSingle(outputs, "scatter");
  checkTensor(outputs[0], "scatter", "output");
  toDType(outputs[0], "scatter", "output");
  TORCH_CHECK(opts.rootRank >= 0 && opts.rootRank < getSize(), "plait: scatter: root rank ", opts.rootRank,
              " is outside the group of size ", getSize());
  int root = int(opts.rootRank);
  std::vector<at::Tensor> ins;
  if (getRank() == root) {
    TORCH_CHECK(inputs.size() == 1 && int(inputs[0].size()) == getSize(), "plait: scatter: root rank ", root,
                " needs a list of ", getSize(), " input tensors");
    ins = inputs[0];
    for (auto& i : ins) {
      checkSameKind(i, outputs[0], "scatter", "input tensor");
      TORCH_CHECK(i.numel() == outputs[0].numel(), "plait: scatter: input tensor has ", i.numel(),
                  " elements but the output has ", outputs[0].numel(), " (size mismatch)");
    }
  }
  return submit(c10d::OpType::SCATTER, outputs, nbytes(outputs[0]), When{!opts.asyncOp, opts.timeout}, [this, outputs, ins, root]() mutable {
    onContiguous(outputs[0], [&](at::Tensor& c) {
      if (getRank() != root) {
        plait::coll::scatter(*comm_, nullptr, c.data_ptr(), nbytes(c), root);
        return;
      }
      std::vector<at::Tensor> flat;
      for (auto& i : ins) flat.push_back(i.reshape({-1}));
      at::Tensor all = at::cat(flat);
      plait::coll::scatter(*comm_, all.data_ptr(), c.data_ptr(), nbytes(c), root);
    });
  }, false, ins);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                            std::vector<std::vector<at::Tensor>>& inputs,
                                                            const c10d::ReduceScatterOptions& opts) {
  checkSingle(outputs, "reduce_scatter");
  TORCH_CHECK(inputs.size() == 1 && int(inputs[0].size()) == getSize(), "plait: reduce_scatter needs a list of ",
              getSize(), " input tensors");
  checkTensor(outputs[0], "reduce_scatter", "output");
  Reduction red = toReduction(opts.reduceOp, outputs[0], "reduce_scatter");
  DType dt = toDType(outputs[0], "reduce_scatter", "output");
  std::vector<size_t> counts;
  for (auto& i : inputs[0]) {
    checkSameKind(i, outputs[0], "reduce_scatter", "input tensor");
    counts.push_back(size_t(i.numel()));
  }
  TORCH_CHECK(int64_t(counts[getRank()]) == outputs[0].numel(), "plait: reduce_scatter: output has ",
              outputs[0].numel(), " elements but input tensor ", getRank(), " has ", counts[getRank()],
              " (size mismatch)");
  auto ins = inputs[0];
  size_t total = std::accumulate(counts.begin(), counts.end(), size_t(0)) * outputs[0].element_size();
  return submit(c10d::OpType::REDUCE_SCATTER, outputs, total, When{!opts.asyncOp, opts.timeout}, [this, outputs, ins, counts, red, dt]() mutable {
    std::vector<at::Tensor> flat;
    for (auto& i : ins) flat.push_back(i.reshape({-1}));
    at::Tensor all = at::cat(flat);
    preReduce(red, all);
    onContiguous(outputs[0], [&](at::Tensor& c) {
      plait::coll::reduceScatter(*comm_, all.data_ptr(), c.data_ptr(), counts, dt, red.op);
      postReduce(red, c, getSize());
    });
  }, false, ins);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                  const c10d::ReduceScatterOptions& opts) {
  checkTensor(input, "reduce_scatter_tensor", "input");
  checkSameKind(output, input, "reduce_scatter_tensor", "output");
  Reduction red = toReduction(opts.reduceOp, input, "reduce_scatter_tensor");
  DType dt = toDType(input, "reduce_scatter_tensor", "input");
  TORCH_CHECK(input.numel() == output.numel() * getSize(), "plait: reduce_scatter_tensor: input size ", input.numel(),
              " must be world size (", getSize(), ") times output size ", output.numel());
  std::vector<size_t> counts(getSize(), size_t(output.numel()));
  return submit(c10d::OpType::_REDUCE_SCATTER_BASE, {output}, nbytes(input), When{!opts.asyncOp, opts.timeout},
                [this, output, input, counts, red, dt]() mutable {
                  at::Tensor in = input.contiguous();
                  if (red.premul) {
                    in = in.clone();
                    preReduce(red, in);
                  }
                  onContiguous(output, [&](at::Tensor& c) {
                    plait::coll::reduceScatter(*comm_, in.data_ptr(), c.data_ptr(), counts, dt, red.op);
                    postReduce(red, c, getSize());
                  });
                }, false, {input});
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                             std::vector<at::Tensor>& inputs,
                                                                             const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK(outputs.size() == inputs.size(), "plait: reduce_scatter_tensor_coalesced: ", outputs.size(),
              " outputs for ", inputs.size(), " inputs");
  c10::intrusive_ptr<c10d::Work> last;
  for (size_t i = 0; i < inputs.size(); ++i) last = _reduce_scatter_base(outputs[i], inputs[i], opts);
  return submit(c10d::OpType::COALESCED, outputs, 0, When{!opts.asyncOp, opts.timeout}, [last]() {
    if (last) last->wait();
  });
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                           std::vector<int64_t>& outputSplitSizes,
                                                           std::vector<int64_t>& inputSplitSizes,
                                                           const c10d::AllToAllOptions& opts) {
  checkTensor(input, "all_to_all_single", "input");
  checkSameKind(output, input, "all_to_all_single", "output");
  toDType(input, "all_to_all_single", "input");
  const int n = getSize();
  auto splits = [&](const at::Tensor& t, const std::vector<int64_t>& s, const char* what) {
    std::vector<size_t> bytes;
    int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    size_t rowBytes = rows == 0 ? 0 : nbytes(t) / size_t(rows);
    if (s.empty()) {
      TORCH_CHECK(rows % n == 0, "plait: all_to_all_single: ", what, " has ", rows,
                  " rows, not divisible by the world size ", n, " (size mismatch; pass split sizes)");
      bytes.assign(n, size_t(rows / n) * rowBytes);
    } else {
      TORCH_CHECK(int(s.size()) == n, "plait: all_to_all_single: ", what, " split sizes have ", s.size(),
                  " entries for ", n, " ranks");
      int64_t sum = 0;
      for (int64_t x : s) {
        TORCH_CHECK(x >= 0, "plait: all_to_all_single: negative ", what, " split size ", x);
        sum += x;
        bytes.push_back(size_t(x) * rowBytes);
      }
      TORCH_CHECK(sum == rows, "plait: all_to_all_single: ", what, " split sizes add up to ", sum, " but the ",
                  what, " has ", rows, " rows (size mismatch)");
    }
    return bytes;
  };
  std::vector<size_t> sendBytes = splits(input, inputSplitSizes, "input");
  std::vector<size_t> recvBytes = splits(output, outputSplitSizes, "output");
  return submit(c10d::OpType::ALLTOALL_BASE, {output}, nbytes(input), When{!opts.asyncOp, opts.timeout},
                [this, output, input, sendBytes, recvBytes]() mutable {
                  at::Tensor in = input.contiguous();
                  onContiguous(output, [&](at::Tensor& c) {
                    plait::coll::alltoall(*comm_, in.data_ptr(), sendBytes, c.data_ptr(), recvBytes);
                  });
                }, false, {input});
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                                      const c10d::AllToAllOptions& opts) {
  const int n = getSize();
  TORCH_CHECK(int(inputs.size()) == n && int(outputs.size()) == n, "plait: all_to_all needs ", n,
              " input and output tensors, got ", inputs.size(), " and ", outputs.size());
  std::vector<size_t> sendBytes, recvBytes;
  for (int i = 0; i < n; ++i) {
    checkTensor(inputs[i], "all_to_all", "input tensor");
    toDType(inputs[i], "all_to_all", "input tensor");
    checkSameKind(outputs[i], inputs[i], "all_to_all", "output tensor");
    sendBytes.push_back(nbytes(inputs[i]));
    recvBytes.push_back(nbytes(outputs[i]));
  }
  size_t total = std::accumulate(sendBytes.begin(), sendBytes.end(), size_t(0));
  return submit(c10d::OpType::ALLTOALL, outputs, total, When{!opts.asyncOp, opts.timeout}, [this, outputs, inputs, sendBytes, recvBytes]() mutable {
    std::vector<at::Tensor> flat;
    for (auto& i : inputs) flat.push_back(i.reshape({-1}).view(at::kByte));
    at::Tensor in = at::cat(flat);
    size_t rtotal = std::accumulate(recvBytes.begin(), recvBytes.end(), size_t(0));
    at::Tensor out = at::empty({int64_t(rtotal)}, in.options());
    plait::coll::alltoall(*comm_, in.data_ptr(), sendBytes, out.data_ptr(), recvBytes);
    size_t off = 0;
    for (size_t i = 0; i < outputs.size(); ++i) {
      outputs[i].copy_(out.narrow(0, int64_t(off), int64_t(recvBytes[i]))
                           .view(outputs[i].scalar_type())
                           .view(outputs[i].sizes()));
      off += recvBytes[i];
    }
  }, false, inputs);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::send(std::vector<at::Tensor>& tensors, int dstRank, int tag) {
  checkSingle(tensors, "send");
  checkTensor(tensors[0], "send", "tensor");
  toDType(tensors[0], "send", "tensor");
  TORCH_CHECK(dstRank >= 0 && dstRank < getSize() && dstRank != getRank(), "plait: send: invalid destination rank ",
              dstRank, " from rank ", getRank(), " (group size ", getSize(), ")");
  return submit(
      c10d::OpType::SEND, tensors, nbytes(tensors[0]), false,
      [this, tensors, dstRank, tag]() {
        // CUDA tensors go through host memory (on the communication stream, after the caller's work).
        at::Tensor c = tensors[0].is_cuda() ? tensors[0].to(at::kCPU) : tensors[0].contiguous();
        postP2P(current_, c, at::Tensor(), [&](AnyDone done) {
          comm_->isend(c.data_ptr(), nbytes(c), dstRank, tag,
                       [done](const std::string* error) { done(error, -1); });
        });
      },
      true);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) {
  checkSingle(tensors, "recv");
  checkTensor(tensors[0], "recv", "tensor");
  toDType(tensors[0], "recv", "tensor");
  TORCH_CHECK(srcRank >= 0 && srcRank < getSize() && srcRank != getRank(), "plait: recv: invalid source rank ",
              srcRank, " at rank ", getRank(), " (group size ", getSize(), ")");
  return submit(
      c10d::OpType::RECV, tensors, nbytes(tensors[0]), false,
      [this, tensors, srcRank, tag]() {
        at::Tensor c = tensors[0].is_cuda() ? at::empty(tensors[0].sizes(), tensors[0].options().device(at::kCPU))
                                            : tensors[0].contiguous();
        postP2P(current_, c, tensors[0], [&](AnyDone done) {
          comm_->irecv(c.data_ptr(), nbytes(c), srcRank, tag,
                       [done, srcRank](const std::string* error) { done(error, error ? -1 : srcRank); });
        });
      },
      true);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  checkSingle(tensors, "recv (any source)");
  checkTensor(tensors[0], "recv (any source)", "tensor");
  toDType(tensors[0], "recv (any source)", "tensor");
  TORCH_CHECK(getSize() > 1, "plait: recv (any source): rank ", getRank(), " is alone in its group (no source)");
  return submit(
      c10d::OpType::RECVANYSOURCE, tensors, nbytes(tensors[0]), false,
      [this, tensors, tag]() {
        at::Tensor c = tensors[0].is_cuda() ? at::empty(tensors[0].sizes(), tensors[0].options().device(at::kCPU))
                                            : tensors[0].contiguous();
        postP2P(current_, c, tensors[0], [&](AnyDone done) { comm_->irecvAny(c.data_ptr(), nbytes(c), tag, done); });
      },
      true);
}

c10::intrusive_ptr<c10d::Work> PlaitBackend::barrier(const c10d::BarrierOptions& opts) {
  return submit(c10d::OpType::BARRIER, {}, 0, When{!opts.asyncOp, opts.timeout}, [this]() { plait::coll::barrier(*comm_); });
}

void PlaitBackend::monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) {
  auto timeout = opts.timeout.count() > 0 ? opts.timeout : comm_->timeout();
  auto work = submit(c10d::OpType::BARRIER, {}, 0, When{!opts.asyncOp, opts.timeout}, [this, timeout, waitAllRanks]() {
    plait::coll::monitoredBarrier(*comm_, timeout, waitAllRanks);
  });
  work->wait();
}

}  // namespace plait_torch
