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

using Xfer = Comm::Xfer;

// Ring reduce-scatter then all-gather over blocks, fully posted with dependencies.
void ringAllreduce(Comm& c, char* buf, const Blocks& b);
// Pipelined tree: reduce towards the root (up) and/or broadcast from it (down) over buf[0, len).
void treeUpDown(Comm& c, char* buf, size_t len, const TreeLinks& t, bool up, bool down);
// Two-shot direct: every rank reduces its own block from all peers, then sends it to all.
void directTwoShot(Comm& c, char* buf, const Blocks& b);

}  // namespace plait
