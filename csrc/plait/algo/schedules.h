// Schedules written once over the engine verbs (Comm::postSend / postRecv / postRecvReduce / waitAll).
//
// Vocabulary (as in gloo's allreduce.cc): a *block* is the part of the buffer that one rank owns in a
// reduce-scatter (blocks[i] for rank i); the engine moves every message in *segments* of at most chunkBytes,
// interleaving all pending messages, and a transfer posted with a dependency only moves the bytes its dependency
// has already finished, so a block is forwarded segment by segment while it is still being reduced (pipelining).
#pragma once

#include <vector>

#include "plait/comm.h"

namespace plait {

struct Blocks {
  std::vector<size_t> off, len;  // bytes
};
inline size_t totalOf(const std::vector<size_t>& v) {
  size_t s = 0;
  for (size_t x : v) s += x;
  return s;
}
// count elements split into n blocks as evenly as possible, in bytes.
Blocks evenBlocks(size_t count, int n, size_t elemBytes);
Blocks packedBlocks(const std::vector<size_t>& bytes);

struct TreeLinks {
  int parent = -1;
  int child[2] = {-1, -1};
  int nchild = 0;
};
// Binary heap tree over ranks relabelled so that `root` is node 0; `mirror` relabels v -> (n - v) mod n, which makes
// the interior nodes of one tree leaves of the other (double binary tree).
TreeLinks heapTree(int rank, int n, int root, bool mirror);

// The ranks a schedule runs over, in schedule order (all of the group, or one leader per host), and this rank's
// index among them (-1: not a member).
struct Group {
  std::vector<int> ranks;
  int me = -1;
  int size() const { return int(ranks.size()); }
};
Group allRanks(const Comm& c);
// heapTree over a group: `rootIdx` and the returned links are group indices mapped to ranks.
TreeLinks heapTree(const Group& g, int rootIdx, bool mirror);

using Xfer = Comm::Xfer;
// One entry per block: the transfer whose progress gates (or completes) that block; nullptr means "already there".
using Deps = std::vector<const Xfer*>;

// Ring reduce-scatter then all-gather over blocks among g, fully posted with dependencies; does not wait.
// ready (optional): this rank's input in block b is complete only as far as ready[b] has progressed (a reduction
// that feeds the ring, e.g. inside a host). Returns, per block, the transfer after which it holds the result here.
Deps ringAllreduce(Comm& c, const Group& g, char* buf, const Blocks& b, const Deps* ready = nullptr);
// Pipelined tree: reduce towards the root (up) and/or broadcast from it (down) over buf[0, len); does not wait.
// `ready` gates this rank's own input as above. Returns the transfer after which buf holds the result here.
const Xfer* treeUpDown(Comm& c, char* buf, size_t len, const TreeLinks& t, bool up, bool down,
                       const Xfer* ready = nullptr);
// Two-shot direct: every rank reduces its own block from all peers, then sends it to all; waits.
void directTwoShot(Comm& c, char* buf, const Blocks& b);
// Hierarchical: the ranks of each host reduce into the host's leader (its lowest rank) over the local transport,
// the leaders all-reduce across hosts (ring over per-leader blocks, or a double binary tree over two halves), and
// each leader broadcasts the result to its host. Every phase is posted at once with per-block dependencies, so
// the three overlap segment by segment. hosts[h] lists host h's ranks in increasing order; waits.
void hierAllreduce(Comm& c, char* buf, size_t count, size_t elemBytes, const std::vector<std::vector<int>>& hosts,
                   int myHost, bool treeAcross);

// The compressed direct exchange among g (algo/compressed.cc) over buf[0, count), with the current collective's
// codec (Comm::ctx().spec): values divided by div before quantizing; residual (optional, float32, div 1) gets what
// this rank's quantization dropped. Every element quantized at most twice, results bitwise identical; waits.
namespace coll {
// buf[i] = buf[i] / n for float32 / bfloat16 / float16, computed in float32, rounded once (IEEE, fixed mode).
void divideInPlace(DType dt, char* buf, size_t count, float n);
void directCompressed(Comm& c, const Group& g, char* buf, size_t count, DType dt, float div, float* residual);
}  // namespace coll

}  // namespace plait
