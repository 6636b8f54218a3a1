// Algorithm choice by an alpha-beta cost model. Inputs are the same on every rank (topology, bytes, forced
// algorithm), so every rank picks the same schedule: ranks that disagree would deadlock.
#pragma once

#include <string>

#include "plait/comm.h"

namespace plait {

struct LinkCost {
  double alphaUs;     // latency of one message step
  double betaUsPerB;  // inverse bandwidth of moving one byte through the transport (copy in + copy out)
  double gammaUsPerB; // reducing one byte
};
LinkCost linkCost(const Topology& t);

struct AllreducePlan {
  Algo algo;
  bool oneShot;  // direct: every rank reduces the whole buffer itself
  double predictedUs;
  std::string why;
};
AllreducePlan planAllreduce(const Topology& t, size_t bytes, Algo forced);

}  // namespace plait
