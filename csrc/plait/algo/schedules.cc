#include "plait/algo/schedules.h"

namespace plait {

namespace {
inline int mod(int a, int n) { return ((a % n) + n) % n; }
}  // namespace

Blocks evenBlocks(size_t count, int n, size_t es) {
  Blocks b;
  size_t base = count / n, extra = count % n, off = 0;
  for (int i = 0; i < n; ++i) {
    size_t len = (base + (size_t(i) < extra ? 1 : 0)) * es;
    b.off.push_back(off);
    b.len.push_back(len);
    off += len;
  }
  return b;
}

Blocks packedBlocks(const std::vector<size_t>& bytes) {
  Blocks b;
  size_t off = 0;
  for (size_t len : bytes) {
    b.off.push_back(off);
    b.len.push_back(len);
    off += len;
  }
  return b;
}

TreeLinks heapTree(int rank, int n, int root, bool mirror) {
  auto toV = [&](int r) {
    int v = mod(r - root, n);
    return mirror ? mod(n - v, n) : v;
  };
  auto toR = [&](int v) { return mod((mirror ? mod(n - v, n) : v) + root, n); };
  TreeLinks t;
  int v = toV(rank);
  if (v > 0) t.parent = toR((v - 1) / 2);
  for (int k = 1; k <= 2; ++k)
    if (2 * v + k < n) t.child[t.nchild++] = toR(2 * v + k);
  return t;
}

void ringAllreduce(Comm& c, char* buf, const Blocks& b) {
  const int n = c.size(), r = c.rank(), next = mod(r + 1, n), prev = mod(r - 1, n);
  if (n == 1) return;
  const Xfer* last = nullptr;
  // Reduce-scatter: step s sends block r-s and reduces block r-s-1 from prev into place; rank r ends up owning
  // the fully reduced block r+1. Step s+1 forwards exactly what step s reduced, segment by segment.
  for (int s = 0; s < n - 1; ++s) {
    int sb = mod(r - s, n), rb = mod(r - s - 1, n);
    c.postSend(next, buf + b.off[sb], b.len[sb], last);
    last = c.postRecvReduce(prev, buf + b.off[rb], b.len[rb]);
  }
  // All-gather: step t sends block r+1-t (reduced here, or received at step t-1) and receives block r-t.
  for (int t = 0; t < n - 1; ++t) {
    int sb = mod(r + 1 - t, n), rb = mod(r - t, n);
    c.postSend(next, buf + b.off[sb], b.len[sb], last);
    last = c.postRecv(prev, buf + b.off[rb], b.len[rb]);
  }
  c.waitAll();
}

void treeUpDown(Comm& c, char* buf, size_t len, const TreeLinks& t, bool up, bool down) {
  const Xfer* acc = nullptr;  // how far the reduction into buf has come
  const Xfer* sentUp = nullptr;
  if (up) {
    for (int i = 0; i < t.nchild; ++i) acc = c.postRecvReduce(t.child[i], buf, len, acc);
    if (t.parent >= 0) sentUp = c.postSend(t.parent, buf, len, acc);
  }
  if (down) {
    const Xfer* have = acc;
    // A rank overwrites a segment with the result only after it has sent that segment up.
    if (t.parent >= 0) have = c.postRecv(t.parent, buf, len, sentUp);
    for (int i = 0; i < t.nchild; ++i) c.postSend(t.child[i], buf, len, have);
  }
}

void directTwoShot(Comm& c, char* buf, const Blocks& b) {
  const int n = c.size(), r = c.rank();
  const Xfer* acc = nullptr;
  for (int p = 0; p < n; ++p)
    if (p != r) c.postSend(p, buf + b.off[p], b.len[p]);
  // Reduce peers' copies of block r in rank order (deterministic), each segment as soon as it arrives.
  for (int p = 0; p < n; ++p)
    if (p != r) acc = c.postRecvReduce(p, buf + b.off[r], b.len[r], acc);
  for (int p = 0; p < n; ++p)
    if (p != r) c.postSend(p, buf + b.off[r], b.len[r], acc);
  // A peer sends its reduced block only after consuming ours, so overwriting block p here is safe.
  for (int p = 0; p < n; ++p)
    if (p != r) c.postRecv(p, buf + b.off[p], b.len[p]);
  c.waitAll();
}

}  // namespace plait
