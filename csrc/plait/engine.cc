// The host engine: transfers posted by the algorithms (send, receive, receive-and-reduce of a byte range to one peer)
// and point-to-point messages, moved segment by segment over the channels (shared-memory rings, TCP), every message
// behind a WireHeader that the receiver checks; waits spin, then yield, then sleep on doorbells and poll(2).
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "plait/comm.h"
#include "plait/device.h"
#include "plait/transport/shm.h"
#include "plait/transport/tcp.h"

namespace plait {

namespace {
inline void cpuRelax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}
}  // namespace

bool Comm::finished(const Xfer* x) {
  return x->hdrDone == sizeof(WireHeader) && x->done == x->len && x->padDone == x->pad;
}


void Comm::begin(const CollCtx& ctx) {
  checkAbort();
  if (!failure_.empty())
    throw Error(cat("plait: rank ", rank_, ": the process group is unusable after an earlier error: ", failure_));
  PLAIT_CHECK(pendingColl_ == 0, "plait: internal: a collective began with transfers still pending");
  if (dev_ || hostEng_) {
    checkDeviceErrors();
    // Device work never makes the host wait, so this is where a dead peer is noticed between the watchdog's checks;
    // at most every 10 ms (a handful of fcntl calls), not on every small collective.
    auto now = Clock::now();
    if (now - lastDevCheck_ > std::chrono::milliseconds(10)) {
      lastDevCheck_ = now;
      checkDevicePeers();
    }
  }
  trimXfers();
  encShared_.clear();  // no collective transfer is pending (checked above)
  ctx_ = ctx;
  if (ctx.coll != Coll::kSendRecv) {
    ++seq_;
    trace_->open(seq_, uint8_t(ctx.coll), uint8_t(ctx.dtype), uint8_t(ctx.op), ctx.root, ctx.count, devActive_);
  }
  ++stats_.collectives;
  elemBytes_ = dtypeSize(ctx.dtype);
  reduceFn_ = nullptr;
  if (ctx.coll == Coll::kAllreduce || ctx.coll == Coll::kReduce || ctx.coll == Coll::kReduceScatter)
    reduceFn_ = reduceFn(ctx.op, ctx.dtype);
}

Comm::Xfer* Comm::post(Xfer::Kind kind, int peer, void* buf, size_t bytes, const Xfer* dep) {
  PLAIT_CHECK(peer >= 0 && peer < size_ && peer != rank_ && channels_[peer], "plait: internal: bad peer ", peer);
  if (kind != Xfer::kSend && kind != Xfer::kSendEnc && ctx_.coll != Coll::kSendRecv) trace_->addPeer(peer);
  if (devActive_ && eng_) {
    PLAIT_CHECK(ctx_.coll != Coll::kSendRecv, "plait: internal: point-to-point in device mode");
    PLAIT_CHECK(kind <= Xfer::kRecvReduce, "plait: internal: codec transfer in device mode");
    // Device transfers live apart from the host engine's: point-to-point transfers still in flight there (an irecv
    // posted before this collective) must survive the device collective's waitAll.
    devXfers_.push_back(Xfer{kind, peer, static_cast<char*>(buf), bytes, dep});
    eng_->record(&devXfers_.back(), ctx_.op, ctx_.dtype);
    return &devXfers_.back();
  }
  xfers_.push_back(Xfer{kind, peer, static_cast<char*>(buf), bytes, dep});
  Xfer* x = &xfers_.back();
  const bool p2p = ctx_.coll == Coll::kSendRecv;
  uint32_t seq = !p2p ? seq_ : kind == Xfer::kSend ? p2pSendSeq_[peer]++ : p2pRecvSeq_[peer]++;
  x->hdr = WireHeader{kWireMagic, seq, uint8_t(ctx_.coll), uint8_t(ctx_.dtype), uint8_t(ctx_.op),
                      p2p ? uint8_t(0) : ctx_.sched, ctx_.root, ctx_.count, bytes};
  x->pad = uint8_t((8 - bytes % 8) % 8);
  (kind == Xfer::kSend || kind == Xfer::kSendEnc ? sendQ_ : p2p ? p2pRecvQ_ : recvQ_)[peer].push_back(x);
  ++pending_;
  if (!p2p) ++pendingColl_;
  return x;
}

Comm::Xfer* Comm::postSend(int peer, const void* buf, size_t bytes, const Xfer* dep) {
  return post(Xfer::kSend, peer, const_cast<void*>(buf), bytes, dep);
}

Comm::Xfer* Comm::postRecv(int peer, void* buf, size_t bytes, const Xfer* dep) {
  return post(Xfer::kRecv, peer, buf, bytes, dep);
}

Comm::Xfer* Comm::postRecvReduce(int peer, void* buf, size_t bytes, const Xfer* dep) {
  PLAIT_CHECK(reduceFn_ != nullptr, "plait: internal: receive-reduce outside a reducing collective");
  return post(Xfer::kRecvReduce, peer, buf, bytes, dep);
}

Comm::Xfer* Comm::postSendEnc(int peer, const void* src, size_t values, DType vdt, float div, const Xfer* dep) {
  PLAIT_CHECK(ctx_.spec.codec != codec::Codec::kNone, "plait: internal: codec transfer without a codec");
  Xfer* x = post(Xfer::kSendEnc, peer, const_cast<void*>(src), codec::encodedBytes(ctx_.spec, values), dep);
  x->values = values, x->vdt = vdt, x->div = div;
  return x;
}

Comm::Xfer* Comm::postRecvDec(int peer, void* dst, size_t values, DType vdt, const Xfer* dep) {
  PLAIT_CHECK(ctx_.spec.codec != codec::Codec::kNone, "plait: internal: codec transfer without a codec");
  Xfer* x = post(Xfer::kRecvDec, peer, dst, codec::encodedBytes(ctx_.spec, values), dep);
  x->values = values, x->vdt = vdt;
  return x;
}

Comm::Xfer* Comm::postRecvDecAcc(int peer, float* acc, size_t values, const Xfer* dep) {
  PLAIT_CHECK(ctx_.spec.codec != codec::Codec::kNone, "plait: internal: codec transfer without a codec");
  Xfer* x = post(Xfer::kRecvDecAcc, peer, acc, codec::encodedBytes(ctx_.spec, values), dep);
  x->values = values, x->vdt = DType::kFloat32;
  return x;
}

// How far a codec transfer may go: its length, or its dependency's progress rounded down to whole codec blocks.
size_t Comm::codecLimit(const Xfer* x) const {
  if (!x->dep || x->dep->done >= x->len) return x->len;
  const size_t bb = codec::blockBytes(ctx_.spec);
  return x->dep->done / bb * bb;
}

namespace {
// The zero padding after a message's payload (every message is a multiple of 8 bytes on the wire).
bool writePad(Xfer* x, Channel* ch) {
  static const char kZeros[8] = {};
  if (x->done != x->len || x->padDone >= x->pad) return false;
  size_t w = ch->write(kZeros, size_t(x->pad - x->padDone));
  x->padDone = uint8_t(x->padDone + w);
  return w > 0;
}

bool readPad(Xfer* x, Channel* ch) {
  if (x->done != x->len || x->padDone >= x->pad) return false;
  char tmp[8];
  size_t r = ch->read(tmp, size_t(x->pad - x->padDone));
  x->padDone = uint8_t(x->padDone + r);
  return r > 0;
}
}  // namespace

void Comm::postSendEncShared(const std::vector<int>& peers, const void* src, size_t values, DType vdt, float div,
                             const Xfer* dep) {
  PLAIT_CHECK(ctx_.spec.codec != codec::Codec::kNone, "plait: internal: codec transfer without a codec");
  // One shared stream per collective: two streams whose sends sit in different orders in the peers' FIFO queues
  // could each hold the slots the other's readers need.
  PLAIT_CHECK(encShared_.empty(), "plait: internal: a second shared encoder in one collective");
  const size_t bb = codec::blockBytes(ctx_.spec);
  encShared_.push_back(EncShared{static_cast<const char*>(src), values, vdt, div, dep,
                                 codec::encodedBytes(ctx_.spec, values), std::max<size_t>(1, chunkBytes_ / bb), 0});
  EncShared& e = encShared_.back();
  e.segWire = e.perSeg * bb;
  for (int p : peers) {
    Xfer* x = postSendEnc(p, src, values, vdt, div, dep);
    x->shared = &e;
    e.readers.push_back(x);
  }
}

bool Comm::canProduceShared(const EncShared& e) const {
  const size_t k = e.produced, lo = k * e.segWire;
  if (lo >= e.len) return false;
  const size_t hi = std::min(e.len, lo + e.segWire);
  if (e.dep && e.dep->done < hi) return false;  // the dependency has not finished these blocks yet
  for (const Xfer* r : e.readers)               // a send still on the segment this slot holds
    if (r->done < r->len && r->done / e.segWire + EncShared::kSlots <= k) return false;
  return true;
}

bool Comm::sharedSegmentReady(const Xfer* x) const {
  const EncShared& e = *x->shared;
  const size_t k = x->done / e.segWire;
  return k < e.produced || (k == e.produced && canProduceShared(e));
}

void Comm::produceShared(EncShared& e) {
  if (!canProduceShared(e)) return;
  const size_t k = e.produced;
  if (!e.slots) e.slots.reset(new char[EncShared::kSlots * e.segWire]);
  const size_t v0 = k * e.perSeg * ctx_.spec.block, nv = std::min(e.values - v0, e.perSeg * ctx_.spec.block);
  codec::encode(ctx_.spec, e.vdt, e.src + v0 * dtypeSize(e.vdt), nv, e.div,
                e.slots.get() + (k % EncShared::kSlots) * e.segWire);
  ++e.produced;
}

bool Comm::advanceSendEnc(Xfer* x) {
  Channel* ch = channels_[x->peer].get();
  bool moved = false;
  if (x->hdrDone < sizeof(WireHeader)) {
    size_t w = ch->write(reinterpret_cast<char*>(&x->hdr) + x->hdrDone, sizeof(WireHeader) - x->hdrDone);
    x->hdrDone += w;
    if (x->hdrDone < sizeof(WireHeader)) return w > 0;
    moved = true;
  }
  const codec::Spec& s = ctx_.spec;
  const size_t bb = codec::blockBytes(s), B = s.block;
  if (x->shared && x->segOff == x->segLen && x->done < x->len) {
    // Segment k of the shared stream: encoded once for every send.
    EncShared& e = *x->shared;
    const size_t k = x->done / e.segWire;
    if (k >= e.produced) produceShared(e);
    if (k < e.produced) {
      x->segPtr = e.slots.get() + (k % EncShared::kSlots) * e.segWire;
      x->segLen = std::min(e.segWire, x->len - k * e.segWire);
      x->segOff = 0;
    }
  }
  // Encode the next segment once the previous one is out: whole blocks, at most about chunkBytes of wire.
  if (!x->shared && x->segOff == x->segLen) {
    const size_t wireDone = x->done;  // bytes of encoded stream written so far (== whole segments)
    const size_t limit = codecLimit(x);
    if (wireDone < limit) {
      const size_t perSeg = std::max<size_t>(1, chunkBytes_ / bb);
      const size_t blk0 = wireDone / bb;
      const size_t v0 = blk0 * B;
      size_t nv = std::min(x->values - v0, perSeg * B);
      if (limit < x->len) nv = std::min(nv, (limit - wireDone) / bb * B);
      if (nv > 0) {
        if (!x->seg) x->seg.reset(new char[perSeg * bb]);
        codec::encode(s, x->vdt, x->buf + v0 * dtypeSize(x->vdt), nv, x->div, x->seg.get());
        x->segPtr = x->seg.get();
        if (x->residual) {
          // What quantization dropped, from the bytes just encoded: -(-v + decoded), exact negations.
          const float* v = reinterpret_cast<const float*>(x->buf) + v0;
          float* r = x->residual + v0;
          for (size_t i = 0; i < nv; ++i) r[i] = -v[i];
          codec::decodeAccumulate(s, x->seg.get(), nv, r);
          for (size_t i = 0; i < nv; ++i) r[i] = -r[i];
        }
        x->segLen = codec::encodedBytes(s, nv);
        x->segOff = 0;
      }
    }
  }
  if (x->segOff < x->segLen) {
    size_t w = ch->write(x->segPtr + x->segOff, x->segLen - x->segOff);
    x->segOff += w;
    x->done += w;
    moved |= w > 0;
  }
  moved |= writePad(x, ch);
  if (x->done == x->len && x->padDone == x->pad) x->seg.reset();
  return moved;
}

bool Comm::advanceRecvDec(Xfer* x) {
  Channel* ch = channels_[x->peer].get();
  bool moved = false;
  const codec::Spec& s = ctx_.spec;
  const size_t bb = codec::blockBytes(s), B = s.block;
  const size_t limit = codecLimit(x);
  auto decodeAt = [&](const void* p, size_t wire) {
    const size_t v0 = x->done / bb * B;
    const size_t nv = x->done + wire == x->len ? x->values - v0 : wire / bb * B;
    if (x->kind == Xfer::kRecvDecAcc)
      codec::decodeAccumulate(s, p, nv, reinterpret_cast<float*>(x->buf) + v0);
    else
      codec::decode(s, p, nv, x->vdt, x->buf + v0 * dtypeSize(x->vdt));
  };
  if (x->done < limit && x->segOff == 0) {
    // Whole blocks (or the stream's last, partial block) straight out of the ring / receive buffer.
    const size_t want = std::min(limit - x->done, std::max(chunkBytes_ / bb, size_t(1)) * bb);
    const void* p = nullptr;
    size_t n = std::min(ch->peek(&p), want);
    size_t take = x->done + n == x->len ? n : n / bb * bb;
    if (take > 0) {
      decodeAt(p, take);
      ch->consume(take);
      x->done += take;
      moved = true;
    }
  }
  if (x->done < limit && (x->segOff > 0 || !moved)) {
    // A block split where the ring wraps or a TCP receive buffer ends (or a ring smaller than a block): gathered
    // piece by piece into this transfer's own buffer, reading through to the socket.
    const size_t one = std::min(bb, x->len - x->done);
    if (!x->seg) x->seg.reset(new char[bb]);
    size_t r = ch->read(x->seg.get() + x->segOff, one - x->segOff);
    x->segOff += r;
    moved |= r > 0;
    if (x->segOff == one) {
      decodeAt(x->seg.get(), one);
      x->done += one;
      x->segOff = 0;
    }
  }
  moved |= readPad(x, ch);
  return moved;
}

char* Comm::scratch(size_t bytes) {
  if (devActive_ && eng_) return eng_->scratch(bytes);
  if (scratch_.size() < bytes) scratch_.resize(bytes);
  return scratch_.data();
}


static std::string describeSchedule(uint8_t code) {
  if (code == 0) return "";
  const int a = (code & 0x0f) - 1;
  std::string name = (code & Comm::kSchedServers) ? "summation servers (mixed partition)"
                     : a >= 0 && a <= int(Algo::kHierTree) ? algoName(Algo(a)) : "?";
  if (code & Comm::kSchedCompressed)
    return cat(", schedule compressed ", name, (code & Comm::kSchedAverage) ? " (AVG)" : " (SUM)");
  if (!(code & Comm::kSchedServers) && Algo(a) == Algo::kDirect) name += code & 0x80 ? " one-shot" : " two-shot";
  return cat(", schedule ", name);
}

static std::string describeHeader(const WireHeader& h) {
  DType dt = DType(h.dtype);
  return cat(collName(Coll(h.coll)), "(seq ", h.seq, ", dtype ", dt < DType::kCount ? dtypeName(dt) : "?", ", op ",
             RedOp(h.op) < RedOp::kCount ? redOpName(RedOp(h.op)) : "?", ", count ", h.count,
             Coll(h.coll) == Coll::kSendRecv ? ", tag " : ", root ",
             (h.flags & Comm::kSchedCompressed) ? cat("-, compression ", codec::codecName(codec::Codec(uint32_t(h.root) >> 24)),
                                                     " block ", uint32_t(h.root) & 0xffffff)
                                                 : cat(h.root),
             describeSchedule(h.flags), ", message ",
             h.bytes, " bytes)");
}

void Comm::checkHeader(const Xfer* x, const WireHeader& got) const {
  const WireHeader& e = x->hdr;
  PLAIT_CHECK(got.magic == kWireMagic, "plait: rank ", rank_, ": garbage on the stream from peer rank ", x->peer,
              " during ", where(), " (bad magic)");
  bool same = got.seq == e.seq && got.coll == e.coll && got.count == e.count && got.bytes == e.bytes &&
              got.root == e.root && got.flags == e.flags;
  bool reducing = Coll(e.coll) == Coll::kAllreduce || Coll(e.coll) == Coll::kReduce ||
                  Coll(e.coll) == Coll::kReduceScatter;
  if (reducing) same = same && got.op == e.op;
  if (Coll(e.coll) != Coll::kBarrier && Coll(e.coll) != Coll::kMonitoredBarrier) same = same && got.dtype == e.dtype;
  if (!same && Coll(e.coll) == Coll::kBroadcast && got.coll == e.coll && got.seq == e.seq && got.root != e.root)
    throw Error(cat("plait: broadcast seq ", e.seq, ": rank ", x->peer, " believes the root is ", got.root, ", rank ",
                    rank_, " says ", e.root, " (collective mismatch between rank ", rank_, " and rank ", x->peer, ": rank ",
                    x->peer, " sent ", describeHeader(got), " but rank ", rank_, " expected ", describeHeader(e), ")"));
  if (!same)
    throw Error(cat("plait: ", Coll(e.coll) == Coll::kSendRecv ? "point-to-point" : "collective",
                    " mismatch between rank ", rank_, " and rank ", x->peer, ": rank ", x->peer,
                    " sent ", describeHeader(got), " but rank ", rank_, " expected ", describeHeader(e)));
}

bool Comm::advanceSend(Xfer* x) {
  Channel* ch = channels_[x->peer].get();
  bool moved = false;
  constexpr size_t kSmall = 224;  // header and a small payload go out as one write
  if (x->hdrDone == 0 && x->len <= kSmall && (!x->dep || x->dep->done >= x->len)) {
    alignas(16) char msg[sizeof(WireHeader) + kSmall + 8];
    std::memcpy(msg, &x->hdr, sizeof(WireHeader));
    if (x->len) std::memcpy(msg + sizeof(WireHeader), x->buf, x->len);
    std::memset(msg + sizeof(WireHeader) + x->len, 0, x->pad);
    size_t w = ch->write(msg, sizeof(WireHeader) + x->len + x->pad);
    x->hdrDone = std::min(w, sizeof(WireHeader));
    x->done = std::min(w - x->hdrDone, x->len);
    x->padDone = uint8_t(w - x->hdrDone - x->done);
    return w > 0;
  }
  if (x->hdrDone < sizeof(WireHeader)) {
    size_t w = ch->write(reinterpret_cast<char*>(&x->hdr) + x->hdrDone, sizeof(WireHeader) - x->hdrDone);
    x->hdrDone += w;
    if (x->hdrDone < sizeof(WireHeader)) return w > 0;
    moved = true;
  }
  size_t limit = x->dep ? std::min(x->len, x->dep->done) : x->len;
  if (x->done < limit) {
    size_t w = ch->write(x->buf + x->done, std::min(limit - x->done, chunkBytes_));
    x->done += w;
    moved |= w > 0;
  }
  moved |= writePad(x, ch);
  return moved;
}

bool Comm::advanceRecv(Xfer* x) {
  Channel* ch = channels_[x->peer].get();
  bool moved = false;
  size_t limit = x->dep ? std::min(x->len, x->dep->done) : x->len;
  if (x->done < limit) {
    if (x->kind == Xfer::kRecv) {
      size_t r = ch->read(x->buf + x->done, std::min(limit - x->done, chunkBytes_));
      x->done += r;
      moved = r > 0;
    } else {
      const size_t es = elemBytes_;
      size_t want = std::min(limit - x->done, std::max(chunkBytes_, es));
      const void* p = nullptr;
      size_t n = std::min(ch->peek(&p), want);
      n -= n % es;
      if (n > 0) {
        reduceFn_(x->buf + x->done, x->buf + x->done, p, n / es);
        ch->consume(n);
        x->done += n;
        moved = true;
      } else if (want >= es && ch->available() >= es) {  // an element split where a TCP receive buffer ends
        alignas(16) char tmp[16];
        ch->read(tmp, es);
        reduceFn_(x->buf + x->done, x->buf + x->done, tmp, 1);
        x->done += es;
        moved = true;
      }
    }
  }
  moved |= readPad(x, ch);
  return moved;
}

bool Comm::wantRead(int p) const {
  const Inbound& in = in_[p];
  return !recvQ_[p].empty() || !p2pRecvQ_[p].empty() || (!anyQ_.empty() && !in.quiet) || in.x || in.unx ||
         in.hdrDone > 0;
}

Comm::Xfer* Comm::bindAny(size_t k, int peer) {
  AnyRecv a = std::move(anyQ_[k]);
  anyQ_.erase(anyQ_.begin() + long(k));
  --pending_;  // the bound transfer below counts instead
  xfers_.push_back(Xfer{Xfer::kRecv, peer, a.buf, a.len, nullptr});
  Xfer* x = &xfers_.back();
  x->hdr = WireHeader{kWireMagic, p2pRecvSeq_[peer]++, uint8_t(Coll::kSendRecv), uint8_t(DType::kUInt8),
                      uint8_t(RedOp::kSum), 0, a.tag, a.len, a.len};
  x->pad = uint8_t((8 - a.len % 8) % 8);
  x->deadline = a.deadline;
  AnyDone done = std::move(a.done);
  x->onDone = [done = std::move(done), peer](const std::string* err) { done(err, err ? -1 : peer); };
  p2pRecvQ_[peer].push_back(x);
  ++pending_;
  return x;
}

bool Comm::bindP2P(int peer, const WireHeader& h) {
  if (!unexpected_[peer].empty()) return false;  // older messages from this peer are still unclaimed: keep order
  if (p2pRecvQ_[peer].empty()) {
    size_t k = 0;
    while (k < anyQ_.size() && anyQ_[k].tag != h.root) ++k;
    if (k == anyQ_.size()) return false;
    bindAny(k, peer);
  }
  Xfer* x = p2pRecvQ_[peer].front();
  x->got = h;
  x->hdrDone = sizeof(WireHeader);
  checkHeader(x, h);
  in_[peer].x = x;
  return true;
}

void Comm::matchUnexpected(int peer) {
  auto& uq = unexpected_[peer];
  while (!uq.empty() && uq.front().complete()) {
    Unexpected& u = uq.front();
    if (p2pRecvQ_[peer].empty()) {
      size_t k = 0;
      while (k < anyQ_.size() && anyQ_[k].tag != u.hdr.root) ++k;
      if (k == anyQ_.size()) return;
      bindAny(k, peer);
    }
    Xfer* x = p2pRecvQ_[peer].front();
    x->got = u.hdr;
    x->hdrDone = sizeof(WireHeader);
    checkHeader(x, u.hdr);
    if (x->len) std::memcpy(x->buf, u.data.data(), x->len);
    x->done = x->len;
    x->padDone = x->pad;
    uq.pop_front();
    p2pRecvQ_[peer].pop_front();
    retire(x);
  }
}

void Comm::matchUnexpectedOrFail(int peer) {
  try {
    matchUnexpected(peer);
  } catch (const std::exception& e) {
    fail(e.what());
  }
}

bool Comm::progressRecv(int p) {
  Channel* ch = channels_[p].get();
  Inbound& in = in_[p];
  bool moved = false;
  while (true) {
    if (!in.x && !in.unx) {
      if (in.hdrDone < sizeof(WireHeader)) {
        // A new message is read only for a receive posted from this peer (or one from any source): a peer that
        // finished and closed its connection has nothing more to say, and reading on would find the end of stream.
        const bool directed = !recvQ_[p].empty() || !p2pRecvQ_[p].empty();
        if (!directed && (anyQ_.empty() || in.quiet)) return moved;
        size_t r = 0;
        try {
          r = ch->read(reinterpret_cast<char*>(&in.hdr) + in.hdrDone, sizeof(WireHeader) - in.hdrDone);
        } catch (const Error&) {
          if (directed || in.hdrDone > 0) throw;
          in.quiet = true;  // only a receive from any source was listening: this peer is done, not failed
          return moved;
        }
        in.hdrDone += r;
        moved |= r > 0;
        if (in.hdrDone < sizeof(WireHeader)) return moved;
        PLAIT_CHECK(in.hdr.magic == kWireMagic, "plait: rank ", rank_, ": garbage on the stream from peer rank ", p,
                    " during ", where(), " (bad magic)");
      }
      if (Coll(in.hdr.coll) == Coll::kSendRecv) {
        if (!bindP2P(p, in.hdr)) {
          // Nobody asked for it yet: buffer it, so that a collective behind it on the stream is not held up.
          uint64_t n = in.hdr.bytes;
          PLAIT_CHECK(n <= (uint64_t(1) << 40), "plait: rank ", rank_, ": peer rank ", p,
                      " announced a point-to-point message of ", n, " bytes (corrupt stream?)");
          // Buffered as it arrives: a header's claim alone (up to 1 TiB) must not allocate anything.
          unexpected_[p].push_back(Unexpected{in.hdr, {}, 0});
          in.unx = &unexpected_[p].back();
        }
      } else {
        if (recvQ_[p].empty()) return moved;  // parked until this rank's collective posts its receive
        Xfer* x = recvQ_[p].front();
        x->got = in.hdr;
        x->hdrDone = sizeof(WireHeader);
        checkHeader(x, in.hdr);
        in.x = x;
      }
      in.hdrDone = 0;
      moved = true;
    }
    if (in.unx) {
      Unexpected& u = *in.unx;
      const size_t declared = size_t(u.hdr.bytes);
      const size_t total = declared + (8 - u.hdr.bytes % 8) % 8;
      char pad[8];
      while (u.got < total) {
        if (u.got < declared && u.got == u.data.size())  // room for what may come next: at most doubling
          u.data.resize(std::min(declared, u.got + std::max(u.got, size_t(64) << 10)));
        size_t r = u.got < declared ? ch->read(u.data.data() + u.got, u.data.size() - u.got)
                                    : ch->read(pad, total - u.got);
        if (r == 0) return moved;
        u.got += r;
        moved = true;
      }
      in.unx = nullptr;
      matchUnexpected(p);
      continue;
    }
    Xfer* x = in.x;
    moved |= x->kind >= Xfer::kRecvDec ? advanceRecvDec(x) : advanceRecv(x);
    if (!finished(x)) return moved;
    in.x = nullptr;
    auto& q = x->onDone ? p2pRecvQ_[p] : recvQ_[p];
    PLAIT_CHECK(!q.empty() && q.front() == x, "plait: internal: rank ", rank_, ": receive queue out of order");
    q.pop_front();
    retire(x);
  }
}

void Comm::trimXfers() {
  // Transfers finish roughly in posting order; dependencies only point within one collective, which is over.
  if (pending_ == 0) xfers_.clear();
  while (!xfers_.empty() && finished(&xfers_.front())) xfers_.pop_front();
}

void Comm::retire(Xfer* x) {
  --pending_;
  if (x->onDone) {
    Done d = std::move(x->onDone);
    x->onDone = nullptr;
    try {
      d(nullptr);
    } catch (const std::exception& e) {
      // The completion itself failed (the torch layer's copy into a non-contiguous destination raised): its owner
      // hears the error through the same callback, and the communicator fails (drive), so no transfer that may
      // point at memory its owner is about to free stays queued.
      std::string m = cat("plait: rank ", rank_, ": completing a ", x->kind == Xfer::kSend ? "send to" : "recv from",
                          " rank ", x->peer, " failed: ", e.what());
      try {
        d(&m);
      } catch (...) {
      }
      throw Error(m);
    }
  } else {
    --pendingColl_;
  }
}

bool Comm::progressPass() {
  bool moved = false;
  for (int p = 0; p < size_; ++p) {
    auto& sq = sendQ_[p];
    while (!sq.empty()) {
      Xfer* x = sq.front();
      moved |= x->kind == Xfer::kSendEnc ? advanceSendEnc(x) : advanceSend(x);
      if (!finished(x)) break;
      sq.pop_front();
      retire(x);
    }
    if (channels_[p] && wantRead(p)) moved |= progressRecv(p);
  }
  return moved;
}

std::string Comm::describePending() const {
  std::string s;
  for (int p = 0; p < size_; ++p) {
    if (!sendQ_[p].empty()) {
      const Xfer* x = sendQ_[p].front();
      s += cat(s.empty() ? "" : "; ", "send to rank ", p, " (", x->done, "/", x->len, " bytes)");
    }
    for (const auto* q : {&recvQ_[p], &p2pRecvQ_[p]}) {
      if (q->empty()) continue;
      const Xfer* x = q->front();
      s += cat(s.empty() ? "" : "; ", x->onDone ? "point-to-point " : "", "receive from rank ", p, " (", x->done, "/",
               x->len, " bytes", x->hdrDone < sizeof(WireHeader) ? ", nothing arrived" : "", ")");
    }
  }
  if (!anyQ_.empty()) s += cat(s.empty() ? "" : "; ", anyQ_.size(), " receive(s) from any source");
  return s;
}

void Comm::checkPeersAlive() {
  // A local peer that failed leaves its error in this rank's segment before it exits: check that first, so the
  // error names the original failure even when the rendezvous store went away with the failed rank.
  if (shm_) {
    std::string why;
    int by = shm_->abortedBy(&why);
    if (by >= 0)
      throw PeerFailed(cat("plait: rank ", rank_, ": ", where(), " aborted because peer rank ", by, " failed: ", why));
  }
  for (int p = 0; p < size_; ++p) {
    // Only peers something is waiting for: a peer that exits after its last send is not a failure for a receive
    // from any source that another peer may still satisfy (that one ends at its timeout if nobody does).
    // A collective's header parked with nothing posted is not a wait either (its payload is in the ring).
    const Inbound& in = in_[p];
    if (p == rank_ || (sendQ_[p].empty() && recvQ_[p].empty() && p2pRecvQ_[p].empty() && !in.x && !in.unx))
      continue;
    if (!channels_[p] || channels_[p]->kind() != TransportKind::kShm) continue;
    if (shm_->peerGone(p)) {
      // A peer that wrote its last message and then exited is gone, but what it wrote is in the ring: it died
      // only if nothing more can be moved (the caller checks again once the engine is idle), and if what this rank
      // still waits to receive from it is not all in the ring already (a receive that waits its turn behind another
      // peer's data, e.g. a tree root's second child, moves later).
      if (progressPass()) return;
      if (sendQ_[p].empty() && goneDataSuffices(p)) continue;
      throw Error(cat("plait: rank ", rank_, ": peer rank ", p, " (same host) died during ", where()));
    }
  }
}

bool Comm::goneDataSuffices(int p) const {
  size_t need = 0;
  const Inbound& in = in_[p];
  for (const auto* q : {&recvQ_[p], &p2pRecvQ_[p]})
    for (const Xfer* x : *q) {
      need += (x->len - x->done) + size_t(x->pad - x->padDone);
      if (x != in.x) need += sizeof(WireHeader) - std::min(sizeof(WireHeader), x->hdrDone);
    }
  if (!in.x && !in.unx) {
    if (in.hdrDone == sizeof(WireHeader)) return false;  // a parked collective's header: nothing behind it moves
    need -= std::min(need, in.hdrDone);  // a header half read belongs to the next receive
  }
  return need > 0 && channels_[p]->available() >= need;
}

void Comm::addTcpPollFds(std::vector<pollfd>& fds) const {
  fds.push_back(pollfd{wakeFd_, POLLIN, 0});
  for (int p = 0; p < size_; ++p) {
    if (!channels_[p] || channels_[p]->kind() != TransportKind::kTcp) continue;
    if (wantRead(p)) {
      // Not when the bound receive can take nothing now (it waits on a dependency), nor for a collective's header
      // parked until the collective is posted: the socket would stay readable and poll would return at once.
      const Inbound& in = in_[p];
      bool blocked = in.x && (in.x->dep ? std::min(in.x->len, in.x->dep->done) : in.x->len) <= in.x->done &&
                     in.x->done < in.x->len;
      bool parked = !in.x && !in.unx && in.hdrDone == sizeof(WireHeader);
      if (!blocked && !parked) fds.push_back(pollfd{channels_[p]->pollFd(false), POLLIN, 0});
    }
    if (sendQ_[p].empty()) continue;
    const Xfer* x = sendQ_[p].front();
    size_t limit = x->dep ? std::min(x->len, x->dep->done) : x->len;
    // A shared-encoder send between segments can move only once its next segment is (or can be) encoded: otherwise
    // the socket stays writable and poll would return at once.
    bool sharedWaits = x->shared && x->segOff == x->segLen && x->done < x->len && !sharedSegmentReady(x);
    if (x->hdrDone < sizeof(WireHeader) || (x->done < limit && !sharedWaits) ||
        (x->done == x->len && x->padDone < x->pad))
      fds.push_back(pollfd{channels_[p]->pollFd(true), POLLOUT, 0});
  }
}

bool Comm::slowWait(bool anyShm, bool anyTcp) {
  if (anyShm && anyTcp && shm_->bellFd() >= 0) {
    // Both at once (a host leader in a hierarchical collective): one poll(2) on the TCP sockets and the shared-memory
    // doorbell socket, so data from either side wakes this rank at once.
    shm_->announcePoll();
    if (progressPass()) {
      shm_->retractPoll();
      return true;
    }
    std::vector<pollfd> fds{pollfd{shm_->bellFd(), POLLIN, 0}};
    addTcpPollFds(fds);
    poll(fds.data(), fds.size(), 2);
    shm_->retractPoll();
    drainWake();
    return false;
  }
  if (anyTcp) {
    std::vector<pollfd> fds;
    addTcpPollFds(fds);
    poll(fds.data(), fds.size(), anyShm ? 0 : 2);
    drainWake();
  }
  if (anyShm) {
    uint32_t ticket = shm_->announce();
    if (progressPass()) {  // something arrived while announcing: no sleep
      shm_->retract();
      return true;
    }
    shm_->sleep(ticket, anyTcp ? 200 : 2000);
  } else if (!anyTcp) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return false;
}

void Comm::drainWake() {
  uint64_t v;
  while (read(wakeFd_, &v, sizeof(v)) > 0) {
  }
}

void Comm::checkP2PDeadlines(Clock::time_point now) {
  for (auto* qs : {&sendQ_, &p2pRecvQ_})
    for (int p = 0; p < size_; ++p) {
      auto& q = (*qs)[p];
      if (q.empty() || !q.front()->onDone || now < q.front()->deadline) continue;
      const Xfer* x = q.front();
      throw Error(cat("plait: rank ", rank_, ": Timed out after ", timeout().count(), " ms in ",
                      x->kind == Xfer::kSend ? "send to" : "recv from", " rank ", p, " (tag ", x->hdr.root, ", ",
                      x->done, "/", x->len, " bytes done)"));
    }
  for (const AnyRecv& a : anyQ_)
    if (now >= a.deadline)
      throw Error(cat("plait: rank ", rank_, ": Timed out after ", timeout().count(),
                      " ms in recv from any source (tag ", a.tag, ", ", a.len, " bytes): no peer sent it"));
}

bool Comm::waitAll(std::chrono::milliseconds timeout, bool throwOnTimeout) {
  if (devActive_ && eng_) {  // enqueue: the device does the waiting (the host, for the host path's CPU engine)
    try {
      eng_->flush();
    } catch (const PeerFailed& e) {
      devXfers_.clear();
      fail(e.what(), true);
    } catch (const std::exception& e) {
      // The stream may hold half a schedule: the group cannot be trusted any more, and peers must hear of it.
      devXfers_.clear();
      fail(cat(e.what(), " (", where(), ", device)"));
    }
    devXfers_.clear();
    checkDeviceErrors();
    trace_->waited();
    return true;
  }
  bool ok = pendingColl_ == 0 || drive(Clock::now() + timeout, false, throwOnTimeout, timeout);
  if (ok) {
    trimXfers();
    trace_->waited();
  }
  return ok;
}


void Comm::interrupt() {
  interrupt_.store(true, std::memory_order_release);
  uint64_t one = 1;
  if (wakeFd_ >= 0) (void)!write(wakeFd_, &one, sizeof(one));
  if (shm_) shm_->poke();
}

bool Comm::progressP2P(std::chrono::microseconds budget) {
  if (pending_ > pendingColl_) drive(Clock::now() + budget, true, false, timeout());
  trimXfers();
  return pending_ > 0;
}

bool Comm::drive(Clock::time_point deadline, bool p2pOnly, bool throwOnTimeout, std::chrono::milliseconds timeout) {
  const auto start = Clock::now();
  auto idleSince = start;
  bool idle = false;
  // Spin while the ranks have a core each; yield, then sleep on the doorbell. Never spin forever.
  const auto spinFor = std::chrono::microseconds(oversubscribed_ ? 0 : knobs().spinUs);
  const auto yieldFor = std::chrono::microseconds(oversubscribed_ ? 100 : std::max(knobs().yieldUs, knobs().spinUs));
  // Nothing is posted while the engine is driven, so which transports are involved is fixed for this call.
  bool anyShm = false, anyTcp = false;
  for (int p = 0; p < size_; ++p) {
    if (!channels_[p] || (sendQ_[p].empty() && !wantRead(p))) continue;
    (channels_[p]->kind() == TransportKind::kShm ? anyShm : anyTcp) = true;
  }
  try {
    while (p2pOnly ? pending_ > pendingColl_ : pendingColl_ > 0) {
      if (abortRequested_.load(std::memory_order_relaxed)) checkAbort();
      if (p2pOnly && interrupt_.exchange(false, std::memory_order_acq_rel)) return false;
      if (progressPass()) {
        idle = false;
        continue;
      }
      auto now = Clock::now();
      if (!idle) {
        idle = true;
        idleSince = now;
      }
      auto idleFor = now - idleSince;
      if (idleFor < spinFor) {
        ++stats_.spinsIdle;
        cpuRelax();
        continue;
      }
      if (idleFor < yieldFor) {
        ++stats_.yields;
        sched_yield();
        continue;
      }
      if (pending_ > pendingColl_) checkP2PDeadlines(now);
      if (now >= deadline) {
        if (!throwOnTimeout) return false;
        throw Error(cat("plait: rank ", rank_, ": Timed out after ", timeout.count(), " ms in ", where(),
                        " waiting for: ", describePending()));
      }
      // The check interval spans calls: point-to-point progress runs in short drives (20 ms), and a local check
      // that restarted with every drive would never fire.
      if (now - lastPeerCheck_ > std::chrono::milliseconds(50)) {
        lastPeerCheck_ = now;
        checkPeersAlive();
      }
      ++stats_.sleeps;
      if (slowWait(anyShm, anyTcp)) idle = false;
    }
  } catch (const PeerFailed& e) {
    fail(e.what(), true);
  } catch (const Error& e) {
    fail(e.what());
  } catch (const std::exception& e) {
    // Anything else (a completion callback's copy raising c10::Error, bad_alloc): the transfers still queued point
    // at buffers their owners may free once this error reaches them, so the communicator must fail and drop them.
    fail(cat("plait: rank ", rank_, ": ", where(), ": unexpected error while driving transfers: ", e.what()));
  } catch (...) {
    fail(cat("plait: rank ", rank_, ": ", where(), ": unknown exception while driving transfers"));
  }
  return true;
}

Comm::Done Comm::traced(Done done, uint32_t seq, uint8_t dir, int tag, size_t bytes, int peer) {
  if (!trace_->enabled() || !done) return done;
  uint64_t id = trace_->open(seq, uint8_t(Coll::kSendRecv), uint8_t(DType::kUInt8), dir, tag, bytes, false, peer);
  return [tr = trace_, id, d = std::move(done)](const std::string* error) {
    tr->closeP2P(id, error);
    d(error);
  };
}

void Comm::isend(const void* buf, size_t bytes, int peer, int tag, Done done) {
  PLAIT_CHECK(peer >= 0 && peer < size_ && peer != rank_, "plait: rank ", rank_, ": send to invalid peer rank ", peer,
              " (group size ", size_, ")");
  begin(CollCtx{Coll::kSendRecv, DType::kUInt8, RedOp::kSum, tag, bytes});
  Xfer* x = postSend(peer, buf, bytes);
  x->onDone = traced(std::move(done), x->hdr.seq, 0, tag, bytes, peer);
  x->deadline = Clock::now() + timeout();
}

void Comm::irecv(void* buf, size_t bytes, int peer, int tag, Done done) {
  PLAIT_CHECK(peer >= 0 && peer < size_ && peer != rank_, "plait: rank ", rank_,
              ": recv from invalid peer rank ", peer, " (group size ", size_, ")");
  begin(CollCtx{Coll::kSendRecv, DType::kUInt8, RedOp::kSum, tag, bytes});
  Xfer* x = postRecv(peer, buf, bytes);
  x->onDone = traced(std::move(done), x->hdr.seq, 1, tag, bytes, peer);
  x->deadline = Clock::now() + timeout();
  matchUnexpectedOrFail(peer);  // the message may be here already
}

void Comm::irecvAny(void* buf, size_t bytes, int tag, AnyDone done) {
  PLAIT_CHECK(size_ > 1, "plait: rank ", rank_, ": recv from any source in a group of one rank would never finish");
  begin(CollCtx{Coll::kSendRecv, DType::kUInt8, RedOp::kSum, tag, bytes});
  if (trace_->enabled() && done) {
    uint64_t id = trace_->open(0, uint8_t(Coll::kSendRecv), uint8_t(DType::kUInt8), 1, tag, bytes, false, -1);
    done = [tr = trace_, id, d = std::move(done)](const std::string* error, int src) {
      tr->closeP2P(id, error, src);
      d(error, src);
    };
  }
  anyQ_.push_back(AnyRecv{static_cast<char*>(buf), bytes, tag, std::move(done), Clock::now() + timeout()});
  ++pending_;
  // A message already buffered from some peer (lowest rank first) may be the one.
  for (int p = 0; p < size_ && !anyQ_.empty(); ++p)
    if (p != rank_ && p2pRecvQ_[p].empty()) matchUnexpectedOrFail(p);
}

}  // namespace plait
