// Algorithm choice by an alpha-beta cost model. Inputs are the same on every rank (topology, measured link, bytes,
// forced algorithm), so every rank picks the same schedule: ranks that disagree would deadlock.
//
// One host: per-schedule latency and per-byte cost tables fitted to bench/core/core_bench (shared memory).
// Several hosts: the link between hosts is the bottleneck, so a schedule costs
//   (latency steps) x (link alpha) + (bytes through the busiest host's link) x (link beta) + (work inside hosts),
// where the bytes through each host's link are counted exactly from the schedule's own peer pattern
// (computeLinkLoads), and alpha and beta are measured once when the group is created (Comm::probeLink).
#pragma once

#include <string>
#include <vector>

#include "plait/comm.h"
#include "plait/kernels/codec.h"

namespace plait {

struct AllreducePlan {
  Algo algo;     // never kAuto or kHier
  bool oneShot;  // direct: every rank reduces the whole buffer itself
  bool forced;
  double predictedUs;
  // The model's prediction for each schedule (hierarchical ones are +inf on one host).
  double ringUs, treeUs, oneShotUs, twoShotUs, hierRingUs, hierTreeUs;
};
// Fills t's cross* fields from where each rank lives (hostOf[rank] = host index).
void computeLinkLoads(Topology& t, const std::vector<int>& hostOf);
// Cheap enough for every call (no allocation); explain() formats the reasoning for PLAIT_DEBUG=INFO.
AllreducePlan planAllreduce(const Topology& t, size_t bytes, Algo forced);
std::string explain(const AllreducePlan& p, const Topology& t, size_t bytes);

// The host path's share of an element-wise device collective of `bytes` (one host; see DESIGN.md, "Host resources").
// Each path costs a fixed time per call plus bytes over its rate:
//   device  t_d(M) = c_d + M / B_d            (B_d: the device engine's all-reduce rate)
//   host    t_h(M) = c_h + M / B_h,  B_h = min(B_pcie, B_sum, B_path)   (downloads and uploads at once on their own
//           streams and the CPU summation, pipelined chunk by chunk; B_path: the host path end to end, measured)
// Both run at once on their shares, so the split that finishes both together is
//   alpha = (M / B_d + c_d - c_h) / (M (1 / B_h + 1 / B_d)),   clamped to [0, 1],
// predicted time max(c_d + (1 - alpha) M / B_d, c_h + alpha M / B_h). alpha is 0 where the predicted gain over the
// device path alone is below the host path's fixed cost c_h (the gain would be within the model's noise).
HostSplit planHostSplit(const HostPathRates& r, size_t bytes);
// B_h: min(B_pcie, B_sum), and the end-to-end rate where measured.
double hostPathGBps(const HostPathRates& r);
// Below this the host path never pays (its fixed cost); the rates are not even measured.
constexpr size_t kHostPathMinBytes = size_t(1) << 20;
// The whole decision for a device all-reduce of `bytes`, from what every rank knows alike: whether the group is on
// one host, PLAIT_HOST_PATH / PLAIT_HOST_SHARE, the measured rates. needsRates (optional): set when the answer waits
// for the rates to be measured (auto, no fixed share, large enough, not measured yet).
HostSplit decideHostSplit(bool oneHost, const HostPathRates& r, size_t bytes, bool* needsRates = nullptr);

// Whether a compressed all-reduce pays (compression="auto"), or what an explicit codec will run. The same inputs on
// every rank, so every rank decides the same. `requested` kNone with autoMode false: no compression.
struct CompressionPlan {
  codec::Spec spec;  // codec kNone: send full precision
  bool hier = false;
  double plainUs = 0, compressedUs = 0;  // the model's predictions (0 when not modelled)
  std::string why;
};
// Input throughput of the CPU codec per rank (encode + decode-accumulate of every byte, measured by bench/codec.py
// on this machine's class of CPU), bytes per microsecond.
constexpr double kCodecBytesPerUs = 1500.0;
CompressionPlan planCompression(const Topology& t, size_t count, DType dt, bool autoMode, const codec::Spec& requested,
                                uint32_t autoBlock, Algo forced, bool hierPossible);

// ---- summation servers (README "Summation servers"; DESIGN.md "Host resources: BytePS arithmetic") ----
// n workers (host leaders) with links of B_w, k servers with links of B_s (bytes per microsecond, each direction),
// a buffer of M bytes. BytePS's mixed partition sends a share s of the buffer through the servers (each server sums
// s/k of it for all n workers) while the workers all-reduce the rest among themselves with a ring. Per direction,
//   a worker moves  W(s) = (2(n-1)/n) (1-s) M + s M       bytes,
//   a server moves  V(s) = n s M / k                       bytes,
// and both run at once, so t(s) = max(W(s) / B_w, V(s) / B_s) plus fixed costs. The busiest link finishes first at
//   s* = 2(n-1) k B_s / (n^2 B_w + k (n-2) B_s),   clamped to 1,
// where t = 2n(n-1) M / (n^2 B_w + k (n-2) B_s): the ring's 2(n-1)M/(n B_w) divided by 1 + k(n-2)B_s/(n^2 B_w)
// (1 + k(n-2)/n^2 at equal rates: 1.5x for n = k = 4, nothing for n = 2). From k* = n B_w / B_s servers on, s* = 1
// and t = M / B_w: more servers add nothing.
// Fixed costs: the ring's 2(n-1) link latencies (when s < 1); the servers' round trip, 2 alpha, plus filling the
// pipeline with one segment from every worker, n seg / B_s (when s > 0).
struct ServerSplit {
  double share = 0;                  // s
  double predictedUs = 0, ringUs = 0;  // t(s), and the workers' ring alone
  double workerBytes = 0, serverBytes = 0;  // per direction through a worker's / a server's link
  std::string why;
};
// A given share s (0..1).
ServerSplit serverTime(int n, int k, double workerGBps, double serverGBps, double alphaUs, double bytes,
                       double segBytes, double s);
// The planner: s* where it beats the ring alone, else 0 (and 0 for n < 2, k = 0, or no rates).
ServerSplit planServerSplit(int n, int k, double workerGBps, double serverGBps, double alphaUs, double bytes,
                            double segBytes);
// k*: the number of servers from which the busiest link is the worker's own (more add nothing).
double serversSaturate(int n, double workerGBps, double serverGBps);

}  // namespace plait
