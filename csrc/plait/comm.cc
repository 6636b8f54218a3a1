#include "plait/comm.h"
#include "plait/device.h"

#include <fcntl.h>
#include <sched.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <condition_variable>
#include <cxxabi.h>
#include <map>
#include <random>
#include <thread>

#include "plait/algo/cost_model.h"
#include "plait/transport/auth.h"
#include "plait/transport/shm.h"
#include "plait/transport/tcp.h"

namespace plait {

const char* collName(Coll c) {
  switch (c) {
    case Coll::kAllreduce: return "all_reduce";
    case Coll::kBroadcast: return "broadcast";
    case Coll::kReduce: return "reduce";
    case Coll::kAllgather: return "all_gather";
    case Coll::kReduceScatter: return "reduce_scatter";
    case Coll::kAlltoall: return "all_to_all";
    case Coll::kGather: return "gather";
    case Coll::kScatter: return "scatter";
    case Coll::kBarrier: return "barrier";
    case Coll::kSendRecv: return "send/recv";
    case Coll::kMonitoredBarrier: return "monitored_barrier";
  }
  return "?";
}

Comm::Comm(std::shared_ptr<Store> store, int rank, int size, std::chrono::milliseconds timeout, const Options& opts)
    : rank_(rank), size_(size), timeoutMs_(int64_t(timeout.count())),
      trace_(std::make_shared<FlightRecorder>(knobs().traceBuffer)) {
  PLAIT_CHECK(size >= 1 && rank >= 0 && rank < size, "plait: invalid rank ", rank, " of world size ", size);
  algo_ = parseAlgo(opts.algo.empty() ? knobs().algo : opts.algo);
  chunkBytes_ = std::max<size_t>(1, opts.chunkBytes ? opts.chunkBytes : knobs().chunkBytes);
  p2pSendSeq_.assign(size, 0);
  p2pRecvSeq_.assign(size, 0);
  sendQ_.resize(size);
  recvQ_.resize(size);
  p2pRecvQ_.resize(size);
  unexpected_.resize(size);
  in_.resize(size);
  store_ = store;
  Bootstrap b = bootstrap(*store, rank, size, timeout, opts, algo_, chunkBytes_);
  // After the bootstrap: a constructor that throws runs no destructor, and a failed init must leak nothing.
  wakeFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  PLAIT_CHECK(wakeFd_ >= 0, "plait: rank ", rank, ": eventfd failed: ", std::strerror(errno));
  prefix_ = std::move(b.prefix);
  shm_ = std::move(b.shm);
  tcp_ = std::move(b.tcp);
  channels_ = std::move(b.channels);
  hostOf_ = std::move(b.hostOf);
  hostRanks_ = std::move(b.hostRanks);
  topo_ = b.topo;
  oversubscribed_ = b.oversubscribed;
  reduceThreads_ = b.reduceThreads;
  serverLinks_ = std::move(b.serverLinks);
  servers_ = b.servers;
  TraceMeta meta;
  meta.rank = rank;
  meta.size = size;
  meta.group = opts.groupName;
  if (int(opts.globalRanks.size()) == size) meta.globalRanks = opts.globalRanks;
  meta.groupId = b.uuid;
  meta.host = b.hostId;
  meta.storePrefix = prefix_;
  meta.store = store_;
  trace_->start(std::move(meta));
}

void Comm::setDevice(int device, void* stream) {
  if (!dev_ && !hostOps_) {
    const bool oneHost = deviceSupported();
    const std::string& mode = knobs().hostPath;
    auto make = [&](double pcieGBps) {
      if (knobs().device == "emulate") return makeEmulatedDeviceOps(timeout(), pcieGBps);
      std::string why;
      auto ops = makeCudaDeviceOps(&why);
      PLAIT_CHECK(ops, "plait: rank ", rank_, ": CUDA device collectives are unavailable: ", why);
      return ops;
    };
    if (oneHost && mode != "force") {
      auto ops = make(0);
      ops->bind(device, stream);  // the engine's setup already allocates and maps on this device
      dev_ = std::make_unique<DeviceEngine>(rank_, size_, [this] { checkDevicePeers(); }, *store_, prefix_,
                                            std::move(ops), knobs().deviceBufferBytes);
    }
    if (!oneHost || mode != "off") {
      hostOps_ = make(knobs().emuPcieGBps);
      hostOps_->setPoll([this] { checkDevicePeers(); });
    }
    stage_ = dev_ ? Stage::kDevice : oneHost ? Stage::kHostShared : Stage::kHostPrivate;
  }
  hasDev_ = dev_ != nullptr;
  if (dev_) dev_->ops().bind(device, stream);
  if (hostOps_) {
    hostOps_->bind(device, stream);
    hostOps_->setWaitTimeout(timeout());
  }
  devActive_ = true;
  eng_ = dev_.get();
  topo_.device = dev_ != nullptr;
}

void Comm::clearDevice() {
  // Leave device mode whatever flush does: a throw must not leave the next host call thinking it is on the device.
  const bool flush = devActive_ && dev_ != nullptr;
  devActive_ = false;
  topo_.device = false;
  if (flush) dev_->flush();
}

void Comm::checkDeviceErrors() {
  // The device flags a transfer whose size or collective disagrees (it cannot throw); the host sees the flag once the
  // device has run that far: at once with the emulation, at a later call on a GPU.
  std::string m = dev_ ? dev_->mismatch() : "";
  if (m.empty() && hostEng_) m = hostEng_->mismatch();
  if (!m.empty()) fail(cat(m, " (seen at ", where(), ")"));
}

void Comm::checkDevicePeers() {
  checkAbort();  // abort() / destroy with work in flight ends the host's waits too
  if (shm_) {
    std::string why;
    int by = shm_->abortedBy(&why);
    if (by >= 0)
      fail(cat("plait: rank ", rank_, ": ", where(), " (device) aborted because peer rank ", by, " failed: ", why), true);
  }
  // Liveness locks (transport/shm.h), not process ids: one fcntl per peer, valid across PID namespaces.
  int gone = dev_ ? dev_->gonePeer() : -1;
  if (gone < 0 && hostEng_) gone = hostEng_->gonePeer();
  for (int p = 0; p < size_ && gone < 0; ++p)
    if (p != rank_ && shm_ && channels_[p] && channels_[p]->kind() == TransportKind::kShm && shm_->peerGone(p))
      gone = p;
  if (gone >= 0) fail(cat("plait: rank ", rank_, ": peer rank ", gone, " (same host) died during ", where(), " (device)"));
  // A live peer that never reaches what this rank's stream waits for: the group's timeout, as on the host engine
  // (CUDA: the host never waits for the stream, so the backend's watchdog asks here).
  std::string stall = dev_ ? dev_->stalled(timeout()) : "";
  if (stall.empty() && hostEng_) stall = hostEng_->stalled(timeout());
  if (!stall.empty()) fail(stall);
}

std::string Comm::deviceEngineName() const {
  if (dev_) return dev_->name();
  if (!hostOps_) return "";
  return cat(hostOps_->name(), stage_ == Stage::kHostShared ? " host path" : " via host");
}

void Comm::localCopy(void* dst, const void* src, size_t bytes) {
  if (devActive_ && eng_) eng_->copy(dst, src, bytes);
  else if (devActive_) hostOps_->copy(dst, src, bytes);
  else if (bytes && dst != src) std::memmove(dst, src, bytes);
}

void Comm::localReduce(RedOp op, DType dtype, void* dst, const void* a, const void* b, size_t count) {
  if (devActive_ && eng_) eng_->reduce(op, dtype, dst, a, b, count);
  else if (devActive_) hostOps_->reduce(op, dtype, dst, a, b, count);
  else plait::reduce(op, dtype, dst, a, b, count, reduceThreads());
}

namespace {
// Marks "inside a staged device collective" for the duration of one call (pointers are in the staging buffer).
struct StagedScope {
  bool& flag;
  explicit StagedScope(bool& f) : flag(f) { flag = true; }
  ~StagedScope() { flag = false; }
};
}  // namespace

void Comm::withStage(Stage s, const std::function<void()>& body) {
  PLAIT_CHECK(s == stage_ || (s == Stage::kHostShared && hostPathBeside()) || (s == Stage::kDevice && dev_),
              "plait: internal: staging ", int(s), " unavailable");
  struct Restore {
    Comm& c;
    Stage s;
    ~Restore() { c.stage_ = s; }
  } r{*this, stage_};
  stage_ = s;
  body();
}

char* Comm::stageBuf(size_t need) {
  switch (stage_) {
    case Stage::kDevice:
      dev_->reserve(need);
      return dev_->staging();
    case Stage::kHostShared:
      if (!hostEng_) {
        // Created at the first use, which every local rank reaches at the same call (the decision is agreed): the
        // engine's setup exchanges flag segments. Its staging is allocated by the CPU operations and pinned once
        // per growth with the device's (hostOps_).
        auto cpu = makeEmulatedDeviceOps(timeout(), 0, knobs().device == "emulate" ? nullptr : hostOps_.get());
        hostEng_ = std::make_unique<DeviceEngine>(rank_, size_, [this] { checkDevicePeers(); }, *store_,
                                                  prefix_ + "hp/", std::move(cpu), need);
      }
      if (need > hostEng_->capacity()) hostOps_->waitIdle();  // copies may still use the old buffer
      hostEng_->reserve(need);
      return hostEng_->staging();
    case Stage::kHostPrivate:
      break;
  }
  if (need > hostStageBytes_) {
    hostOps_->waitIdle();  // copies out of the old buffer may still be in flight
    if (hostStage_) hostOps_->releaseHost(hostStage_);
    hostStage_ = nullptr;
    hostStageBytes_ = 0;
    hostStage_ = static_cast<char*>(hostOps_->allocHost(std::max<size_t>(need, 4096)));
    hostStageBytes_ = std::max<size_t>(need, 4096);
  }
  return hostStage_;
}

size_t Comm::stageSlice() const {
  switch (stage_) {
    case Stage::kDevice: return dev_->capacity();
    case Stage::kHostShared: return std::max(knobs().deviceBufferBytes, knobs().hostChunkBytes);
    case Stage::kHostPrivate: break;
  }
  return std::numeric_limits<size_t>::max();
}

uint64_t Comm::stageIn(void* dst, const void* src, size_t bytes) {
  if (stage_ == Stage::kDevice) {
    dev_->copy(dst, src, bytes);
    return 0;
  }
  if (!forked_) {
    hostOps_->fork();
    forked_ = true;
  }
  // Peers may still be reading this part of the shared staging (the CPU engine's pulls of an earlier chunk).
  if (stage_ == Stage::kHostShared) hostEng_->awaitReaders(dst, bytes);
  downloaded_ = true;
  return lastIn_ = hostOps_->download(dst, src, bytes);
}

void Comm::stageOut(void* dst, const void* src, size_t bytes) {
  if (stage_ == Stage::kDevice) return dev_->copy(dst, src, bytes);
  if (!forked_) {
    hostOps_->fork();
    forked_ = true;
  }
  hostOps_->upload(dst, src, bytes);
}

void Comm::stageFence() {
  if (stage_ != Stage::kDevice && forked_) hostOps_->fence();
}

void Comm::stageWaitUploads() {
  if (stage_ != Stage::kDevice) hostOps_->waitUploads();
}

void Comm::stageDone() {
  downloaded_ = false;
  if (hostOps_ && forked_) {
    forked_ = false;
    hostOps_->join();
  }
}

void Comm::runStaged(const std::function<void()>& body, uint64_t ticket) {
  if (stage_ == Stage::kDevice) {
    StagedScope s(devStaged_);
    body();
    return;
  }
  if (ticket != ~uint64_t(0)) hostOps_->waitDownload(ticket);
  else if (downloaded_) hostOps_->waitDownload(lastIn_);
  else hostOps_->waitUploads();  // nothing came in: the body may write staging that uploads still read
  if (stage_ == Stage::kHostPrivate) return runOnHost(body);
  // The CPU engine: the same device-mode verbs, executed by the host over the shared staging.
  struct EngineScope {
    Comm& c;
    DeviceEngine* was;
    ~EngineScope() { c.eng_ = was; }
  } e{*this, eng_};
  eng_ = hostEng_.get();
  hostEng_->ops().setWaitTimeout(timeout());
  StagedScope s(devStaged_);
  body();
}


DeviceOps& Comm::deviceOps() {
  PLAIT_CHECK(dev_, "plait: internal: no device engine");
  return dev_->ops();
}

void Comm::syncDevice() {
  if (dev_) {
    dev_->ops().setWaitTimeout(timeout());
    dev_->ops().waitIdle();
  }
  if (hostOps_) hostOps_->waitIdle();
}

void Comm::guardStaged(const std::function<void()>& body) {
  try {
    body();
  } catch (...) {
    // Nothing the host path queued may touch user or staging memory once the error is out, and the next call must
    // start from a clean state (its copy streams forked from the bound stream again).
    if (hostOps_) hostOps_->abandon(false);
    forked_ = downloaded_ = false;
    lastIn_ = 0;
    if (failure_.empty()) {
      try {
        throw;
      } catch (const PeerFailed& e) {
        fail(e.what(), true);
      } catch (const std::exception& e) {
        fail(cat(e.what(), " (", where(), ", device collective)"));
      }
    }
    throw;
  }
}

void Comm::runOnHost(const std::function<void()>& body) {
  // Leaves device mode for the duration of the call and comes back to it whatever way the call ends.
  struct HostScope {
    Comm& c;
    bool device;
    explicit HostScope(Comm& comm) : c(comm), device(comm.topo_.device) {
      c.devActive_ = false;
      c.topo_.device = false;
    }
    ~HostScope() {
      c.devActive_ = true;
      c.topo_.device = device;
    }
  } h(*this);
  body();
}

void Comm::setStageScratchBase(size_t off) {
  if (stage_ == Stage::kDevice) dev_->setScratchBase(off);
  else if (stage_ == Stage::kHostShared && hostEng_) hostEng_->setScratchBase(off);
}

Comm::~Comm() {
  if (wakeFd_ >= 0) close(wakeFd_);
  dev_.reset();
  if (hostOps_) {
    hostOps_->abandon(true);  // after a failure copies may still be queued: none may outlive the staging
    hostEng_.reset();         // unpins its staging with hostOps_
    if (hostStage_) hostOps_->releaseHost(hostStage_);
  }
  if (knobs().debug >= 2)
    logInfo(cat("rank ", rank_, " stats: ", stats_.collectives, " collectives, ", stats_.spinsIdle, " idle spins, ",
                stats_.yields, " yields, ", stats_.sleeps, " sleeps"));
}

std::string Comm::where() const { return cat("rank ", rank_, ", ", collName(ctx_.coll), " seq ", seq_); }

namespace {
// Failure-bookkeeping threads still talking to a store (see recordFailure): past a few, the store is not answering
// and more threads would only queue behind the same dead connection.
std::atomic<int> gStoreThreads{0};
constexpr int kMaxStoreThreads = 4;
}  // namespace

std::string Comm::recordFailure(const std::string& what, bool wantOrigin) {
  // The store's part of a failure: look up the first failure in the group (one key, written once by the rank that
  // wins an add on "failures"; only when wantOrigin), then record this one. It runs on a thread of its own and the
  // failing thread waits for both at most a second: with the store's host gone silent (no FIN, no RST), a store
  // round trip blocks for the store's own timeout or longer, and the error must reach the caller now. What did not
  // finish in time costs the message its "first failure" detail (and the group its record, if it never gets
  // through); the thread finishes, or stays blocked in the store client, on its own: it holds nothing of this
  // communicator but the store. While it is blocked, other users of the same store client may wait behind it (the
  // store is not answering them either).
  struct Outcome {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::string origin;
  };
  if (gStoreThreads.load() >= kMaxStoreThreads) return "";
  auto out = std::make_shared<Outcome>();
  std::shared_ptr<Store> store = store_;
  const std::string prefix = prefix_, mine = cat("rank ", rank_, ": ", what);
  // With PLAIT_TRACE_DIR set, the group's other ranks are asked to write their flight records too (trace.h).
  const bool askDumps = trace_->enabled() && !knobs().traceDir.empty();
  gStoreThreads.fetch_add(1);
  try {
    std::thread([out, store, prefix, mine, wantOrigin, askDumps] {
      std::string origin;
      try {
        const std::string key = cat(prefix, "failed/first");
        if (wantOrigin && store->check(key)) {
          std::string v = store->get(key);
          if (!v.empty()) origin = cat(" (first failure in the group: ", v, ")");
        }
        if (store->add(cat(prefix, "failures"), 1) == 1) {
          store->set(cat(prefix, "failed/first"), mine);
          if (askDumps) store->set(cat(prefix, "trace/dump"), mine);
        }
      } catch (abi::__forced_unwind&) {
        gStoreThreads.fetch_sub(1);
        throw;  // thread cancellation (pthread_exit while the interpreter finalizes): must not be swallowed
      } catch (...) {
        // the store may be gone with the failed rank: report what this rank saw
      }
      {
        std::lock_guard<std::mutex> g(out->m);
        out->origin = std::move(origin);
        out->done = true;
      }
      out->cv.notify_all();
      gStoreThreads.fetch_sub(1);
    }).detach();
  } catch (...) {
    gStoreThreads.fetch_sub(1);
    return "";  // no thread to be had: the failure goes on without the store
  }
  auto wait = timeout();
  if (wait.count() <= 0 || wait > std::chrono::milliseconds(1000)) wait = std::chrono::milliseconds(1000);
  std::unique_lock<std::mutex> lk(out->m);
  out->cv.wait_for(lk, wait, [&] { return out->done; });
  return out->done ? out->origin : std::string();
}

void Comm::fail(const std::string& what, bool secondHand) {
  // A rank that learns of a failure second-hand (abort flag, a peer hanging up) adds what the first one saw: from
  // the failed peer's control connection if it said anything, else from the store.
  // Peers hear of the failure before any store round trip (shared-memory abort flags, TCP control connections), so a
  // dead store host costs nobody a timeout. What a failed TCP peer said on its control connection (local, at most
  // 50 ms) goes with it, so the original cause travels on; the store's record of the first failure is looked up
  // after the peers were told.
  const bool first = failure_.empty();
  std::string msg = what;
  std::string heard;
  if (first && !secondHand && tcp_) {
    heard = heardFromTcpPeers(std::chrono::milliseconds(50));
    if (!heard.empty()) msg = cat(what, " (", heard, ")");
  }
  if (first) {
    if (shm_) shm_->abortPeers(msg);
    if (tcp_) tellTcpPeers(msg);
  }
  if (first) {
    std::string origin = recordFailure(what, !secondHand && heard.empty());
    if (!secondHand && heard.empty()) msg = what + origin;
    failure_ = msg;
    // The flight record: the entries in flight fail with the message, and the record is written (PLAIT_TRACE_DIR).
    trace_->failed(msg);
    trace_->dumpOnFailure(msg);
  }
  std::vector<Done> toNotify;
  for (auto* qs : {&sendQ_, &recvQ_, &p2pRecvQ_})
    for (auto& q : *qs) {
      for (Xfer* x : q)
        if (x->onDone) toNotify.push_back(std::move(x->onDone));
      q.clear();
    }
  std::vector<AnyDone> anyNotify;
  for (auto& a : anyQ_) anyNotify.push_back(std::move(a.done));
  anyQ_.clear();
  for (auto& u : unexpected_) u.clear();
  for (auto& i : in_) i = Inbound{};
  pending_ = pendingColl_ = 0;
  if (tcp_) tcp_->abortAll();
  if (serverLinks_) serverLinks_->shutdownAll();  // the servers drop the job and tell the other workers
  if (dev_) dev_->releaseWaits();
  if (hostEng_) hostEng_->releaseWaits();
  // Callbacks must not throw (the torch layer's do not); one that does cannot stop the others from being told.
  for (auto& d : toNotify) try {
      d(&msg);
    } catch (...) {
    }
  for (auto& d : anyNotify) try {
      d(&msg, -1);
    } catch (...) {
    }
  throw Error(msg);
}

void Comm::tellTcpPeers(const std::string& msg) {
  // Each TCP peer pair has a control connection beside the data streams, idle until a rank fails: then the
  // failing rank writes its error there (a few hundred bytes, always fits the socket buffer), so the cause
  // travels with the failure even when the data stream stopped mid-message and the rendezvous store died with
  // the failed rank.
  const size_t n = std::min<size_t>(msg.size(), 1024);
  std::vector<char> frame(sizeof(WireHeader) + n);
  WireHeader h{kAbortMagic, 0, 0, 0, 0, 0, rank_, 0, n};
  std::memcpy(frame.data(), &h, sizeof(h));
  std::memcpy(frame.data() + sizeof(h), msg.data(), n);
  for (int p = 0; p < size_; ++p)
    if (channels_[p] && channels_[p]->kind() == TransportKind::kTcp)
      send(tcp_->controlFd(p), frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

std::string Comm::heardFromTcpPeers(std::chrono::milliseconds wait) {
  const auto until = Clock::now() + wait;
  std::vector<char> done(size_, 0);  // peers whose control connection ended or said something that is not a frame
  while (true) {
    std::vector<pollfd> fds;
    std::vector<int> who;
    for (int p = 0; p < size_; ++p)
      if (channels_[p] && channels_[p]->kind() == TransportKind::kTcp && !done[p]) {
        fds.push_back(pollfd{tcp_->controlFd(p), POLLIN, 0});
        who.push_back(p);
      }
    if (fds.empty()) return "";
    int ms = int(std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count()));
    if (poll(fds.data(), fds.size(), ms) <= 0) return "";
    for (size_t i = 0; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      char buf[sizeof(WireHeader) + 1024];
      // The frame was written in one send before the peer closed: it is all there or not at all.
      ssize_t r = recv(fds[i].fd, buf, sizeof(buf), MSG_DONTWAIT);
      WireHeader h{};
      if (r >= ssize_t(sizeof(h))) std::memcpy(&h, buf, sizeof(h));
      if (r >= ssize_t(sizeof(h)) && h.magic == kAbortMagic) {
        // The peer's words go into an error message: printable ASCII only (no NULs, no broken UTF-8).
        std::string words(buf + sizeof(h), std::min<size_t>(h.bytes, size_t(r) - sizeof(h)));
        for (char& c : words)
          if ((static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != '\t') || static_cast<unsigned char>(c) > 0x7e)
            c = '?';
        return cat("peer rank ", who[i], " failed first: ", words);
      }
      // End of stream, an error, or bytes that are not a frame: nothing more will come from this peer; an EAGAIN
      // (a spurious wake-up) polls it again. Either way the loop does not spin on a socket that stays readable.
      if (r != -1 || (errno != EAGAIN && errno != EINTR)) done[size_t(who[i])] = 1;
    }
    if (Clock::now() >= until) return "";
  }
}

void Comm::requestAbort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(abortMu_);
    if (abortWhy_.empty()) abortWhy_ = why.empty() ? std::string("plait: the process group was aborted") : why;
  }
  abortRequested_.store(true, std::memory_order_release);
  interrupt();
}

void Comm::abortNow(const std::string& why) noexcept {
  requestAbort(why);
  try {
    checkAbort();
  } catch (...) {
  }
}

void Comm::checkAbort() {
  if (!abortRequested_.load(std::memory_order_acquire) || !failure_.empty()) return;
  std::string why;
  {
    std::lock_guard<std::mutex> lk(abortMu_);
    why = abortWhy_;
  }
  fail(cat("plait: rank ", rank_, ": ", why), true);
}

}  // namespace plait
