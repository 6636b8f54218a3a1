#include "plait/trace.h"

#include <sys/stat.h>
#include <unistd.h>

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
        if (c < 0x20) {
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

const char* stateName(uint8_t s) { return s == 0 ? "started" : s == 1 ? "completed" : "failed"; }

// Live recorders (dumpAll, the watcher).
std::mutex gRegMu;
std::vector<std::weak_ptr<FlightRecorder>> gRecorders;
bool gWatcherRunning = false;

std::string fileSafe(const std::string& s) {
  std::string o;
  for (char c : s) o += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') ? c : '_';
  return o.empty() ? std::string("group") : o;
}

// With PLAIT_TRACE_DIR set: once a second, every live recorder's group is asked (through its store) whether a peer
// failed and requested dumps; a rank that never entered the collective its peers wait in writes its record too. The
// thread runs only while recorders live, holds each one only while it checks it, and a store that does not answer
// blocks only this thread.
void watcher() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    std::vector<std::shared_ptr<FlightRecorder>> live;
    {
      std::lock_guard<std::mutex> g(gRegMu);
      size_t w = 0;
      for (auto& r : gRecorders)
        if (!r.expired()) gRecorders[w++] = r;
      gRecorders.resize(w);
      if (gRecorders.empty()) {
        gWatcherRunning = false;
        return;
      }
      for (auto& r : gRecorders)
        if (auto s = r.lock()) live.push_back(std::move(s));
    }
    for (auto& r : live) {
      if (r->dumped() || !r->meta().store) continue;
      try {
        const std::string key = r->requestKey();
        if (!r->meta().store->check(key)) continue;
        std::string why = r->meta().store->get(key);
        r->markDumped();
        r->dump(knobs().traceDir, cat("requested by a peer: ", why));
      } catch (...) {
        // the store is gone (the job is ending): nothing to answer
      }
    }
  }
}

}  // namespace

FlightRecorder::FlightRecorder(size_t capacity) : cap_(capacity) { ring_.resize(capacity); }

void FlightRecorder::start(TraceMeta meta) {
  meta_ = std::move(meta);
  if (!enabled()) return;
  std::lock_guard<std::mutex> g(gRegMu);
  gRecorders.push_back(weak_from_this());
  if (!knobs().traceDir.empty() && !gWatcherRunning) {
    try {
      std::thread(watcher).detach();
      gWatcherRunning = true;
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
  e.state = 1;
  e.endNs = endNs;
}

uint64_t FlightRecorder::open(uint32_t seq, uint8_t coll, uint8_t dtype, uint8_t op, int32_t root, uint64_t count,
                              bool device, int peer) {
  if (!enabled()) return ~uint64_t(0);
  const int64_t now = steadyNs(), wall = wallUs();
  std::lock_guard<std::mutex> g(mu_);
  const bool p2p = Coll(coll) == Coll::kSendRecv;
  if (!p2p) {
    // The previous collective ended at its last wait (when nobody closed it explicitly).
    if (Entry* prev = find(cur_)) closeLocked(*prev, prev->waitNs ? prev->waitNs : now);
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
      e.peers[0] = int16_t(peer);
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
    curPeers_[curN_++] = int16_t(peer);
  }
  std::lock_guard<std::mutex> g(mu_);
  if (Entry* e = find(cur_)) {
    std::memcpy(e->peers, curPeers_, sizeof(curPeers_));
    e->npeers = uint16_t(curN_ + (curOverflow_ ? 1 : 0));
  }
}

void FlightRecorder::waited() {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  if (Entry* e = find(cur_)) e->waitNs = now;
}

void FlightRecorder::close() {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  if (Entry* e = find(cur_)) closeLocked(*e, now);
}

void FlightRecorder::closeP2P(uint64_t id, const std::string* error) {
  if (!enabled()) return;
  const int64_t now = steadyNs();
  std::lock_guard<std::mutex> g(mu_);
  Entry* e = find(id);
  if (!e || e->state != 0) return;
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
    if (e.id == ~uint64_t(0) || e.state != 0) continue;
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
    if (e.waitNs) o += cat(", \"last_wait_done_us\": ", (e.waitNs - e.startNs) / 1000);
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
  if (!enabled()) return "";
  const std::string d = dir.empty() ? std::string(".") : dir;
  mkdir(d.c_str(), 0755);  // one level; an existing directory is fine
  const std::string path = cat(d, "/plait-trace.", fileSafe(meta_.groupId), ".", meta_.rank, ".json");
  const std::string tmp = cat(path, ".tmp", getpid());
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
  dumped_ = true;
  std::string p = dump(knobs().traceDir, reason);
  if (!p.empty()) logWarn(cat("rank ", meta_.rank, ": flight record written to ", p));
  return p;
}

std::vector<std::string> FlightRecorder::dumpAll(const std::string& dir, const std::string& reason) {
  std::vector<std::shared_ptr<FlightRecorder>> live;
  {
    std::lock_guard<std::mutex> g(gRegMu);
    for (auto& r : gRecorders)
      if (auto s = r.lock()) live.push_back(std::move(s));
  }
  std::vector<std::string> paths;
  for (auto& r : live) {
    std::string p = r->dump(dir, reason);
    if (!p.empty()) paths.push_back(p);
  }
  return paths;
}

std::vector<std::string> FlightRecorder::jsonAll(const std::string& reason) {
  std::vector<std::shared_ptr<FlightRecorder>> live;
  {
    std::lock_guard<std::mutex> g(gRegMu);
    for (auto& r : gRecorders)
      if (auto s = r.lock()) live.push_back(std::move(s));
  }
  std::vector<std::string> out;
  for (auto& r : live) out.push_back(r->json(reason));
  return out;
}

}  // namespace plait
