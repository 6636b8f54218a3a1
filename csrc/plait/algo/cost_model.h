// Algorithm choice by an alpha-beta cost model. Inputs are the same on every rank (topology, bytes, forced
// algorithm), so every rank picks the same schedule: ranks that disagree would deadlock.
#pragma once

#include <string>

#include "plait/comm.h"

namespace plait {

struct AllreducePlan {
  Algo algo;
  bool oneShot;  // direct: every rank reduces the whole buffer itself
  bool forced;
  double predictedUs;
  double ringUs, treeUs, oneShotUs, twoShotUs;  // the model's prediction for each schedule
};
// Cheap enough for every call (no allocation); explain() formats the reasoning for PLAIT_DEBUG=INFO.
AllreducePlan planAllreduce(const Topology& t, size_t bytes, Algo forced);
std::string explain(const AllreducePlan& p, const Topology& t, size_t bytes);

}  // namespace plait
