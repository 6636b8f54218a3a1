// A communicator: one process group's ranks, their channels (shared memory or TCP per peer, set up by bootstrap.h),
// the failure state of the group (comm.cc), and the engine (engine.cc) that every algorithm (algo/collectives.h) is
// written against: post a send / receive / receive-and-reduce
// of a byte range to a peer, then wait for all of them with a deadline. Every message starts with a WireHeader so
// that ranks which disagree about a collective fail loudly instead of corrupting data.
#pragma once

#include <poll.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "plait/bootstrap.h"
#include "plait/xfer.h"
#include "plait/common.h"
#include "plait/kernels/codec.h"
#include "plait/kernels/reduce.h"
#include "plait/store.h"
#include "plait/trace.h"
#include "plait/transport/channel.h"

namespace plait {

class DeviceEngine;
class DeviceOps;

// The host path beside the device engine (one host, device tensors): rates measured once per group
// (Comm::hostSplit), identical on every rank. Rates are of the buffer (algorithm bandwidth), in GB/s.
struct HostPathRates {
  bool measured = false;
  double pcieGBps = 0;    // per direction, downloads and uploads at once
  double sumGBps = 0;     // the CPU's all-reduce of the shared page-locked staging among the local ranks
  double deviceGBps = 0;  // the device engine's all-reduce
  double pathGBps = 0;    // the host path end to end (pipelined), when measured: bounds min(pcie, sum) (0: unknown)
  double hostCallUs = 0, deviceCallUs = 0;  // each path's fixed cost per call
};
// The planner's answer (algo/cost_model.h, planHostSplit).
struct HostSplit {
  double share = 0;  // of the buffer, through the host path
  double predictedUs = 0, deviceOnlyUs = 0, hostOnlyUs = 0;
  std::string why;
};

class Comm {
 public:
  Comm(std::shared_ptr<Store> store, int rank, int size, std::chrono::milliseconds timeout, const Options& opts);
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const Topology& topology() const { return topo_; }
  // host index -> its ranks (increasing; the leader first), and rank -> host index.
  const std::vector<std::vector<int>>& hostRanks() const { return hostRanks_; }
  const std::vector<int>& hostOf() const { return hostOf_; }
  // The current collective's sequence number (carried in every message header).
  uint32_t seq() const { return seq_; }
  Algo forcedAlgo() const { return algo_; }
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(timeoutMs_.load(std::memory_order_relaxed)); }
  // Any thread (the torch layer sets it from the caller's thread while the worker reads it).
  void setTimeout(std::chrono::milliseconds t) { timeoutMs_.store(int64_t(t.count()), std::memory_order_relaxed); }

  // ---- device buffers (plait/device.h) ----
  // While set, the collectives below take device pointers (CUDA, or PLAIT_DEVICE=emulate) and enqueue their work on
  // `stream` (a cudaStream_t) without waiting for it; point-to-point and barrier stay on the host. Every rank of the
  // group must make the same collective calls in device mode. Needs deviceSupported().
  void setDevice(int device, void* stream);
  void clearDevice();
  bool onDevice() const { return devActive_; }
  // Every rank is on this host (the same answer on every rank): device collectives run over the device engine.
  // Otherwise they stage through page-locked host memory and run on the host engine (the host waits for the copies).
  bool deviceSupported() const { return topo_.nhosts == 1; }
  // "cuda" / "emulated" (device engine, maybe with the host path beside it), "cuda host path" / "emulated host path"
  // (one host, PLAIT_HOST_PATH=force), "cuda via host" / "emulated via host" (several hosts), or "" before the first
  // device call.
  std::string deviceEngineName() const;
  // Throws (telling the peers) if a peer failed or its process is gone: for hosts that wait on device flags, and
  // for the backend's watchdog while device work may be waiting on a peer (a failure releases the waits).
  void checkDevicePeers();
  bool hasDeviceEngine() const { return hasDev_.load(std::memory_order_acquire); }
  // Throws (telling the peers) if the device flagged a size disagreement with a peer.
  void checkDeviceErrors();
  // Local work in the collective's order: host memmove / reduction, or stream-ordered on the device.
  void localCopy(void* dst, const void* src, size_t bytes);
  void localReduce(RedOp op, DType dtype, void* dst, const void* a, const void* b, size_t count);

  // Point-to-point transfers are posted and return at once; `done` runs (with nullptr, or the error message) when
  // the transfer finishes, from whichever thread drives the engine (a collective's wait, or progressP2P).
  // Sends and receives to one peer are matched in the order they are posted; tags must agree.
  using Done = plait::Done;
  void isend(const void* buf, size_t bytes, int peer, int tag, Done done);
  void irecv(void* buf, size_t bytes, int peer, int tag, Done done);
  // Receive from whichever peer's next point-to-point message with this tag arrives first (torch's recvAnysource).
  // `done` gets the error (or nullptr) and the source rank (-1 on error). Matching is per peer in posting order, as
  // for irecv; a message of another size from the chosen peer is an error naming both sizes.
  using AnyDone = std::function<void(const std::string* error, int src)>;
  void irecvAny(void* buf, size_t bytes, int tag, AnyDone done);
  // Drives pending point-to-point transfers for at most `budget`; returns whether some are still pending.
  bool progressP2P(std::chrono::microseconds budget);
  // Thread-safe: makes a progressP2P running on another thread return early (new work has arrived).
  void interrupt();
  // Thread-safe (any thread, while another drives the engine or not): fails the communicator with `why`; peers are
  // told, pending transfers complete with the error, and the thread driving the engine (if any) throws within
  // milliseconds. Later calls raise. Used by torch's abort()/shutdown() and destroy with work in flight.
  void requestAbort(const std::string& why);
  bool aborted() const { return abortRequested_.load(std::memory_order_acquire); }
  // On the thread that drives the engine: fails the communicator with the abort's reason if requestAbort was called.
  void throwIfAborted() { checkAbort(); }
  // requestAbort, then fails the communicator at once on this thread (peers told, pending transfers completed with
  // the error). Only while no other thread drives the engine (the torch layer holds its work lock).
  void abortNow(const std::string& why) noexcept;

  // ---- device staging (algo/device_collectives.cc copies each device collective through it) ----
  // True when a collective should take the staged device path (device mode, not yet inside a staged call).
  bool stageOnDevice() const { return devActive_ && !devStaged_; }
  // Where a device collective's buffers are staged:
  //   kDevice: the device engine's staging buffer (device memory local peers map); the schedule runs on the stream.
  //   kHostShared (the host path on one host): page-locked host memory every local rank maps, the staging buffer of a
  //     second DeviceEngine whose operations are the CPU's; buffers are downloaded into it on a copy stream, the
  //     host runs the schedule there (reading and summing peers' staging directly, in the schedule's fixed order),
  //     and the result is uploaded on another copy stream.
  //   kHostPrivate (groups that span hosts): private page-locked memory; the host engine runs the schedule (shared
  //     memory inside a host, TCP between hosts) between the downloads and the uploads.
  enum class Stage : uint8_t { kDevice, kHostShared, kHostPrivate };
  Stage stage() const { return stage_; }
  // kHostShared can be used beside the device engine (one host, PLAIT_HOST_PATH not off).
  bool hostPathBeside() const { return dev_ != nullptr && hostOps_ != nullptr; }
  // Runs body with the staging switched to `s` (the host share of a split collective), restoring it however it ends.
  void withStage(Stage s, const std::function<void()>& body);
  // The staging buffer a device collective copies through: kDevice and kHostShared grow collectively (`need` must
  // be the same on every rank), kHostPrivate locally. Host stages wait for the copies still using the old buffer.
  char* stageBuf(size_t need);
  size_t stageSlice() const;  // bytes an element-wise collective handles per pass
  bool stageGrowsCollectively() const { return stage_ != Stage::kHostPrivate; }
  // Scratch for the schedule starts this far into the staging buffer (no-op for kHostPrivate).
  void setStageScratchBase(size_t off);
  // User memory -> staging (a stream-ordered copy, or a download on the host path's copy stream) and back (a copy,
  // or an upload). stageIn returns the download's ticket (0 on the device engine).
  uint64_t stageIn(void* dst, const void* src, size_t bytes);
  void stageOut(void* dst, const void* src, size_t bytes);
  // Host stages: the next downloads may overwrite staging memory that uploads enqueued so far read.
  void stageFence();
  // Host stages: the host waits for the uploads so far (before it writes staging memory without a download first).
  void stageWaitUploads();
  // Runs a collective's body on the staged pointers: on the device engine's stream, or on the host once the
  // downloads up to `ticket` (default: all so far) have landed, over the shared staging's engine or the host engine.
  void runStaged(const std::function<void()>& body, uint64_t ticket = ~uint64_t(0));
  // End of a device collective: the bound stream waits for the host path's uploads (the host does not).
  void stageDone();
  // The device engine's operations (needs hostPathBeside() or a device engine), and a host wait for everything the
  // device engine's stream and the host path's copy streams have been given (measurements only).
  DeviceOps& deviceOps();
  void syncDevice();
  // Runs one device collective; if it throws, the host path's copies are abandoned (none touches memory after this
  // returns), the staging state is reset and the group is failed (peers are told) before the error propagates.
  void guardStaged(const std::function<void()>& body);
  // The host path's rates, measured once per group by the algorithms (coll::hostSplitFor), identical on every rank.
  // Any thread (Python reads them while the worker may be measuring).
  HostPathRates hostRates() const {
    std::lock_guard<std::mutex> g(ratesMu_);
    return hostRates_;
  }
  void setHostRates(const HostPathRates& r) {
    std::lock_guard<std::mutex> g(ratesMu_);
    hostRates_ = r;
    ++hostMeasurements_;
  }
  // Bytes of device all-reduces that went through the device engine and through the host path (the split, observed),
  // and how many times the rates were measured.
  void countPathBytes(uint64_t device, uint64_t host) {
    deviceBytes_ += device;
    hostBytes_ += host;
  }
  uint64_t deviceEngineBytes() const { return deviceBytes_.load(); }
  uint64_t hostPathBytes() const { return hostBytes_.load(); }
  int hostMeasurements() const { return hostMeasurements_.load(); }
  bool measuringHostPath() const { return measuring_; }
  void setMeasuringHostPath(bool m) { measuring_ = m; }
  // Runs body on the host engine in the middle of a device collective, returning to device mode however it ends.
  void runOnHost(const std::function<void()>& body);

  // ---- engine verbs the algorithms use ----
  using Xfer = plait::Xfer;
  struct CollCtx {
    Coll coll;
    DType dtype;
    RedOp op;
    int root;
    uint64_t count;
    // The schedule this rank runs (schedCode); carried in every message's header so that ranks which chose
    // differently raise instead of exchanging the wrong bytes. 0: the collective has one schedule.
    uint8_t sched = 0;
    // The codec of the collective's codec transfers (all_reduce with compression); the header's root field carries
    // codecWord(spec) so that ranks which disagree on codec or block raise the usual mismatch error.
    codec::Spec spec{};
  };
  static int32_t codecWord(const codec::Spec& s) { return int32_t((uint32_t(s.codec) << 24) | s.block); }
  static uint8_t schedCode(Algo a, bool oneShot = false) { return uint8_t(uint8_t(a) + 1) | (oneShot ? 0x80 : 0); }
  // Set in a compressed all-reduce's schedule code (the header's root field then carries codecWord(spec)).
  static constexpr uint8_t kSchedCompressed = 0x40;
  // Set with kSchedCompressed for AVG (divided before quantizing): ranks mixing SUM and AVG raise.
  static constexpr uint8_t kSchedAverage = 0x20;
  // The summation servers' mixed partition (algo/servers.cc).
  static constexpr uint8_t kSchedServers = 0x10;
  // The current collective (as passed to begin(), with its schedule).
  const CollCtx& ctx() const { return ctx_; }
  // Records the schedule chosen after begin() (before anything is posted).
  void setSchedule(uint8_t code) {
    ctx_.sched = code;
    trace_->setSched(code);
  }
  // The flight recorder (trace.h): the torch layer closes each collective's entry when its task ends.
  FlightRecorder& recorder() { return *trace_; }
  void traceClose() { trace_->close(); }
  // Starts a collective: takes the next sequence number, checks the communicator is healthy.
  void begin(const CollCtx& ctx);
  Xfer* postSend(int peer, const void* buf, size_t bytes, const Xfer* dep = nullptr);
  Xfer* postRecv(int peer, void* buf, size_t bytes, const Xfer* dep = nullptr);
  Xfer* postRecvReduce(int peer, void* buf, size_t bytes, const Xfer* dep = nullptr);
  // Codec transfers of `values` values with the collective's codec (CollCtx::spec), fused into the transport: the
  // sender encodes one segment (whole codec blocks) at a time straight from src and writes it out; the receiver
  // decodes straight out of the ring / receive buffer into dst (rounded to vdt), or adds the decoded values to a
  // float32 accumulator (RecvDecAcc), with no tensor-sized intermediate. A dependency must be a codec transfer of
  // the same number of values (progress is compared in wire bytes).
  Xfer* postSendEnc(int peer, const void* src, size_t values, DType vdt, float div, const Xfer* dep = nullptr);
  Xfer* postRecvDec(int peer, void* dst, size_t values, DType vdt, const Xfer* dep = nullptr);
  // The same values encoded once for every peer in `peers` (one send each, in that order): segments are encoded into
  // a few shared slots and reused by every send, a slot being re-encoded only once every send has written it out.
  void postSendEncShared(const std::vector<int>& peers, const void* src, size_t values, DType vdt, float div,
                         const Xfer* dep = nullptr);
  Xfer* postRecvDecAcc(int peer, float* acc, size_t values, const Xfer* dep = nullptr);
  // Drives every posted transfer to completion. On the deadline: throws naming the peers still pending,
  // or, with throwOnTimeout false, returns false leaving the unfinished transfers to be inspected.
  bool waitAll(std::chrono::milliseconds timeout, bool throwOnTimeout = true);
  void waitAll() { waitAll(timeout()); }
  static bool finished(const Xfer* x);
  // Scratch memory owned by the communicator (grows, reused across collectives).
  char* scratch(size_t bytes);
  // Marks the communicator failed (peers are told), so later calls fail fast; returns the message.
  // `secondHand`: the message already carries the original failure (a local peer's own error), so nothing is added.
  [[noreturn]] void fail(const std::string& msg, bool secondHand = false);
  std::string where() const;  // "rank R, all_reduce seq S"

  // Threads for whole-buffer reductions: PLAIT_THREADS, else the cores this host has per local rank.
  int reduceThreads() const { return reduceThreads_; }

  // ---- summation servers (server/link.h; algo/servers.cc runs the schedule) ----
  // The group's servers (k = 0: none), the same on every rank; the links exist on host leaders only.
  const ServerInfo& servers() const { return servers_; }
  ServerLinks* serverLinks() { return serverLinks_.get(); }
  // The TCP transport (nullptr when no peer is over TCP): tests and fuzz targets reach its sockets.
  TcpDomain* tcpDomain() { return tcp_.get(); }
  // Bytes of all-reduces that went through the servers and through the workers' own schedule (this rank's view).
  void countServerBytes(uint64_t viaServers, uint64_t viaWorkers) {
    serverBytes_ += viaServers;
    workerBytes_ += viaWorkers;
  }
  uint64_t serverBytes() const { return serverBytes_.load(); }
  uint64_t workerBytes() const { return workerBytes_.load(); }

 private:
  struct Peer;
  // The failure's store bookkeeping (look up the group's first failure when wantOrigin, then record this one),
  // bounded in time whatever state the store is in; returns " (first failure in the group: ...)" or "".
  std::string recordFailure(const std::string& what, bool wantOrigin);
  bool progressPass();
  void retire(Xfer* x);
  void trimXfers();
  bool advanceSend(Xfer* x);
  // Moves payload (and padding) of a receive whose header was matched.
  bool advanceRecv(Xfer* x);
  // Codec transfers: encode a segment and write it out / decode whole blocks straight out of the channel.
  bool advanceSendEnc(Xfer* x);
  bool advanceRecvDec(Xfer* x);
  size_t codecLimit(const Xfer* x) const;
  // Encodes the shared stream's next segment if its dependency and a free slot allow.
  void produceShared(EncShared& e);
  bool canProduceShared(const EncShared& e) const;
  // A shared-encoder send between segments: its next segment is encoded, or can be encoded now.
  bool sharedSegmentReady(const Xfer* x) const;
  std::deque<EncShared> encShared_;  // this collective's shared encoders
  // The receive side of one peer's stream: reads the next header, hands the message to the collective receive or the
  // point-to-point receive it belongs to (point-to-point messages nobody has asked for yet are buffered, so a
  // collective behind them on the stream can go on), then moves its payload.
  bool progressRecv(int peer);
  bool wantRead(int peer) const;
  // Binds a point-to-point header that just arrived from `peer` to a posted receive (directed, else any-source);
  // false: nobody has asked for it yet.
  bool bindP2P(int peer, const WireHeader& h);
  // Completes posted point-to-point receives from messages already buffered.
  void matchUnexpected(int peer);
  // The same, outside drive(): a mismatch (or a completion that raises) fails the communicator as drive() would.
  void matchUnexpectedOrFail(int peer);
  Xfer* bindAny(size_t anyIndex, int peer);
  void checkHeader(const Xfer* x, const WireHeader& got) const;
  // Drives the engine until `pendingColl_` is 0 or, with p2pOnly, until no point-to-point transfer is pending,
  // the deadline passes, or interrupt() is called.
  bool drive(Clock::time_point deadline, bool p2pOnly, bool throwOnTimeout, std::chrono::milliseconds timeout);
  // Sleeps until a peer may have changed something (doorbell or poll); true if it found work instead.
  bool slowWait(bool anyShm, bool anyTcp);
  void addTcpPollFds(std::vector<struct pollfd>& fds) const;
  Xfer* post(Xfer::Kind kind, int peer, void* buf, size_t bytes, const Xfer* dep);
  void checkP2PDeadlines(Clock::time_point now);
  void drainWake();
  // A point-to-point transfer's flight-recorder entry (dir 0 send, 1 receive), closed when `done` runs.
  Done traced(Done done, uint32_t seq, uint8_t dir, int tag, size_t bytes, int peer);
  // Fails the communicator if requestAbort was called (on the thread that drives the engine).
  void checkAbort();
  void checkPeersAlive();
  // A same-host peer that exited: everything this rank still waits to receive from it is in the ring already.
  bool goneDataSuffices(int p) const;
  void tellTcpPeers(const std::string& msg);
  // A failed TCP peer's last words from its control connection ("peer rank P failed first: ..."), or "".
  std::string heardFromTcpPeers(std::chrono::milliseconds wait);
  // The TCP sockets the pending transfers wait on (readable for receives, writable for sends that can move).
  std::string describePending() const;

  int rank_, size_;
  std::atomic<int64_t> timeoutMs_;
  std::shared_ptr<FlightRecorder> trace_;
  Algo algo_ = Algo::kAuto;
  size_t chunkBytes_;
  Topology topo_;
  std::shared_ptr<Store> store_;
  std::string prefix_;  // this incarnation's store keys
  std::unique_ptr<ShmDomain> shm_;
  std::unique_ptr<TcpDomain> tcp_;
  std::vector<std::unique_ptr<Channel>> channels_;
  std::vector<int> hostOf_;
  std::vector<std::vector<int>> hostRanks_;  // host index -> its ranks, increasing; the leader is the first
  // engine state
  CollCtx ctx_{};
  uint32_t seq_ = 0;
  std::vector<uint32_t> p2pSendSeq_, p2pRecvSeq_;
  // Receive side of each peer's stream (progressRecv): the header being read, and the message it was bound to.
  struct Unexpected {  // a point-to-point message that arrived before its receive was posted
    WireHeader hdr{};
    std::vector<char> data;
    size_t got = 0;  // payload bytes, then padding
    // data grows as the payload arrives (never to more than twice what came): the declared size is the header's.
    bool complete() const { return got == hdr.bytes + ((8 - hdr.bytes % 8) % 8); }
  };
  struct Inbound {
    WireHeader hdr{};
    size_t hdrDone = 0;
    Xfer* x = nullptr;          // bound to a posted receive
    Unexpected* unx = nullptr;  // being buffered
    bool quiet = false;         // the peer closed its stream while only a receive from any source listened
  };
  struct AnyRecv {
    char* buf;
    size_t len;
    int tag;
    AnyDone done;
    Clock::time_point deadline;
  };
  std::vector<Inbound> in_;
  std::vector<std::deque<Unexpected>> unexpected_;
  std::vector<std::deque<Xfer*>> p2pRecvQ_;
  std::deque<AnyRecv> anyQ_;
  int wakeFd_ = -1;  // eventfd in every poll set: interrupt() wakes a thread sleeping in poll(2)
  std::deque<Xfer> xfers_;     // host engine transfers (collective and point-to-point)
  std::deque<Xfer> devXfers_;  // device mode: the current device collective's transfers (enqueued at waitAll)
  std::vector<std::deque<Xfer*>> sendQ_, recvQ_;
  size_t pending_ = 0;      // every posted transfer not yet finished
  size_t pendingColl_ = 0;  // those of them that belong to the current collective
  ReduceFn reduceFn_ = nullptr;
  size_t elemBytes_ = 1;
  std::vector<char> scratch_;
  std::string failure_;
  bool oversubscribed_ = false;
  int reduceThreads_ = 1;
  struct Stats {
    uint64_t collectives = 0, yields = 0, sleeps = 0, spinsIdle = 0;
  } stats_;  // printed at destruction with PLAIT_DEBUG=TRACE
  std::atomic<bool> interrupt_{false};
  Clock::time_point lastPeerCheck_{}, lastDevCheck_{};
  std::atomic<bool> abortRequested_{false};
  std::mutex abortMu_;
  std::string abortWhy_;
  std::unique_ptr<DeviceEngine> dev_;      // one host: the device engine
  std::unique_ptr<DeviceOps> hostOps_;     // the host path's downloads and uploads (both stages through host memory)
  std::unique_ptr<DeviceEngine> hostEng_;  // kHostShared: the CPU engine over staging shared by the local ranks
  DeviceEngine* eng_ = nullptr;            // the engine device-mode verbs go to: dev_, or hostEng_ (kHostShared)
  Stage stage_ = Stage::kDevice;
  uint64_t lastIn_ = 0;                    // the last download's ticket
  bool forked_ = false;                    // the copy streams have waited for the bound stream in this collective
  bool downloaded_ = false;                // this collective downloaded something (lastIn_ is its)
  mutable std::mutex ratesMu_;
  HostPathRates hostRates_;
  std::atomic<uint64_t> deviceBytes_{0}, hostBytes_{0};
  std::atomic<int> hostMeasurements_{0};
  bool measuring_ = false;
  char* hostStage_ = nullptr;              // kHostPrivate's staging
  size_t hostStageBytes_ = 0;
  std::atomic<bool> hasDev_{false};
  std::unique_ptr<ServerLinks> serverLinks_;
  ServerInfo servers_;
  std::atomic<uint64_t> serverBytes_{0}, workerBytes_{0};
  bool devActive_ = false;
  bool devStaged_ = false;  // inside a staged device collective: pointers are in the staging buffer
};

}  // namespace plait
