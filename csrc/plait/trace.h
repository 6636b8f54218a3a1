// The flight recorder: every communicator keeps its last N collectives and point-to-point transfers (N from
// PLAIT_TRACE_BUFFER, default 2048; 0 turns it off) with sequence number, op, sizes, dtype, the schedule it ran, the
// peers it waited on and timings, in a fixed ring allocated once. On a failure or timeout each rank writes it as JSON
// to PLAIT_TRACE_DIR (plait-trace.<group id>.<rank>.json), and asks the group's other ranks, through the store, to
// write theirs (a rank that is alive but never entered the collective writes its record too, within about a second);
// dumpAll writes every live group's record on demand (plait.trace_dump()). `python -m plait.trace DIR` reads the
// files of all ranks and says which ranks entered which collective and who is missing.
//
// Cost: an entry is a few stores under an uncontended mutex and two clock reads per collective (PLAIT_TRACE_BUFFER=0
// skips even that); nothing is allocated after construction except an error message on failure.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace plait {

class Store;

struct TraceMeta {
  int rank = 0, size = 1;
  std::string group;    // the group's name ("" for the default group)
  std::vector<int> globalRanks;  // group rank -> global rank (empty: unknown)
  std::string groupId;  // this incarnation's id (the same on every rank of the group)
  std::string host;     // the rank's host id
  std::string storePrefix;  // the group's store keys ("plait/<epoch>/")
  std::shared_ptr<Store> store;
};

class FlightRecorder : public std::enable_shared_from_this<FlightRecorder> {
 public:
  static constexpr int kMaxPeers = 8;  // peers listed per entry (more are counted)
  explicit FlightRecorder(size_t capacity);
  // Registers the recorder for dumpAll and the dump-request watcher (needs a shared_ptr owner).
  void start(TraceMeta meta);
  ~FlightRecorder();
  bool enabled() const { return cap_ > 0; }

  // ---- the thread that drives the engine ----
  // A collective (peer -1) or a point-to-point transfer (peer, tag in root) begins; returns its entry id. A collective
  // entry still open is closed as completed first.
  uint64_t open(uint32_t seq, uint8_t coll, uint8_t dtype, uint8_t op, int32_t root, uint64_t count, bool device,
                int peer = -1);
  void setSched(uint8_t code);
  // The open collective posted a receive from `peer` (it waits on that peer).
  void addPeer(int peer);
  // The open collective's transfers so far finished (a waitAll returned): the tentative end.
  void waited();
  // The open collective finished (the torch layer, after the task that ran it).
  void close();
  // A point-to-point entry finished (error: nullptr, or the message); src: the peer of a receive from any source.
  void closeP2P(uint64_t id, const std::string* error, int src = -1);
  // The open collective's task raised without failing the communicator (an argument check, a copy back).
  void abandon(const std::string& why);
  // The group failed: the open collective entry and every open point-to-point entry are marked failed with `why`.
  void failed(const std::string& why);

  // ---- any thread ----
  std::string json(const std::string& reason) const;
  // Writes json(reason) to DIR/plait-trace.<group id>.<rank>.json (atomically); returns the path, or "" (logged) on
  // an error. Each call overwrites the previous file of this rank and group.
  std::string dump(const std::string& dir, const std::string& reason);
  // The same, to plait-trace.<group id>.<rank><suffix>.json.
  std::string dumpAs(const std::string& dir, const std::string& reason, const std::string& suffix);
  static std::vector<std::shared_ptr<FlightRecorder>> liveRecorders();
  // The failure path: dump to PLAIT_TRACE_DIR (if set) once, and return the path ("" if not written).
  std::string dumpOnFailure(const std::string& reason);
  // Every live recorder of this process; returns the paths written.
  static std::vector<std::string> dumpAll(const std::string& dir, const std::string& reason);
  static std::vector<std::string> jsonAll(const std::string& reason);
  // The store key a failing rank sets so that its peers dump too.
  std::string requestKey() const { return meta_.storePrefix + "trace/dump"; }
  const TraceMeta& meta() const { return meta_; }
  // The watcher: true once this recorder answered a request (or failed itself); claimDump returns the old value.
  bool dumped() const { return dumped_.load(); }
  bool claimDump() { return dumped_.exchange(true); }
  // When the engine last recorded something (steady ns): the watcher asks only groups quiet for a second.
  int64_t lastActivityNs() const { return lastActNs_.load(std::memory_order_relaxed); }

 private:
  struct Entry {
    uint64_t id = ~uint64_t(0);
    uint32_t seq = 0;
    uint8_t coll = 0, dtype = 0, op = 0, sched = 0;
    int32_t root = 0;
    int32_t peer = -1;  // point-to-point: the peer
    uint64_t count = 0;
    bool device = false;
    uint8_t state = 0;  // 0 open, 1 completed, 2 failed, 3 enqueued (device work: completion not observed)
    int64_t startWallUs = 0;
    int64_t startNs = 0, waitNs = 0, endNs = 0;  // steady clock
    int32_t peers[kMaxPeers] = {};
    uint16_t npeers = 0;
    std::string error;
  };
  Entry* find(uint64_t id);  // under mu_
  void closeLocked(Entry& e, int64_t endNs);
  size_t cap_;
  TraceMeta meta_;
  mutable std::mutex mu_;
  std::vector<Entry> ring_;
  uint64_t next_ = 0;            // ids handed out
  uint64_t cur_ = ~uint64_t(0);  // the open collective entry
  // Engine thread only: the open collective's peers, so addPeer takes the lock only for a new one.
  int32_t curPeers_[kMaxPeers] = {};
  uint16_t curN_ = 0;
  bool curOverflow_ = false;
  std::mutex dumpMu_;  // one dump of this recorder at a time
  std::atomic<int64_t> lastActNs_{0};
  std::atomic<int64_t> curWaitNs_{0};  // the open collective's last completed wait (steady ns; 0: none yet)
  int64_t wallAtZeroUs_;               // wall clock minus steady clock, at construction (microseconds)
  std::atomic<bool> dumped_{false};
  std::atomic<bool> failureDumped_{false};
};

}  // namespace plait
