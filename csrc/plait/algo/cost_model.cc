#include "plait/algo/cost_model.h"

#include <cmath>

namespace plait {

// Constants measured with bench/allreduce.py on the project's 2-core machine (see README, "Cost model").
LinkCost linkCost(const Topology& t) {
  if (t.allShm) return LinkCost{1.5, 1.0 / 9000.0, 1.0 / 12000.0};
  return LinkCost{30.0, 1.0 / 1500.0, 1.0 / 12000.0};
}

AllreducePlan planAllreduce(const Topology& t, size_t bytes, Algo forced) {
  const int n = t.nranks;
  const LinkCost c = linkCost(t);
  const double N = double(bytes);
  const double frac = double(n - 1) / n;
  // ring: 2(n-1) steps, 2(n-1)/n of the data over each link, (n-1)/n of it reduced
  double ring = 2.0 * (n - 1) * c.alphaUs + 2.0 * frac * N * c.betaUsPerB + frac * N * c.gammaUsPerB;
  // double binary tree, pipelined: 2 log2(n) steps; each interior rank moves about the whole buffer up and down
  double depth = std::ceil(std::log2(double(n)));
  double tree = 2.0 * depth * c.alphaUs + 2.0 * N * c.betaUsPerB + N * c.gammaUsPerB;
  // direct one-shot: one step, every rank receives and reduces (n-1) whole buffers
  double oneShot = c.alphaUs + (n - 1) * N * (c.betaUsPerB + c.gammaUsPerB);
  // direct two-shot: reduce-scatter + all-gather with every peer at once: 2 steps, the ring's bytes, plus the
  // cost of (n-1) concurrent streams per rank
  double twoShot = 2.0 * c.alphaUs + (n - 1) * 0.2 * c.alphaUs + 2.0 * frac * N * c.betaUsPerB * (1.0 + 0.05 * (n - 2)) +
                   frac * N * c.gammaUsPerB;
  double direct = std::min(oneShot, twoShot);
  AllreducePlan p{};
  p.oneShot = oneShot <= twoShot;
  if (forced != Algo::kAuto) {
    p.algo = forced;
    p.predictedUs = forced == Algo::kRing ? ring : forced == Algo::kTree ? tree : direct;
    p.why = cat("forced by PLAIT_ALGO/Options.algo");
  } else {
    p.algo = Algo::kDirect;
    p.predictedUs = direct;
    if (ring < p.predictedUs) p.algo = Algo::kRing, p.predictedUs = ring;
    if (tree < p.predictedUs) p.algo = Algo::kTree, p.predictedUs = tree;
    p.why = "lowest predicted time";
  }
  p.why = cat(p.why, " (predicted us: ring ", ring, ", tree ", tree, ", direct ", direct,
              p.oneShot ? " one-shot" : " two-shot", "; ", t.allShm ? "shm" : "tcp", " alpha ", c.alphaUs,
              " us, ", n, " ranks, ", bytes, " B)");
  return p;
}

}  // namespace plait
