#include "plait/algo/cost_model.h"

#include <cmath>

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
// TCP over loopback on the same machine; a real network link is slower and is measured per link in the
// multi-host issue.
constexpr Table kTcp{30.0, {1 / 1500.0, 1 / 1500.0, 1 / 1500.0}, {1 / 2000.0, 1 / 2000.0, 1 / 2000.0},
                     {1 / 2000.0, 1 / 2000.0, 1 / 2000.0}, {1 / 1800.0, 1 / 1800.0, 1 / 1800.0}};

const Table& table(const Topology& t) { return !t.allShm ? kTcp : t.oversubscribed ? kShmBusy : kShm; }
}  // namespace

AllreducePlan planAllreduce(const Topology& t, size_t bytes, Algo forced) {
  const Table& c = table(t);
  const int n = t.nranks;
  const double N = double(bytes), a = c.alphaUs;
  const double frac = double(n - 1) / n;
  AllreducePlan p{};
  // ring: 2(n-1) steps, 2(n-1)/n of the data through every rank
  p.ringUs = 2.0 * (n - 1) * a + 2.0 * frac * N * c.ring.at(bytes);
  // double binary tree: 2 log2(n) steps; a rank moves the whole buffer (half per tree, interior in one tree)
  p.treeUs = 2.0 * std::ceil(std::log2(double(n))) * a + (n > 2 ? 1.5 : 1.0) * N * c.tree.at(bytes);
  // one-shot: one step; every rank takes in and folds n-1 whole buffers
  p.oneShotUs = a + (n - 1) * N * c.oneShot.at(bytes);
  // two-shot: reduce-scatter and all-gather with all peers at once
  p.twoShotUs = 2.0 * a + 0.2 * (n - 1) * a + 2.0 * frac * N * c.twoShot.at(bytes);
  const double direct = std::min(p.oneShotUs, p.twoShotUs);
  p.oneShot = p.oneShotUs <= p.twoShotUs;
  p.forced = forced != Algo::kAuto;
  if (p.forced) {
    p.algo = forced;
    p.predictedUs = forced == Algo::kRing ? p.ringUs : forced == Algo::kTree ? p.treeUs : direct;
  } else {
    p.algo = Algo::kDirect;
    p.predictedUs = direct;
    if (p.ringUs < p.predictedUs) p.algo = Algo::kRing, p.predictedUs = p.ringUs;
    if (p.treeUs < p.predictedUs) p.algo = Algo::kTree, p.predictedUs = p.treeUs;
  }
  return p;
}

std::string explain(const AllreducePlan& p, const Topology& t, size_t bytes) {
  return cat(p.forced ? "forced by PLAIT_ALGO/Options.algo" : "lowest predicted time", " (predicted us: ring ",
             p.ringUs, ", tree ", p.treeUs, ", direct one-shot ", p.oneShotUs, ", two-shot ", p.twoShotUs, "; ",
             !t.allShm ? "tcp" : t.oversubscribed ? "shm, more ranks than cores" : "shm", ", alpha ",
             table(t).alphaUs, " us, ", t.nranks, " ranks, ", bytes, " B)");
}

}  // namespace plait
