// The device engine: runs the same schedules as the host engine (algo/schedules.cc posts sends, receives and
// receive-reduces of byte ranges, then waits) on device memory, by turning each posted transfer into operations
// on one stream (transport/device.h) instead of moving bytes itself. The host enqueues and returns: it never waits
// for the device or for a peer.
//
// Protocol between two ranks of one host (a *pull* model over memory each rank maps from its peers):
//   - Every rank owns a *staging* buffer in device memory that its local peers map (CUDA IPC), and a *flag segment*
//     in host shared memory that every peer maps and the device can address. A collective runs in the staging
//     buffer: its input is copied in, the schedule runs there, the result is copied out (sliced when larger).
//   - Send number k from A to B (counted per directed pair): once everything before it on A's stream is done, A's
//     stream writes the descriptor {offset in A's staging, bytes, key of A's collective} into slot k % kSlots of B's
//     flag segment, then B.ready[A] = k.
//   - The matching receive at B: B's stream waits until B.ready[A] >= k, then one kernel reads A's bytes straight
//     from A's staging (through the IPC mapping) and copies them, or reduces them with B's own, in one pass over
//     memory; then A.ack[B] = k. A size or a collective (the key: sequence number, collective, dtype, op, root,
//     schedule) that disagrees with the descriptor is flagged, not copied (mismatch()).
//   - Write after read: before A's stream writes a region of its staging that a send of A's exposed, it waits for
//     that send's ack. A send's descriptor slot is reused only after the receiver acknowledged the send kSlots
//     before it.
//   - Stream order satisfies every dependency a schedule declares (a dependency is always posted earlier). Sends
//     are enqueued as early as their dependency and the regions they read allow, so a rank never blocks its stream
//     on a receive before exposing data a peer needs (the host engine progresses all posted transfers at once).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "plait/store.h"
#include "plait/xfer.h"
#include "plait/transport/device.h"

namespace plait {

class Comm;

// While one lives on a thread, the device engines record transfers for `c`'s current collective (Comm::ctx(),
// Comm::seq()): each descriptor carries its key, and a stall names it. Set by algo/device_collectives.cc around
// every device collective; nests.
class DeviceCollective {
 public:
  explicit DeviceCollective(const Comm& c);
  ~DeviceCollective();
  DeviceCollective(const DeviceCollective&) = delete;
  DeviceCollective& operator=(const DeviceCollective&) = delete;

 private:
  const Comm* prev_;
};

class DeviceEngine {
 public:
  static constexpr uint32_t kSlots = 256;

  // checkPeers: throws (telling the peers) if a peer failed; the emulation calls it while it waits.
  DeviceEngine(int rank, int size, std::function<void()> checkPeers, Store& store, const std::string& prefix,
               std::unique_ptr<DeviceOps> ops, size_t stagingBytes);
  ~DeviceEngine();
  DeviceOps& ops() { return *ops_; }
  const char* name() const { return ops_->name(); }

  // Collective (every rank calls it at the same point with the same size): makes the staging buffer at least
  // `bytes`, exchanging the new memory with every peer. Capacity only grows.
  void reserve(size_t bytes);
  char* staging() const { return staging_; }
  size_t capacity() const { return cap_; }
  // Scratch for the schedule (Comm::scratch in device mode): staging from `scratchBase` on.
  void setScratchBase(size_t off) { scratchBase_ = off; }
  char* scratch(size_t bytes);

  // Engine verbs (the communicator routes postSend / postRecv / postRecvReduce / waitAll here in device mode).
  void record(Xfer* x, RedOp op, DType dt);
  void flush();
  // Stream-ordered local work, after everything recorded so far; dst may be staging (write-after-read waits) or
  // user memory.
  void copy(void* dst, const void* src, size_t bytes);
  void reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t count);
  // Before something other than this engine writes [dst, dst + bytes) of the staging buffer (the host path's
  // downloads): everything recorded is enqueued, and the stream waits until peers have read what they were shown
  // there (on the CPU engine the host itself waits).
  void awaitReaders(const void* dst, size_t bytes) {
    flush();
    beforeWrite(dst, bytes);
  }

  // The first disagreement a receive found (size or collective; the peer's rank), or -1; reading it does not wait
  // for the device.
  int sizeMismatchPeer() const;
  // That disagreement described (both sides' collective, sequence number and bytes), or "" when there is none.
  std::string mismatch() const;
  // A wait of this rank's stream on a peer (its transfer, or its acknowledgement) enqueued more than `timeout` ago
  // that the peer has still not satisfied, described (collective, sequence number, peer), or "". For the host that
  // watches a stream it does not wait for (CUDA: the backend's watchdog through Comm::checkDevicePeers).
  std::string stalled(std::chrono::milliseconds timeout);
  // The key of a transfer of the current collective (DeviceCollective) with op / dt, and its description.
  static PullKey currentKey(RedOp op, DType dt);
  static std::string describeKey(PullKey k, uint64_t bytes);
  static std::string keyName(PullKey k);  // "all_reduce seq 3 (device)"
  // A local peer whose process has ended (its liveness lock on its flag segment is gone), or -1.
  int gonePeer() const;
  // After a failure: lets every wait this rank's stream has enqueued (or will) go through, so the stream drains
  // (with meaningless results) instead of waiting forever for a peer that is gone.
  void releaseWaits();

 private:
  struct Flags;
  struct Pending {
    Xfer* x;
    RedOp op;
    DType dt;
    PullKey key;
  };
  struct Waiting {  // a wait enqueued on the stream (flag >= value), for stalled()
    const volatile uint32_t* flag;  // host address
    uint32_t value;
    int peer;
    bool ack;
    PullKey key;
    Clock::time_point since;
  };
  void noteWait(const uint32_t* flagHost, uint32_t value, int peer, bool ack, PullKey key);
  std::mutex waitMu_;
  std::vector<Waiting> waits_;
  PullKey lastKey_{0, 0};  // the key of the last transfer recorded (ack waits name it)
  struct Exposed {  // a send whose region a peer may still be reading
    size_t lo, hi;
    int peer;
    uint32_t seq;
  };
  void setup();
  void enqueueSend(const Pending& p);
  void enqueueRecv(const Pending& p);
  // Before the stream writes [dst, dst + bytes): wait for the acks of sends that exposed any of it.
  void beforeWrite(const void* dst, size_t bytes);
  void waitAck(int peer, uint32_t seq);
  bool inStaging(const void* p, size_t bytes) const;
  uint32_t* readyOf(char* flagsDev, int from) const;
  uint32_t* ackOf(char* flagsDev, int from) const;
  PullDesc* descOf(char* flagsDev, int from, uint32_t seq) const;
  volatile uint32_t* livenessWord(char* flagsHost) const;

  std::function<void()> checkPeers_;
  Store& store_;
  std::string prefix_;
  std::unique_ptr<DeviceOps> ops_;
  int rank_, size_;
  size_t cap_ = 0, initialCap_;
  size_t scratchBase_ = 0;
  int gen_ = 0;
  char* staging_ = nullptr;
  std::vector<char*> peerStaging_;
  size_t flagBytes_ = 0;
  int ownFlagFd_ = -1;                    // kept open: holds this rank's liveness lock
  std::vector<int> peerFlagFd_;           // peers' flag segments, to test their liveness locks
  char* ownFlags_ = nullptr;              // host address
  std::vector<char*> peerFlags_;          // host addresses of peers' segments
  char* ownFlagsDev_ = nullptr;           // device addresses
  std::vector<char*> peerFlagsDev_;
  std::vector<uint32_t> sendSeq_, recvSeq_, ackWaited_;
  std::vector<Exposed> exposed_;
  std::vector<Pending> pending_;
};

}  // namespace plait
