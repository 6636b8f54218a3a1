#include "plait/trace.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cxxabi.h>

#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <thread>

#include "plait/bootstrap.h"
#include "plait/common.h"
#include "plait/store.h"
#include "plait/xfer.h"

namespace plait {

namespace {

int64_t steadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
int64_t wallUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void jsonStr(std::string& o, const std::string& s) {
  o += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\r': o += "\\r"; break;
      case '\t': o += "\\t"; break;
      default:
        if (c >= 0x80) {
          o += '?';  // not necessarily valid UTF-8 (a message cut mid-character): the file must stay readable
        } else if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof(b), "\\u%04x", c);
          o += b;
        } else {
          o += char(c);
        }
    }
  }
  o += '"';
}

// The schedule code (Comm::schedCode and its flags) in words.
std::string schedName(uint8_t code) {
  if (code == 0) return "";
  std::string s;
  int a = (code & 0x0f);
  if (a >= 1 && a <= 7) s = algoName(Algo(a - 1));
  else if (a) s = cat("schedule ", a);
  auto add = [&](const char* w) { s += s.empty() ? w : cat("+", w); };
  if (code & 0x80) add("one-shot");
  if (code & 0x40) add("compressed");
  if (code & 0x20) add("average");
  if (code & 0x10) add("servers");
  return s;
}

const char* stateName(uint8_t s) {
  return s == 0 ? "started" : s == 1 ? "completed" : s == 2 ? "failed" : "enqueued";
}

// Live recorders (dumpAll, the watcher). Never destroyed: the detached watcher may outlive static destructors.
struct Registry {
  std::mutex mu;
  std::vector<std::weak_ptr<FlightRecorder>> recs;
  bool watcher = false;
};
Registry& reg() {
  static Registry* r = new Registry;
  return *r;
}

std::string fileSafe(const std::string& s) {
  std::string o;
  for (char c : s) o += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') ? c : '_';
  return o.empty() ? std::string("group") : o;
}

// With PLAIT_TRACE_DIR set: once a second, every live recorder's group is asked (through its store) whether a peer
// failed and requested dumps; a rank that never entered the collective its peers wait in writes its record too. The
// thread runs only while recorders live, holds each one only while it checks it, and a store that does not answer
// blocks only this thread.
void watcher(std::string dir) {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    std::vector<std::shared_ptr<FlightRecorder>> live;
    {
      Registry& g = reg();
      std::lock_guard<std::mutex> lk(g.mu);
      size_t w = 0;
      for (auto& r : g.recs)
        if (!r.expired()) g.recs[w++] = r;
      g.recs.resize(w);
      if (g.recs.empty()) {
        g.watcher = false;
        return;
      }
      for (auto& r : g.recs)
        if (auto s = r.lock()) live.push_back(std::move(s));
    }
    const int64_t now = steadyNs();
    for (auto& r : live) {
      // Only groups quiet for a second: one completing collectives is not the one anybody waits on (and the store
      // is spared a query per group per second while training runs).
      if (r->dumped() || !r->meta().store || now - r->lastActivityNs() < 1000000000) continue;
      try {
        const std::string key = r->requestKey();
        if (!r->meta().store->check(key)) continue;
        std::string why = r->meta().store->get(key);
        if (r->claimDump()) continue;
        // Every group of this process: a rank its peers miss in one group is often stuck in another.
        FlightRecorder::dumpAll(dir, cat("requested by a peer of group ", r->meta().groupId, ": ", why));
      } catch (abi::__forced_unwind&) {
        throw;  // thread cancellation (interpreter shutdown) must not be swallowed
      } catch (...) {
        // the store is gone (the job is ending): nothing to answer
      }
    }
    live.clear();
  }
}

}  // namespace

FlightRecorder::FlightRecorder(size_t capacity) : cap_(capacity), wallAtZeroUs_(wallUs() - steadyNs() / 1000) {
  ring_.resize(capacity);
}

void FlightRecorder::start(TraceMeta meta) {
  meta_ = std::move(meta);
  if (!enabled()) return;
  Registry& g = reg();
  std::lock_guard<std::mutex> lk(g.mu);
  g.recs.push_back(weak_from_this());
  if (!knobs().traceDir.empty() && !g.watcher) {
    try {
      std::thread(watcher, knobs().traceDir).detach();
      g.watcher = true;
    } catch (...) {
      // no thread: peers' requests go unanswered, this rank's own failures are still written
    }
  }
}

FlightRecorder::~FlightRecorder() = default;

FlightRecorder::Entry* FlightRecorder::find(uint64_t id) {
  if (id == ~uint64_t(0) || cap_ == 0) return nullptr;
  Entry& e = ring_[id % cap_];
  return e.id == id ? &e : nullptr;
}

void FlightRecorder::closeLocked(Entry& e, int64_t endNs) {
  if (e.state != 0) return;
  e.state = e.device ? 3 : 1;  // device work: enqueued on the stream, its completion is not observed here
  e.endNs = endNs;
}

uint64_t FlightRecorder::open(uint32_t seq, uint8_t coll, uint8_t dtype, uint8_t op, int32_t root, uint64_t count,
                              bool device, int peer) {
  if (!enabled()) return ~uint64_t(0);
  const int64_t now = steadyNs();
  const int64_t wall = wallAtZeroUs_ + now / 1000;  // one clock read: wall time from the steady clock's offset
  lastActNs_.store(now, std::memory_order_relaxed);
  std::lock_guard<std::mutex> g(mu_);
  const bool p2p = Coll(coll) == Coll::kSendRecv;
  if (!p2p) {
    // The previous collective ended at its last wait (when nobody closed it explicitly).
    if (Entry* prev = find(cur_)) {
      prev->waitNs = curWaitNs_.load(std::memory_order_relaxed);
      closeLocked(*prev, prev->waitNs ? prev->waitNs : now);
    }
    curWaitNs_.store(0, std::memory_order_relaxed);
  }
  const uint64_t id = next_++;
  Entry& e = ring_[id % cap_];
  e.id = id;
  e.seq = seq;
  e.coll = coll;
  e.dtype = dtype;
  e.op = op;
  e.sched = 0;
  e.root = root;
  e.peer = peer;
  e.count = count;
  e.device = device;
  e.state = 0;
  e.startWallUs = wall;
  e.startNs = now;
  e.waitNs = e.endNs = 0;
  e.npeers = 0;
  e.error.clear();
  if (p2p) {
    if (peer >= 0) {
      e.peers[0] = int32_t(peer);
      e.npeers = 1;
    }
  } else {
    cur_ = id;
    curN_ = 0;
    curOverflow_ = false;
  }
  return id;
}

void FlightRecorder::setSched(uint8_t code) {
  if (!enabled()) return;
  std::lock_guard<std::mutex> g(mu_);
  if (Entry* e = find(cur_)) e->sched = code;
}

void FlightRecorder::addPeer(int peer) {
  if (!enabled() || cur_ == ~uint64_t(0)) return;
  for (uint16_t i = 0; i < curN_; ++i)
    if (curPeers_[i] == peer) return;
  if (curN_ == kMaxPeers) {
    if (curOverflow_) return;
    curOverflow_ = true;
  } else {
    curPeers_[curN_++] = int32_t(peer);
  }
  std::lock_guard<std::mutex> g(mu_);
  if (Entry* e = find(cur_)) {
    std::memcpy(e->peers, curPeers_, sizeof(curPeers_));
    e->npeers = uint16_t(curN_ + (curOverflow_ ? 1 : 0));
  }
}

void FlightRecorder::waited() {
  if (!enabled()) return;
  // No lock: the open entry's tentative end lives in an atomic until the entry is closed (most collectives wait
  // once and are closed right after).
  const int64_t now = steadyNs();
  lastActNs_.store(now, std::memory_order_relaxed);
  curWaitNs_.store(now, std::memory_order_relaxed);
}

void FlightRecorder::close() {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  if (Entry* e = find(cur_)) {
    if (e->state == 0) e->waitNs = curWaitNs_.load(std::memory_order_relaxed);
    closeLocked(*e, now);
  }
}

void FlightRecorder::abandon(const std::string& why) {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  Entry* e = find(cur_);
  if (!e || e->state != 0) return;
  e->state = 2;
  e->endNs = now;
  e->error = why;
}

void FlightRecorder::closeP2P(uint64_t id, const std::string* error, int src) {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  Entry* e = find(id);
  if (!e || e->state != 0) return;
  if (src >= 0 && e->peer < 0) {
    e->peer = src;
    e->peers[0] = src;
    e->npeers = 1;
  }
  if (error) {
    e->state = 2;
    e->endNs = now;
    e->error = *error;
  } else {
    closeLocked(*e, now);
  }
}

void FlightRecorder::failed(const std::string& why) {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  for (Entry& e : ring_) {
    if (e.id == ~uint64_t(0) || (e.state != 0 && e.state != 3)) continue;
    e.state = 2;
    e.endNs = now;
    e.error = why;
  }
}

std::string FlightRecorder::json(const std::string& reason) const {
  const int64_t nowNs = steadyNs(), nowWall = wallUs();
  std::string o;
  o.reserve(256 + 256 * std::min<uint64_t>(cap_, next_));
  std::lock_guard<std::mutex> g(mu_);
  o += "{\"format\": \"plait-trace-1\", \"rank\": ";
  o += cat(meta_.rank, ", \"size\": ", meta_.size, ", \"group\": ");
  jsonStr(o, meta_.group);
  o += ", \"global_ranks\": [";
  for (size_t i = 0; i < meta_.globalRanks.size(); ++i) o += cat(i ? ", " : "", meta_.globalRanks[i]);
  o += "]";
  if (size_t(meta_.rank) < meta_.globalRanks.size()) o += cat(", \"global_rank\": ", meta_.globalRanks[meta_.rank]);
  o += ", \"group_id\": ";
  jsonStr(o, meta_.groupId);
  o += ", \"host\": ";
  jsonStr(o, meta_.host);
  o += cat(", \"pid\": ", int(getpid()), ", \"dumped_at_us\": ", nowWall, ", \"reason\": ");
  jsonStr(o, reason);
  o += cat(", \"capacity\": ", cap_, ", \"recorded\": ", next_, ", \"entries\": [");
  const uint64_t first = next_ > cap_ ? next_ - cap_ : 0;
  bool any = false;
  for (uint64_t id = first; id < next_; ++id) {
    const Entry& e = ring_[id % cap_];
    if (e.id != id) continue;
    o += any ? ",\n  {" : "\n  {";
    any = true;
    const bool p2p = Coll(e.coll) == Coll::kSendRecv;
    o += cat("\"id\": ", e.id, ", \"seq\": ", e.seq, ", \"op\": ");
    jsonStr(o, p2p ? std::string(e.op == 0 ? "send" : "recv") : std::string(collName(Coll(e.coll))));
    o += ", \"dtype\": ";
    jsonStr(o, dtypeName(DType(e.dtype)));
    if (!p2p) {
      o += ", \"reduce_op\": ";
      jsonStr(o, redOpName(RedOp(e.op)));
      o += cat(", \"root\": ", e.root);
    } else {
      o += cat(", \"peer\": ", e.peer, ", \"tag\": ", e.root);
    }
    o += cat(", \"count\": ", e.count, ", \"bytes\": ", e.count * uint64_t(dtypeSize(DType(e.dtype))),
             ", \"algorithm\": ");
    jsonStr(o, schedName(e.sched));
    o += cat(", \"device\": ", e.device ? "true" : "false", ", \"state\": \"", stateName(e.state), "\"");
    o += ", \"waited_on\": [";
    for (int i = 0; i < std::min<int>(e.npeers, kMaxPeers); ++i) o += cat(i ? ", " : "", e.peers[i]);
    o += cat("], \"more_peers\": ", e.npeers > kMaxPeers ? "true" : "false");
    o += cat(", \"start_us\": ", e.startWallUs);
    if (e.state != 0) o += cat(", \"duration_us\": ", (e.endNs - e.startNs) / 1000);
    else o += cat(", \"running_for_us\": ", (nowNs - e.startNs) / 1000);
    const int64_t waitNs = (e.id == cur_ && e.state == 0) ? curWaitNs_.load(std::memory_order_relaxed) : e.waitNs;
    if (waitNs) o += cat(", \"last_wait_done_us\": ", (waitNs - e.startNs) / 1000);
    if (!e.error.empty()) {
      o += ", \"error\": ";
      jsonStr(o, e.error);
    }
    o += "}";
  }
  o += "\n]}\n";
  return o;
}

std::string FlightRecorder::dump(const std::string& dir, const std::string& reason) {
  return dumpAs(dir, reason, "");
}

std::string FlightRecorder::dumpAs(const std::string& dir, const std::string& reason, const std::string& suffix) {
  if (!enabled()) return "";
  const std::string d = dir.empty() ? std::string(".") : dir;
  mkdir(d.c_str(), 0755);  // one level; an existing directory is fine
  const std::string path = cat(d, "/plait-trace.", fileSafe(meta_.groupId), ".", meta_.rank, suffix, ".json");
  static std::atomic<uint64_t> tmpN{0};
  const std::string tmp = cat(path, ".tmp", getpid(), ".", tmpN.fetch_add(1));
  std::lock_guard<std::mutex> dg(dumpMu_);  // one dump of this recorder at a time (the last one wins, whole)
  const std::string body = json(reason);
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f) {
    logWarn(cat("rank ", meta_.rank, ": cannot write the flight record to ", tmp, ": ", std::strerror(errno)));
    return "";
  }
  bool ok = std::fwrite(body.data(), 1, body.size(), f) == body.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    logWarn(cat("rank ", meta_.rank, ": cannot write the flight record to ", path, ": ", std::strerror(errno)));
    std::remove(tmp.c_str());
    return "";
  }
  return path;
}

std::string FlightRecorder::dumpOnFailure(const std::string& reason) {
  if (!enabled() || knobs().traceDir.empty() || failureDumped_.exchange(true)) return "";
  // Written already on a peer's request (this rank was late): that record answers "who entered"; this one goes
  // beside it rather than over it.
  const bool requested = dumped_.exchange(true);
  std::string p = requested ? dumpAs(knobs().traceDir, reason, ".failure") : dump(knobs().traceDir, reason);
  if (!p.empty()) logWarn(cat("rank ", meta_.rank, ": flight record written to ", p));
  // The process's other groups too: a failure in one is often explained by where this rank is in another.
  for (auto& other : liveRecorders())
    if (other.get() != this) other->dump(knobs().traceDir, cat("group ", meta_.groupId, " failed: ", reason));
  return p;
}

std::vector<std::shared_ptr<FlightRecorder>> FlightRecorder::liveRecorders() {
  std::vector<std::shared_ptr<FlightRecorder>> live;
  Registry& g = reg();
  std::lock_guard<std::mutex> lk(g.mu);
  for (auto& r : g.recs)
    if (auto s = r.lock()) live.push_back(std::move(s));
  return live;
}

std::vector<std::string> FlightRecorder::dumpAll(const std::string& dir, const std::string& reason) {
  std::vector<std::shared_ptr<FlightRecorder>> live = liveRecorders();
  std::vector<std::string> paths;
  for (auto& r : live) {
    std::string p = r->dump(dir, reason);
    if (!p.empty()) paths.push_back(p);
  }
  return paths;
}

std::vector<std::string> FlightRecorder::jsonAll(const std::string& reason) {
  std::vector<std::shared_ptr<FlightRecorder>> live = liveRecorders();
  std::vector<std::string> out;
  for (auto& r : live) out.push_back(r->json(reason));
  return out;
}

}  // namespace plait
