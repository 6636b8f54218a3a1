#include "plait/algo/cost_model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "plait/algo/schedules.h"

namespace plait {

namespace {
// Per-byte cost (us/B) of each schedule in three size regimes: the buffer in cache (<= 1 MiB), in the last-level
// cache (<= 16 MiB), in DRAM. Fitted to bench/core/core_bench on the project's 2-core machine (see README, "Cost
// model"); "busy" is the same machine with more local ranks than cores.
struct Beta {
  double cache, llc, dram;
  double at(size_t bytes) const { return bytes <= (1u << 20) ? cache : bytes <= (16u << 20) ? llc : dram; }
};
struct Table {
  double alphaUs;
  Beta oneShot, twoShot, ring, tree;
};
constexpr Table kShm{1.0, {1 / 10000.0, 1 / 5000.0, 1 / 4000.0}, {1 / 20000.0, 1 / 10700.0, 1 / 6200.0},
                     {1 / 19000.0, 1 / 6400.0, 1 / 5700.0}, {1 / 14500.0, 1 / 9500.0, 1 / 9700.0}};
constexpr Table kShmBusy{3.0, {1 / 6000.0, 1 / 3000.0, 1 / 2500.0}, {1 / 11000.0, 1 / 2900.0, 1 / 2900.0},
                         {1 / 11000.0, 1 / 2900.0, 1 / 2900.0}, {1 / 11000.0, 1 / 5000.0, 1 / 4800.0}};
// TCP between ranks of one host (PLAIT_TRANSPORT=tcp) over loopback.
constexpr Table kTcp{30.0, {1 / 1500.0, 1 / 1500.0, 1 / 1500.0}, {1 / 2000.0, 1 / 2000.0, 1 / 2000.0},
                     {1 / 2000.0, 1 / 2000.0, 1 / 2000.0}, {1 / 1800.0, 1 / 1800.0, 1 / 1800.0}};

// Several hosts: the cost of one step inside a host (shared memory), and of the engine's per-message work on
// top of the link's own latency.
constexpr double kLocalAlphaUs = 2.0;
constexpr double kLocalUsPerByte = 1 / 4000.0;  // reduce one buffer into another out of a peer's ring
constexpr double kMsgUs = 3.0;                  // engine + syscalls per message sent over TCP
constexpr double kCallUs = 10.0;                // dist.all_reduce's Python, dispatcher and engine entry
// A machine with more ranks than cores (emulated hosts on one box) pays for context switches: per collective
// (every rank must be scheduled) and per step (the next rank must be woken). Fitted on the 2-core machine with 4
// ranks (medians of bench/cluster.py runs; single runs scatter by +-50% there); both vanish on real hosts with a
// core per rank.
constexpr double kOversubCallUs = 110.0, kOversubStepUs = 20.0;
// Concurrent TCP flows per rank cost CPU beyond the bytes (more sockets, wake-ups, smaller writes): the direct
// schedules talk to every peer at once. Fitted on the emulated 10 Gbit/s links, where the CPU is the bottleneck.
constexpr double kFlowPenalty = 0.06;

// Device engine (ranks on one host sharing or peering GPUs): every transfer is a stream wait, one kernel and a flag
// write; the memory traffic of all ranks goes through the same HBM when they share a GPU. Not yet measured on a
// GPU (no GPU machine was available when this was written): initial values from H100 figures (launch + stream
// memory operation ~4 us, HBM3 ~2 TB/s achieved), to be fitted by bench/gpu_allreduce.py.
constexpr double kDevOpUs = 4.0;             // a wait + kernel + flag write, per transfer or local op
constexpr double kDevUsPerByte = 1 / 2.0e6;  // one byte read or written in HBM

const Table& table(const Topology& t) { return !t.allShm ? kTcp : t.oversubscribed ? kShmBusy : kShm; }

double log2ceil(int n) { return n <= 1 ? 0.0 : std::ceil(std::log2(double(n))); }

// Adds each direction of each edge's traffic to its hosts' egress and ingress.
struct Load {
  std::vector<double> out, in;
  explicit Load(int nhosts) : out(nhosts, 0.0), in(nhosts, 0.0) {}
  void edge(int hostFrom, int hostTo, double share) {
    if (hostFrom == hostTo) return;
    out[hostFrom] += share;
    in[hostTo] += share;
  }
  double busiest() const {
    double m = 0;
    for (size_t h = 0; h < out.size(); ++h) m = std::max(m, std::max(out[h], in[h]));
    return m;
  }
};

// Double binary tree over `ranks` (indices into hostOf): each tree carries half the buffer up and down every edge.
double treeLoad(const std::vector<int>& ranks, const std::vector<int>& hostOf, int nhosts) {
  Load l(nhosts);
  const int n = int(ranks.size());
  for (int mirror = 0; mirror < 2; ++mirror)
    for (int v = 0; v < n; ++v) {
      TreeLinks t = heapTree(v, n, 0, mirror != 0);
      if (t.parent < 0) continue;
      int hv = hostOf[ranks[v]], hp = hostOf[ranks[t.parent]];
      l.edge(hv, hp, 0.5);
      l.edge(hp, hv, 0.5);
    }
  return l.busiest();
}
}  // namespace

void computeLinkLoads(Topology& t, const std::vector<int>& hostOf) {
  const int n = int(hostOf.size()), nh = t.nhosts;
  if (nh <= 1) return;
  std::vector<int> all(n), leaders;
  std::vector<bool> seen(nh, false);
  for (int r = 0; r < n; ++r) {
    all[r] = r;
    if (!seen[hostOf[r]]) seen[hostOf[r]] = true, leaders.push_back(r);
  }
  Load ring(nh), one(nh), two(nh);
  for (int r = 0; r < n; ++r) {
    ring.edge(hostOf[r], hostOf[(r + 1) % n], 2.0 * (n - 1) / n);
    for (int p = 0; p < n; ++p) {
      if (p == r) continue;
      one.edge(hostOf[r], hostOf[p], 1.0);
      two.edge(hostOf[r], hostOf[p], 2.0 / n);
    }
  }
  t.crossRing = ring.busiest();
  t.crossOneShot = one.busiest();
  t.crossTwoShot = two.busiest();
  t.crossTree = treeLoad(all, hostOf, nh);
  t.crossHierRing = 2.0 * (nh - 1) / nh;
  t.crossHierTree = treeLoad(leaders, hostOf, nh);
}

AllreducePlan planAllreduce(const Topology& t, size_t bytes, Algo forced) {
  const int n = t.nranks;
  const double N = double(bytes);
  AllreducePlan p{};
  const double inf = std::numeric_limits<double>::infinity();
  if (t.device) {
    // Bytes each rank reads + writes, per byte of the buffer, excluding the copy in and out of staging (the same
    // for all): ring and two-shot pull-reduce (n-1)/n (3 passes) and pull (n-1)/n (2 passes); one-shot pulls n-1
    // whole buffers and folds them; the tree moves the whole buffer up and down, in halves.
    const double frac = double(n - 1) / n, hbm = kDevUsPerByte * (t.maxLocal > 1 ? t.maxLocal : 1);
    p.ringUs = 2.0 * (n - 1) * kDevOpUs + 5.0 * frac * N * hbm;
    p.twoShotUs = (2.0 * (n - 1) + 0.5) * kDevOpUs + 5.0 * frac * N * hbm;
    p.oneShotUs = (2.0 * (n - 1) + 1) * kDevOpUs + 5.0 * (n - 1) * N * hbm;
    p.treeUs = 4.0 * log2ceil(n) * kDevOpUs + 2.0 * 3.0 * N * hbm;
    p.hierRingUs = p.hierTreeUs = inf;
  } else if (t.nhosts <= 1) {
    const Table& c = table(t);
    const double a = c.alphaUs;
    const double frac = double(n - 1) / n;
    // ring: 2(n-1) steps, 2(n-1)/n of the data through every rank
    p.ringUs = 2.0 * (n - 1) * a + 2.0 * frac * N * c.ring.at(bytes);
    // double binary tree: 2 log2(n) steps; a rank moves the whole buffer (half per tree, interior in one tree)
    p.treeUs = 2.0 * log2ceil(n) * a + (n > 2 ? 1.5 : 1.0) * N * c.tree.at(bytes);
    // one-shot: one step; every rank takes in and folds n-1 whole buffers
    p.oneShotUs = a + (n - 1) * N * c.oneShot.at(bytes);
    // two-shot: reduce-scatter and all-gather with all peers at once
    p.twoShotUs = 2.0 * a + 0.2 * (n - 1) * a + 2.0 * frac * N * c.twoShot.at(bytes);
    p.hierRingUs = p.hierTreeUs = inf;
  } else {
    const double over = t.cpuLoad > 1 ? t.cpuLoad : 0.0;
    const double a = t.linkAlphaUs + kMsgUs + over * kOversubStepUs, beta = t.linkUsPerByte;
    const double call = kCallUs + over * kOversubCallUs;
    const double flows = 1.0 + kFlowPenalty * std::max(0, n - 2);
    const int L = t.nhosts, k = t.maxLocal;
    // Work inside a host that cannot hide behind the link: reducing what arrives (once per byte received) and,
    // for hierarchical schedules, the host's own reduce and broadcast, pipelined with the link phase.
    const double fold = N * kLocalUsPerByte;
    p.ringUs = call + 2.0 * (n - 1) * a + t.crossRing * N * beta + fold;
    p.treeUs = call + 2.0 * log2ceil(n) * a + t.crossTree * N * beta + fold;
    p.oneShotUs = call + a + (n - 2) * kMsgUs + t.crossOneShot * N * beta * flows + (n - 1) * fold;
    p.twoShotUs = call + 2.0 * a + 2.0 * (n - 2) * kMsgUs + t.crossTwoShot * N * beta * flows + fold;
    const double local = k > 1 ? 2.0 * kLocalAlphaUs + 2.0 * (k - 1) * N * kLocalUsPerByte : 0.0;
    auto hier = [&](double cross, double steps, int blocks) {
      const double link = call + steps * a + cross * N * beta + fold;
      // The local phases overlap the link phase block by block: one block's worth shows, or all of the local
      // work if it is the slower of the two.
      return std::max(link, local) + local / blocks;
    };
    p.hierRingUs = k > 1 ? hier(t.crossHierRing, 2.0 * (L - 1), L) : inf;
    p.hierTreeUs = k > 1 ? hier(t.crossHierTree, 2.0 * log2ceil(L), 2) : inf;
    if (k == 1) {  // one rank per host: hierarchical is the flat schedule over the same ranks
      if (forced == Algo::kHierRing) forced = Algo::kRing;
      if (forced == Algo::kHierTree) forced = Algo::kTree;
      if (forced == Algo::kHier) forced = Algo::kAuto;
    }
  }
  const double direct = std::min(p.oneShotUs, p.twoShotUs);
  p.oneShot = p.oneShotUs <= p.twoShotUs;
  p.forced = forced != Algo::kAuto && forced != Algo::kHier;
  struct Option {
    Algo algo;
    double us;
  };
  const Option options[] = {{Algo::kDirect, direct},
                            {Algo::kRing, p.ringUs},
                            {Algo::kTree, p.treeUs},
                            {Algo::kHierRing, p.hierRingUs},
                            {Algo::kHierTree, p.hierTreeUs}};
  p.algo = Algo::kDirect;
  p.predictedUs = inf;
  for (const Option& o : options) {
    bool allowed = forced == Algo::kAuto || o.algo == forced ||
                   (forced == Algo::kHier && (o.algo == Algo::kHierRing || o.algo == Algo::kHierTree));
    if (allowed && o.us < p.predictedUs) p.algo = o.algo, p.predictedUs = o.us;
  }
  if (p.predictedUs == inf) {  // a hierarchical schedule forced on one host: reduce to the leader and back
    p.algo = forced == Algo::kHierTree ? Algo::kHierTree : Algo::kHierRing;
    p.predictedUs = p.ringUs;
  }
  return p;
}

std::string explain(const AllreducePlan& p, const Topology& t, size_t bytes) {
  std::string where =
      t.device ? cat("device engine, ", kDevOpUs, " us per transfer, ", 1e-6 / kDevUsPerByte, " TB/s HBM (initial "
                     "values, not yet fitted on a GPU)")
      : t.nhosts > 1
          ? cat(t.nhosts, " hosts, link alpha ", t.linkAlphaUs, " us, ", 1e-3 / t.linkUsPerByte, " GB/s (",
                t.linkSource, ")")
          : cat(!t.allShm ? "tcp" : t.oversubscribed ? "shm, more ranks than cores" : "shm", ", alpha ",
                table(t).alphaUs, " us");
  return cat(p.forced ? "forced by PLAIT_ALGO/Options.algo" : "lowest predicted time", " (predicted us: ring ",
             p.ringUs, ", tree ", p.treeUs, ", direct one-shot ", p.oneShotUs, ", two-shot ", p.twoShotUs,
             t.nhosts > 1 ? cat(", hier_ring ", p.hierRingUs, ", hier_tree ", p.hierTreeUs) : std::string(), "; ",
             where, ", ", t.nranks, " ranks, ", bytes, " B)");
}

CompressionPlan planCompression(const Topology& t, size_t count, DType dt, bool autoMode, const codec::Spec& requested,
                                uint32_t autoBlock, Algo forced, bool hierPossible) {
  CompressionPlan p;
  p.hier = hierPossible;
  if (!autoMode) {
    p.spec = requested;
    p.why = requested.codec == codec::Codec::kNone ? "compression off" : "set by compression / PLAIT_COMPRESSION";
    return p;
  }
  const size_t es = dtypeSize(dt), bytes = count * es;
  if (!codec::codecSupports(dt)) {
    p.why = cat("auto: ", dtypeName(dt), " is not compressible (float32, bfloat16, float16 are)");
    return p;
  }
  if (t.nranks <= 1 || count == 0) {
    p.why = "auto: nothing crosses a link";
    return p;
  }
  if (t.nhosts <= 1 || t.device) {
    p.why = "auto: one host (shared memory moves full-precision bytes faster than the codec can encode them)";
    return p;
  }
  const codec::Spec s = codec::makeSpec(codec::Codec::kInt8, autoBlock);
  const double ratio = double(codec::encodedBytes(s, count)) / double(std::max<size_t>(bytes, 1));
  AllreducePlan plain = planAllreduce(t, bytes, forced);
  p.plainUs = plain.predictedUs;
  // The compressed exchange is the two-shot direct pattern (or the hierarchical ring-like per-host load) on
  // `ratio` of the bytes, plus the codec work: every rank encodes and decodes about twice its share of the buffer,
  // plus the owner's re-encode, at kCodecBytesPerUs per core (more ranks than cores share them).
  const double over = t.cpuLoad > 1 ? t.cpuLoad : 1.0;
  const double cross = hierPossible ? t.crossHierRing : t.crossTwoShot;
  const double N = double(bytes);
  const double steps = 4.0 * (t.linkAlphaUs + 3.0);
  const double codecUs = 3.0 * N / std::max(1, t.maxLocal > 1 && hierPossible ? t.maxLocal : 1) / kCodecBytesPerUs * over;
  p.compressedUs = 10.0 + steps + cross * N * ratio * t.linkUsPerByte + codecUs;
  if (p.compressedUs < 0.9 * p.plainUs) {
    p.spec = s;
    p.why = cat("auto: int8 predicted ", p.compressedUs, " us against ", p.plainUs, " us uncompressed (",
                algoName(plain.algo), "), link ", 1e-3 / t.linkUsPerByte, " GB/s");
  } else {
    p.why = cat("auto: uncompressed predicted ", p.plainUs, " us (", algoName(plain.algo), "), int8 ", p.compressedUs,
                " us: the link is fast enough that the codec does not pay");
  }
  return p;
}

HostSplit decideHostSplit(bool oneHost, const HostPathRates& r, size_t bytes, bool* needsRates) {
  HostSplit h;
  if (needsRates) *needsRates = false;
  const Knobs& k = knobs();
  if (!oneHost) {
    h.share = 1;
    h.why = "the group spans hosts: device buffers go through host memory (pipelined chunk by chunk)";
  } else if (k.hostPath == "force") {
    h.share = 1;
    h.why = "PLAIT_HOST_PATH=force: every device collective takes the host path";
  } else if (k.hostPath == "off") {
    h.why = "device only: PLAIT_HOST_PATH=off";
  } else if (k.hostShare >= 0) {
    h.share = k.hostShare;
    h.why = cat("PLAIT_HOST_SHARE=", k.hostShare);
  } else if (bytes < kHostPathMinBytes) {
    h.why = cat("device only: ", bytes, " B is below ", kHostPathMinBytes, " B, where the host path's fixed cost rules");
  } else {
    if (needsRates && !r.measured) *needsRates = true;
    h = planHostSplit(r, bytes);
  }
  return h;
}

double hostPathGBps(const HostPathRates& r) {
  double b = std::min(r.pcieGBps, r.sumGBps);
  return r.pathGBps > 0 ? std::min(b, r.pathGBps) : b;
}

HostSplit planHostSplit(const HostPathRates& r, size_t bytes) {
  HostSplit h;
  if (!r.measured || !(r.deviceGBps > 0) || !(r.pcieGBps > 0) || !(r.sumGBps > 0)) {
    h.why = "the host path's rates are not measured (they are, at the first device all-reduce of 1 MiB or more)";
    return h;
  }
  const double M = double(bytes), bd = r.deviceGBps * 1e3, bh = hostPathGBps(r) * 1e3;  // bytes per us
  const double cd = r.deviceCallUs, ch = r.hostCallUs;
  h.deviceOnlyUs = cd + M / bd;
  h.hostOnlyUs = ch + M / bh;
  double a = M > 0 ? (M / bd + cd - ch) / (M * (1 / bh + 1 / bd)) : 0;
  a = std::max(0.0, std::min(1.0, a));
  const double split = std::max(cd + (1 - a) * M / bd, ch + a * M / bh);
  const std::string rates =
      cat("device ", r.deviceGBps, " GB/s + ", cd, " us; host ", bh * 1e-3, " GB/s + ", ch, " us: ",
          r.pathGBps > 0 && r.pathGBps < std::min(r.pcieGBps, r.sumGBps) ? "pipeline-bound, "
          : r.pcieGBps <= r.sumGBps                                         ? "PCIe-bound, "
                                                                            : "CPU-bound, ", "PCIe ", r.pcieGBps, " GB/s per direction, CPU sum ",
          r.sumGBps, " GB/s", r.pathGBps > 0 ? cat(", end to end ", r.pathGBps, " GB/s") : std::string());
  if (a <= 0 || h.deviceOnlyUs - split < ch) {
    h.share = 0;
    h.predictedUs = h.deviceOnlyUs;
    h.why = cat("device only: the split would gain ", std::max(0.0, h.deviceOnlyUs - split),
                " us, below the host path's fixed cost of ", ch, " us (", rates, ")");
    return h;
  }
  h.share = a;
  h.predictedUs = split;
  h.why = cat("host path share ", a, ": predicted ", split, " us against ", h.deviceOnlyUs, " us device only (", rates,
              ")");
  return h;
}

ServerSplit serverTime(int n, int k, double workerGBps, double serverGBps, double alphaUs, double bytes,
                       double segBytes, double s) {
  ServerSplit r;
  r.share = s;
  const double bw = workerGBps * 1e3, bs = serverGBps * 1e3;  // bytes per microsecond
  const double ringBytes = n > 1 ? 2.0 * (n - 1) / n * bytes : 0;
  r.ringUs = n > 1 ? 2.0 * (n - 1) * alphaUs + ringBytes / bw : 0;
  if (s <= 0 || k <= 0) {
    r.share = 0;
    r.workerBytes = ringBytes;
    r.predictedUs = r.ringUs;
    return r;
  }
  r.workerBytes = (n > 1 ? 2.0 * (n - 1) / n * (1 - s) * bytes : 0) + s * bytes;
  r.serverBytes = double(n) * s * bytes / k;
  const double fixedRing = s < 1 && n > 1 ? 2.0 * (n - 1) * alphaUs : 0;
  const double fixedSrv = 2 * alphaUs + double(n) * std::min(segBytes, s * bytes / k) / bs;
  r.predictedUs = std::max(fixedRing, fixedSrv) + std::max(r.workerBytes / bw, r.serverBytes / bs);
  return r;
}

double serversSaturate(int n, double workerGBps, double serverGBps) {
  return serverGBps > 0 ? n * workerGBps / serverGBps : 0;
}

ServerSplit planServerSplit(int n, int k, double workerGBps, double serverGBps, double alphaUs, double bytes,
                            double segBytes) {
  ServerSplit ring = serverTime(n, k, workerGBps, serverGBps, alphaUs, bytes, segBytes, 0);
  if (k <= 0 || n < 1 || !(workerGBps > 0) || !(serverGBps > 0)) {
    ring.why = k <= 0 ? "no servers" : "no link rates";
    return ring;
  }
  const double bw = workerGBps, bs = serverGBps;
  double s = 2.0 * (n - 1) * k * bs / (double(n) * n * bw + double(k) * (n - 2) * bs);
  if (n < 2) s = 1;  // one worker host: the ring moves nothing across hosts; only the servers could (never faster)
  s = std::min(1.0, std::max(0.0, s));
  ServerSplit mixed = serverTime(n, k, workerGBps, serverGBps, alphaUs, bytes, segBytes, s);
  if (s > 0 && mixed.predictedUs < ring.predictedUs) {
    mixed.why = cat("mixed partition: ", s, " of the buffer through ", k, " server(s), predicted ",
                    mixed.predictedUs, " us vs ring ", ring.predictedUs, " us");
    return mixed;
  }
  ring.why = cat("ring among the workers: the servers would take ", mixed.predictedUs, " us vs ", ring.predictedUs,
                 " us");
  return ring;
}

}  // namespace plait
