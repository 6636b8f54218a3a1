#include "plait/device.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "plait/comm.h"
#include "plait/transport/auth.h"
#include "plait/transport/shm.h"

namespace plait {

namespace {
constexpr size_t kLine = 64;
size_t pageRound(size_t n) { return (n + 4095) / 4096 * 4096; }
thread_local const Comm* tlsColl = nullptr;  // DeviceCollective

// The key's word: collective (4 bits), dtype (5), op (4; 15 for collectives that do not reduce), schedule code (8),
// root (11 bits: a device group lives on one host).
constexpr uint32_t kNoOp = 15;
uint32_t packWord(Coll c, DType dt, uint32_t op, uint8_t sched, int32_t root) {
  return (uint32_t(c) & 0xf) | ((uint32_t(dt) & 0x1f) << 4) | ((op & 0xf) << 9) | (uint32_t(sched) << 13) |
         ((uint32_t(root) & 0x7ff) << 21);
}
}  // namespace

DeviceCollective::DeviceCollective(const Comm& c) : prev_(tlsColl) { tlsColl = &c; }
DeviceCollective::~DeviceCollective() { tlsColl = prev_; }

PullKey DeviceEngine::currentKey(RedOp op, DType dt) {
  if (!tlsColl) return PullKey{0, 0};
  const Comm::CollCtx& x = tlsColl->ctx();
  const bool reducing = x.coll == Coll::kAllreduce || x.coll == Coll::kReduce || x.coll == Coll::kReduceScatter;
  return PullKey{tlsColl->seq(), packWord(x.coll, dt, reducing ? uint32_t(op) : kNoOp, x.sched, x.root)};
}

std::string DeviceEngine::keyName(PullKey k) {
  const uint32_t c = k.word & 0xf;
  if (k.word == 0 && k.seq == 0) return "a device collective";
  return cat(c >= 1 && c <= uint32_t(Coll::kMonitoredBarrier) ? collName(Coll(c)) : "?", " seq ", k.seq, " (device)");
}

std::string DeviceEngine::describeKey(PullKey k, uint64_t bytes) {
  const uint32_t w = k.word;
  const uint32_t c = w & 0xf, dt = (w >> 4) & 0x1f, op = (w >> 9) & 0xf, sched = (w >> 13) & 0xff, root = w >> 21;
  if (w == 0 && k.seq == 0) return cat("an unknown collective (message ", bytes, " bytes)");
  const bool rooted = Coll(c) == Coll::kBroadcast || Coll(c) == Coll::kReduce || Coll(c) == Coll::kGather ||
                      Coll(c) == Coll::kScatter;
  return cat(c >= 1 && c <= uint32_t(Coll::kMonitoredBarrier) ? collName(Coll(c)) : "?", "(seq ", k.seq, ", dtype ",
             dt < uint32_t(DType::kCount) ? dtypeName(DType(dt)) : "?",
             op == kNoOp ? "" : cat(", op ", op < uint32_t(RedOp::kCount) ? redOpName(RedOp(op)) : "?"),
             rooted ? cat(", root ", root) : "", sched ? cat(", schedule code ", sched) : "", ", message ", bytes,
             " bytes)");
}

DeviceEngine::DeviceEngine(int rank, int size, std::function<void()> checkPeers, Store& store,
                           const std::string& prefix, std::unique_ptr<DeviceOps> ops, size_t stagingBytes)
    : checkPeers_(std::move(checkPeers)), store_(store), prefix_(prefix), ops_(std::move(ops)), rank_(rank), size_(size),
      initialCap_(std::max<size_t>(stagingBytes, 4096)) {
  peerStaging_.assign(size_, nullptr);
  peerFlags_.assign(size_, nullptr);
  peerFlagsDev_.assign(size_, nullptr);
  peerFlagFd_.assign(size_, -1);
  sendSeq_.assign(size_, 0);
  recvSeq_.assign(size_, 0);
  ackWaited_.assign(size_, 0);
  ops_->setPoll([this] { checkPeers_(); });
  setup();
}

DeviceEngine::~DeviceEngine() {
  try {
    ops_->synchronize();
  } catch (...) {
  }
  for (int p = 0; p < size_; ++p) {
    if (peerStaging_[p]) ops_->closeImported(peerStaging_[p]);
    if (peerFlags_[p]) {
      ops_->unmapHost(peerFlags_[p]);
      munmap(peerFlags_[p], flagBytes_);
    }
  }
  if (staging_) ops_->release(staging_);
  if (ownFlags_) {
    ops_->unmapHost(ownFlags_);
    munmap(ownFlags_, flagBytes_);
  }
  for (int f : peerFlagFd_)
    if (f >= 0) close(f);
  closeLiveness(ownFlagFd_);
}

int DeviceEngine::gonePeer() const {
  for (int q = 0; q < size_; ++q)
    if (q != rank_ && peerFlagFd_[q] >= 0 && peerFlags_[q] && livenessWord(peerFlags_[q])[0] == 1 &&
        lockGone(peerFlagFd_[q]))
      return q;
  return -1;
}

// Flag segment layout (every field on its own cache line, written by one peer): ready[from], ack[from], the error
// word, then kSlots descriptors per sender.
uint32_t* DeviceEngine::readyOf(char* f, int from) const { return reinterpret_cast<uint32_t*>(f + from * kLine); }
uint32_t* DeviceEngine::ackOf(char* f, int from) const {
  return reinterpret_cast<uint32_t*>(f + (size_ + from) * kLine);
}
// The error word's cache line also holds, one word after it, whether the owner holds its liveness lock.
volatile uint32_t* DeviceEngine::livenessWord(char* f) const {
  return reinterpret_cast<volatile uint32_t*>(f + 2 * size_ * kLine) + 1;
}
PullDesc* DeviceEngine::descOf(char* f, int from, uint32_t seq) const {
  return reinterpret_cast<PullDesc*>(f + (2 * size_ + 1) * kLine) + size_t(from) * kSlots + seq % kSlots;
}

void DeviceEngine::setup() {
  flagBytes_ = pageRound((2 * size_ + 1) * kLine + size_t(size_) * kSlots * sizeof(PullDesc));
  uint8_t r[8];
  randomBytes(r, sizeof(r));
  const std::string flagName = cat("/plait-dev-", getpid(), "-", toHex(r, sizeof(r)));
  int fd = shm_open(flagName.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  PLAIT_CHECK(fd >= 0, "plait: rank ", rank_, ": shm_open(", flagName, ") for device flags failed: ",
              std::strerror(errno));
  try {
    reserveShm(fd, flagBytes_, flagName, cat("plait: rank ", rank_, " (device flags)"));
  } catch (...) {
    close(fd);
    shm_unlink(flagName.c_str());
    throw;
  }
  void* p = mmap(nullptr, flagBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    close(fd);
    shm_unlink(flagName.c_str());
    throw Error(cat("plait: rank ", rank_, ": cannot map the device flag segment"));
  }
  ownFlagFd_ = fd;
  ownFlags_ = static_cast<char*>(p);
  livenessWord(ownFlags_)[0] = holdLiveness(fd) ? 1 : 0;
  try {
    ownFlagsDev_ = static_cast<char*>(ops_->mapHost(ownFlags_, flagBytes_));
    store_.set(cat(prefix_, "dev/flags/", rank_), flagName);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      std::string name = store_.get(cat(prefix_, "dev/flags/", q));
      int f = shm_open(name.c_str(), O_RDWR, 0600);
      PLAIT_CHECK(f >= 0, "plait: rank ", rank_, ": cannot open peer rank ", q, "'s device flags (", name,
                  "): ", std::strerror(errno), " (device collectives need every rank on this host)");
      void* m = mmap(nullptr, flagBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
      if (m == MAP_FAILED) close(f);
      PLAIT_CHECK(m != MAP_FAILED, "plait: rank ", rank_, ": cannot map peer rank ", q, "'s device flags");
      peerFlagFd_[q] = f;
      peerFlags_[q] = static_cast<char*>(m);
      peerFlagsDev_[q] = static_cast<char*>(ops_->mapHost(peerFlags_[q], flagBytes_));
    }
    store_.set(cat(prefix_, "dev/fmapped/", rank_), "1");
    for (int q = 0; q < size_; ++q)
      if (q != rank_) store_.get(cat(prefix_, "dev/fmapped/", q));
  } catch (...) {
    shm_unlink(flagName.c_str());
    throw;
  }
  shm_unlink(flagName.c_str());
  reserve(initialCap_);
}

void DeviceEngine::reserve(size_t bytes) {
  if (bytes <= cap_) return;
  size_t want = std::max(bytes, cap_ * 2);
  if (staging_) {
    // Peers may still read the old buffer and this rank may still read theirs: wait for every ack and for the
    // stream, then let the old memory go. Every rank reaches this point in the same collective.
    flush();
    for (int p = 0; p < size_; ++p)
      if (p != rank_) waitAck(p, sendSeq_[p]);
    ops_->synchronize();
    for (int p = 0; p < size_; ++p)
      if (peerStaging_[p]) {
        ops_->closeImported(peerStaging_[p]);
        peerStaging_[p] = nullptr;
      }
    ops_->release(staging_);
    staging_ = nullptr;
    exposed_.clear();
  }
  staging_ = static_cast<char*>(ops_->alloc(want));
  cap_ = want;
  ++gen_;
  std::string h = ops_->exportMem(staging_);
  store_.set(cat(prefix_, "dev/stg/", gen_, "/", rank_), toHex(reinterpret_cast<const uint8_t*>(h.data()), h.size()));
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    std::string raw = fromHex(store_.get(cat(prefix_, "dev/stg/", gen_, "/", q)));
    try {
      peerStaging_[q] = static_cast<char*>(ops_->importMem(raw));
    } catch (const Error& e) {
      throw Error(cat("plait: rank ", rank_, ": cannot map peer rank ", q, "'s device buffer (", want, " B): ",
                      e.what()));
    }
  }
  if (infoEnabled())
    logInfo(cat("rank ", rank_, ": device engine (", ops_->name(), "): staging buffer ", want, " B, generation ",
                gen_));
}

char* DeviceEngine::scratch(size_t bytes) {
  PLAIT_CHECK(scratchBase_ + bytes <= cap_, "plait: internal: device scratch of ", bytes, " B at offset ",
              scratchBase_, " exceeds the staging buffer (", cap_, " B)");
  return staging_ + scratchBase_;
}

bool DeviceEngine::inStaging(const void* p, size_t bytes) const {
  const char* c = static_cast<const char*>(p);
  return c >= staging_ && c + bytes <= staging_ + cap_;
}

void DeviceEngine::record(Xfer* x, RedOp op, DType dt) {
  PLAIT_CHECK(x->len == 0 || inStaging(x->buf, x->len), "plait: internal: rank ", rank_,
              ": a device transfer with peer rank ", x->peer, " lies outside the staging buffer");
  lastKey_ = currentKey(op, dt);
  pending_.push_back(Pending{x, op, dt, lastKey_});
}

void DeviceEngine::flush() {
  // The host's waits (the emulation's, the copies') give up after the group's timeout as it is now: the group's
  // timeout may have changed since this engine was made, or this one call may have its own.
  if (tlsColl) ops_->setWaitTimeout(tlsColl->timeout());
  // Post order, except that a send moves ahead of earlier receives it does not depend on and whose regions it does
  // not read (see the header): with everything on one stream, that is what keeps the schedules deadlock-free.
  std::vector<Pending> q = std::move(pending_);
  pending_.clear();
  std::vector<bool> done(q.size(), false);
  std::vector<const Xfer*> enqueued;
  auto isEnqueued = [&](const Xfer* d) {
    return d == nullptr || std::find(enqueued.begin(), enqueued.end(), d) != enqueued.end() ||
           std::none_of(q.begin(), q.end(), [&](const Pending& p) { return p.x == d; });
  };
  auto overlap = [](const Xfer* a, const Xfer* b) {
    return a->len && b->len && a->buf < b->buf + b->len && b->buf < a->buf + a->len;
  };
  size_t left = q.size();
  while (left) {
    size_t pick = q.size();
    for (size_t i = 0; i < q.size() && pick == q.size(); ++i) {
      if (done[i] || q[i].x->kind != Xfer::kSend || !isEnqueued(q[i].x->dep)) continue;
      // Sends to one peer keep their order (the peer matches them in order); none reads what an earlier receive
      // has yet to write.
      bool blocked = false;
      for (size_t j = 0; j < i && !blocked; ++j)
        blocked = !done[j] && ((q[j].x->kind != Xfer::kSend && overlap(q[j].x, q[i].x)) ||
                               (q[j].x->kind == Xfer::kSend && q[j].x->peer == q[i].x->peer));
      if (!blocked) pick = i;
    }
    if (pick == q.size())
      for (size_t i = 0; i < q.size(); ++i)
        if (!done[i]) {
          pick = i;
          break;
        }
    const Pending& p = q[pick];
    if (p.x->kind == Xfer::kSend) enqueueSend(p);
    else enqueueRecv(p);
    p.x->hdrDone = sizeof(WireHeader);
    p.x->done = p.x->len;
    done[pick] = true;
    enqueued.push_back(p.x);
    --left;
  }
}

void DeviceEngine::waitAck(int peer, uint32_t seq) {
  if (int32_t(seq - ackWaited_[peer]) <= 0) return;
  ops_->waitGeq(ackOf(ownFlagsDev_, peer), seq, [this, peer, seq] {
    return cat("plait: rank ", rank_, ": waiting for peer rank ", peer, " to acknowledge device transfer ", seq);
  });
  noteWait(ackOf(ownFlags_, peer), seq, peer, true, lastKey_);
  ackWaited_[peer] = seq;
  exposed_.erase(std::remove_if(exposed_.begin(), exposed_.end(),
                                [&](const Exposed& e) { return e.peer == peer && int32_t(e.seq - seq) <= 0; }),
                 exposed_.end());
}

void DeviceEngine::beforeWrite(const void* dst, size_t bytes) {
  if (bytes == 0 || !inStaging(dst, bytes)) return;
  size_t lo = static_cast<const char*>(dst) - staging_, hi = lo + bytes;
  std::vector<uint32_t> need(size_, 0);
  std::vector<bool> any(size_, false);
  for (const Exposed& e : exposed_)
    if (e.lo < hi && lo < e.hi && (!any[e.peer] || int32_t(e.seq - need[e.peer]) > 0)) {
      need[e.peer] = e.seq;
      any[e.peer] = true;
    }
  for (int p = 0; p < size_; ++p)
    if (any[p]) waitAck(p, need[p]);
}

void DeviceEngine::enqueueSend(const Pending& pd) {
  Xfer* x = pd.x;
  const int p = x->peer;
  const uint32_t k = ++sendSeq_[p];
  // The descriptor slot is free again once the receiver acknowledged the send kSlots before this one. waitAck
  // compares sequence numbers modulo 2^32, so this holds after the counter wraps too (and is a no-op for the first
  // kSlots sends, whose predecessor numbers lie "before" zero).
  waitAck(p, k - kSlots);
  const uint64_t off = x->len ? uint64_t(x->buf - staging_) : 0, len = x->len;
  auto* words = reinterpret_cast<uint32_t*>(descOf(peerFlagsDev_[p], rank_, k));
  ops_->write32(words + 0, uint32_t(off));
  ops_->write32(words + 1, uint32_t(off >> 32));
  ops_->write32(words + 2, uint32_t(len));
  ops_->write32(words + 3, uint32_t(len >> 32));
  ops_->write32(words + 4, pd.key.seq);
  ops_->write32(words + 5, pd.key.word);
  ops_->write32(readyOf(peerFlagsDev_[p], rank_), k);
  if (x->len) exposed_.push_back(Exposed{off, off + x->len, p, k});
}

void DeviceEngine::enqueueRecv(const Pending& pd) {
  Xfer* x = pd.x;
  const int p = x->peer;
  const uint32_t k = ++recvSeq_[p];
  beforeWrite(x->buf, x->len);
  ops_->waitGeq(readyOf(ownFlagsDev_, p), k, [this, p, k, key = pd.key] {
    return cat("plait: rank ", rank_, ": ", keyName(key), ": waiting for device transfer ", k, " from peer rank ", p);
  });
  noteWait(readyOf(ownFlags_, p), k, p, false, pd.key);
  ops_->pull(x->kind == Xfer::kRecvReduce, pd.op, pd.dt, x->buf, peerStaging_[p], descOf(ownFlagsDev_, p, k),
             x->len, pd.key, reinterpret_cast<uint32_t*>(ownFlagsDev_ + 2 * size_ * kLine), uint32_t(p + 1));
  ops_->write32(ackOf(peerFlagsDev_[p], rank_), k);
  // The emulation (and the CPU engine) ran the pull already: a disagreement raises at this transfer. On a GPU the
  // flag shows up at a later call.
  if (sizeMismatchPeer() >= 0) throw Error(mismatch());
}

void DeviceEngine::noteWait(const uint32_t* flagHost, uint32_t value, int peer, bool ack, PullKey key) {
  auto reached = [](const Waiting& w) { return int32_t(*w.flag - w.value) >= 0; };
  std::lock_guard<std::mutex> g(waitMu_);
  if (waits_.size() >= 64)  // keep the list short: drop the waits the peers have satisfied
    waits_.erase(std::remove_if(waits_.begin(), waits_.end(), reached), waits_.end());
  Waiting w{flagHost, value, peer, ack, key, Clock::now()};
  if (!reached(w)) waits_.push_back(w);
}

std::string DeviceEngine::stalled(std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> g(waitMu_);
  const auto now = Clock::now();
  for (auto it = waits_.begin(); it != waits_.end();) {
    const uint32_t v = *it->flag;
    if (int32_t(v - it->value) >= 0) {
      it = waits_.erase(it);
      continue;
    }
    if (now - it->since >= timeout) {
      return cat("plait: rank ", rank_, ": Timed out after ", timeout.count(), " ms in ", keyName(it->key),
                 ": the stream waits for peer rank ",
                 it->peer, it->ack ? " to acknowledge device transfer " : " to send device transfer ", it->value,
                 " (the peer never reached that point of its collectives)");
    }
    ++it;
  }
  return "";
}

std::string DeviceEngine::mismatch() const {
  const volatile uint32_t* e = reinterpret_cast<const volatile uint32_t*>(ownFlags_ + 2 * size_ * kLine);
  const uint32_t code = e[0];
  if (code == 0) return "";
  std::atomic_thread_fence(std::memory_order_acquire);
  const int peer = int(code) - 1;
  const PullKey got{e[cuda::kErrGotSeq], e[cuda::kErrGotWord]}, exp{e[cuda::kErrExpSeq], e[cuda::kErrExpWord]};
  const uint64_t gotBytes = uint64_t(e[cuda::kErrGotBytesLo]) | (uint64_t(e[cuda::kErrGotBytesHi]) << 32);
  const uint64_t expBytes = uint64_t(e[cuda::kErrExpBytesLo]) | (uint64_t(e[cuda::kErrExpBytesHi]) << 32);
  const std::string sides = cat("rank ", peer, " sent ", describeKey(got, gotBytes), " but rank ", rank_,
                                " expected ", describeKey(exp, expBytes));
  if (got.seq == exp.seq && got.word == exp.word)
    return cat("plait: rank ", rank_, ": a device collective received from peer rank ", peer,
               " a different number of bytes than this rank expected (", sides,
               "); that transfer was dropped, so device results since then are invalid");
  const uint32_t rootMask = 0x7ffu << 21;
  if (got.seq == exp.seq && (got.word & ~rootMask) == (exp.word & ~rootMask) &&
      Coll(exp.word & 0xf) == Coll::kBroadcast)
    return cat("plait: broadcast seq ", exp.seq, " (device): rank ", peer, " believes the root is ", got.word >> 21,
               ", rank ", rank_, " says ", exp.word >> 21, " (collective mismatch between rank ", rank_, " and rank ",
               peer, ": ", sides, ")");
  return cat("plait: collective mismatch between rank ", rank_, " and rank ", peer, " (device engine): ", sides,
             "; that transfer was dropped, so device results since then are invalid");
}

void DeviceEngine::copy(void* dst, const void* src, size_t bytes) {
  flush();
  if (bytes == 0 || dst == src) return;
  beforeWrite(dst, bytes);
  ops_->copy(dst, src, bytes);
}

void DeviceEngine::reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t count) {
  flush();
  if (count == 0) return;
  beforeWrite(dst, count * dtypeSize(dt));
  ops_->reduce(op, dt, dst, a, b, count);
}

void DeviceEngine::releaseWaits() {
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    for (uint32_t* f : {readyOf(ownFlags_, p), ackOf(ownFlags_, p)})
      reinterpret_cast<std::atomic<uint32_t>*>(f)->fetch_add(1u << 30, std::memory_order_release);
  }
}

int DeviceEngine::sizeMismatchPeer() const {
  uint32_t v = reinterpret_cast<const volatile uint32_t*>(ownFlags_ + 2 * size_ * kLine)[0];
  return v ? int(v) - 1 : -1;
}

}  // namespace plait
