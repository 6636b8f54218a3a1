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

}  // namespace plait
