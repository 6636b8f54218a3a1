// Compressed all-reduce (block-quantized, codecs in kernels/codec.h), written over the engine's codec transfers
// (Comm::postSendEnc / postRecvDec / postRecvDecAcc), which encode and decode segment by segment inside the
// transport: no tensor-sized quantized copy exists.
//
// Direct schedule over a group of n ranks (every rank, or one rank per host in the hierarchical schedule): the
// buffer is cut into n ranges that start on codec-block boundaries, range j owned by group member j.
//   1. Every rank encodes each range j != own once (values divided by `div` first: AVG divides before quantizing)
//      and sends it to its owner. The owner starts from its own values in float32 (divided, never quantized) and
//      adds the decoded ranges of the others in group order (a dependency chain), so the sum is the same whatever
//      order the bytes arrive in.
//   2. The owner encodes its sum once, segment by segment, into a few slots that every peer's send writes out
//      (Comm::postSendEncShared), and every rank decodes range j from those bytes; the owner decodes its own
//      encoding too (the encoder is deterministic). Every rank therefore ends with bitwise identical results, and every element is quantized twice at most
//      whatever the number of ranks.
// The owner's second-phase sends depend on its accumulation chain, so ranges flow back segment by segment while
// they are still being summed.
//
// Hierarchical (several hosts with the same number of ranks each, more than one): full precision inside a host over
// shared memory, quantized only across hosts. The L ranks of a host reduce-scatter the buffer into L slices (rank
// with local index i holds slice i summed over its host), the ranks with local index i on every host run the direct
// schedule above on slice i (each local rank carries its own slice across hosts, so all L of a host's ranks drive
// the host's link at once), and the host all-gathers the slices. Two quantizations, as for direct.
//
// Why no ring: a ring reduce-scatter requantizes the partial sum at every hop (n - 1 quantizations of the same
// element, so the error grows with the number of ranks); keeping two quantizations needs each partial sum to stay
// in full precision until its owner has every contribution, which is the direct schedule's exchange.
#include <algorithm>
#include <cstring>
#include <vector>

#include "plait/algo/collectives.h"
#include "plait/algo/schedules.h"
#include "plait/kernels/codec.h"
#include "plait/kernels/codec_impl.h"  // the codecs' exact half <-> float conversions

namespace plait {
namespace coll {

namespace {

// dst[i] = src[i] widened to float32 (exact).
void widenToFloat(DType dt, const char* src, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = dt == DType::kBFloat16 ? codec::bf16ToF32(h) : codec::halfToF32(h);
  }
}

}  // namespace

// buf[i] = buf[i] / n, computed in float32 and rounded once to dt (IEEE, fixed mode).
void divideInPlace(DType dt, char* buf, size_t count, float n) {
  IeeeFpScope fp;
  if (dt == DType::kFloat32) {
    float* f = reinterpret_cast<float*>(buf);
    for (size_t i = 0; i < count; ++i) f[i] = f[i] / n;
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    float v;
    widenToFloat(dt, buf + 2 * i, 1, &v);
    uint16_t h = dt == DType::kBFloat16 ? codec::f32ToBf16(v / n) : codec::f32ToHalf(v / n);
    std::memcpy(buf + 2 * i, &h, 2);
  }
}

namespace {

// n ranges of whole codec blocks (as even as possible), in values.
void blockRanges(size_t count, int n, uint32_t B, std::vector<size_t>& off, std::vector<size_t>& len) {
  const size_t blocks = (count + B - 1) / B;
  off.assign(n, 0);
  len.assign(n, 0);
  size_t base = blocks / n, extra = blocks % n, b = 0;
  for (int i = 0; i < n; ++i) {
    size_t nb = base + (size_t(i) < extra ? 1 : 0);
    off[i] = std::min(count, b * B);
    len[i] = std::min(count, (b + nb) * B) - off[i];
    b += nb;
  }
}

}  // namespace

// The direct compressed exchange among g (this rank is g.ranks[g.me]) over buf[0, count) of dtype dt; waits.
void directCompressed(Comm& c, const Group& g, char* buf, size_t count, DType dt, float div, float* residual) {
  const codec::Spec& spec = c.ctx().spec;
  const int n = g.size(), me = g.me;
  const size_t es = dtypeSize(dt);
  std::vector<size_t> off, len;
  blockRanges(count, n, spec.block, off, len);
  // The owner's accumulator: its own values in float32, divided by div (IEEE, like the encoder's division).
  float* acc;
  const size_t mine = len[me];
  {
    IeeeFpScope fp;
    if (dt == DType::kFloat32) {
      acc = reinterpret_cast<float*>(buf) + off[me];
      if (div != 1.0f)
        for (size_t i = 0; i < mine; ++i) acc[i] = acc[i] / div;
    } else {
      acc = reinterpret_cast<float*>(c.scratch(mine * sizeof(float)));
      widenToFloat(dt, buf + off[me] * es, mine, acc);
      if (div != 1.0f)
        for (size_t i = 0; i < mine; ++i) acc[i] = acc[i] / div;
    }
  }
  // Phase 1: ranges to their owners (staggered so that not every rank starts with the same peer); the owner's chain
  // of decode-accumulates runs in group order.
  if (residual) std::memset(residual + off[me], 0, mine * sizeof(float));  // this rank's own range is exact
  for (int k = 1; k < n; ++k) {
    int j = (me + k) % n;
    Xfer* x = c.postSendEnc(g.ranks[j], buf + off[j] * es, len[j], dt, div);
    if (residual) x->residual = residual + off[j];
  }
  const Xfer* chain = nullptr;
  for (int j = 0; j < n; ++j)
    if (j != me) chain = c.postRecvDecAcc(g.ranks[j], acc, mine, chain);
  // Phase 2: the owner's sum back to everyone, segment by segment behind the chain.
  // The owner's sum is encoded once, segment by segment, for all its peers.
  std::vector<int> peers;
  for (int k = 1; k < n; ++k) peers.push_back(g.ranks[(me + k) % n]);
  c.postSendEncShared(peers, acc, mine, DType::kFloat32, 1.0f, chain);
  for (int k = 1; k < n; ++k) {
    int from = (me - k + n) % n;
    c.postRecvDec(g.ranks[from], buf + off[from] * es, len[from], dt);
  }
  c.waitAll();
  // The owner's own range: decode its own encoding, so it holds exactly what the peers decoded.
  const size_t bb = codec::blockBytes(spec);
  const size_t perSeg = std::max<size_t>(1, (size_t(256) << 10) / bb) * spec.block;
  std::vector<char> tmp(codec::encodedBytes(spec, std::min(perSeg, std::max<size_t>(mine, 1))));
  for (size_t v = 0; v < mine; v += perSeg) {
    size_t nv = std::min(perSeg, mine - v);
    codec::encode(spec, DType::kFloat32, acc + v, nv, 1.0f, tmp.data());
    codec::decode(spec, tmp.data(), nv, dt, buf + (off[me] + v) * es);
  }
}

bool compressedHierarchical(const Comm& c) {
  const auto& hosts = c.hostRanks();
  if (hosts.size() < 2 || hosts[0].size() < 2) return false;
  for (const auto& h : hosts)
    if (h.size() != hosts[0].size()) return false;
  return true;
}

void allreduceCompressed(Comm& c, void* buf, size_t count, DType dtype, bool average, const codec::Spec& spec,
                         float* residual) {
  PLAIT_CHECK(!c.stageOnDevice(), "plait: rank ", c.rank(), ": all_reduce with compression ",
              codec::codecName(spec.codec), " is not supported for device tensors yet (use compression='none')");
  PLAIT_CHECK(!residual || (dtype == DType::kFloat32 && !average), "plait: rank ", c.rank(),
              ": all_reduce: error-feedback residuals need float32 SUM (checked before anything is sent)");
  Comm::CollCtx ctx{Coll::kAllreduce, dtype, RedOp::kSum, Comm::codecWord(spec), count};
  ctx.spec = spec;
  c.begin(ctx);
  const bool hier = compressedHierarchical(c);
  c.setSchedule(Comm::schedCode(hier ? Algo::kHier : Algo::kDirect) | Comm::kSchedCompressed |
                (average ? Comm::kSchedAverage : 0));
  const int n = c.size();
  const float div = average ? float(n) : 1.0f;
  char* b = static_cast<char*>(buf);
  if (n == 1) {
    // Nothing to send; AVG over one rank is the identity; nothing was quantized.
    if (residual) std::memset(residual, 0, count * sizeof(float));
    return;
  }
  // Summation servers sum their share encoded (two quantizations still: each worker's, then the server's sum).
  if (c.servers().k > 0 && serverAllreduce(c, b, count, dtype, RedOp::kSum, &spec, average, residual)) return;
  if (!hier) {
    directCompressed(c, allRanks(c), b, count, dtype, div, residual);
    return;
  }
  if (residual) {
    // The hierarchical schedule quantizes host sums, not this rank's values: no per-rank residual.
    std::memset(residual, 0, count * sizeof(float));
    residual = nullptr;
  }
  // Hierarchical: reduce-scatter inside the host (full precision), compressed across hosts, all-gather inside.
  // AVG divides every value first (in its dtype, IEEE), so half-precision host sums do not overflow either.
  if (average) divideInPlace(dtype, b, count, float(n));
  const auto& hosts = c.hostRanks();
  const int myHost = c.hostOf()[c.rank()];
  const std::vector<int>& local = hosts[myHost];
  const int L = int(local.size());
  const int li = int(std::find(local.begin(), local.end(), c.rank()) - local.begin());
  const size_t es = dtypeSize(dtype);
  std::vector<size_t> off, len;
  blockRanges(count, L, spec.block, off, len);
  const Xfer* chain = nullptr;
  for (int k = 1; k < L; ++k) {
    int j = (li + k) % L;
    c.postSend(local[j], b + off[j] * es, len[j] * es);
  }
  for (int j = 0; j < L; ++j)
    if (j != li) chain = c.postRecvReduce(local[j], b + off[li] * es, len[li] * es, chain);
  c.waitAll();
  Group across;
  for (size_t h = 0; h < hosts.size(); ++h) {
    if (int(h) == myHost) across.me = across.size();
    across.ranks.push_back(hosts[h][li]);
  }
  directCompressed(c, across, b + off[li] * es, len[li], dtype, 1.0f, nullptr);
  for (int k = 1; k < L; ++k) {
    int j = (li + k) % L, from = (li - k + L) % L;
    c.postSend(local[j], b + off[li] * es, len[li] * es);
    c.postRecv(local[from], b + off[from] * es, len[from] * es);
  }
  c.waitAll();
}

}  // namespace coll
}  // namespace plait
