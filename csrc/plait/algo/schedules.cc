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

Group allRanks(const Comm& c) {
  Group g;
  for (int r = 0; r < c.size(); ++r) g.ranks.push_back(r);
  g.me = c.rank();
  return g;
}

TreeLinks heapTree(const Group& g, int rootIdx, bool mirror) {
  TreeLinks t = heapTree(g.me, g.size(), rootIdx, mirror);
  if (t.parent >= 0) t.parent = g.ranks[t.parent];
  for (int i = 0; i < t.nchild; ++i) t.child[i] = g.ranks[t.child[i]];
  return t;
}

Deps ringAllreduce(Comm& c, const Group& g, char* buf, const Blocks& b, const Deps* ready) {
  const int n = g.size(), r = g.me;
  Deps fin(b.len.size(), nullptr);
  if (ready) fin = *ready;
  if (n == 1) return fin;
  const int next = g.ranks[mod(r + 1, n)], prev = g.ranks[mod(r - 1, n)];
  auto in = [&](int blk) -> const Xfer* { return ready ? (*ready)[blk] : nullptr; };
  const Xfer* last = nullptr;
  // Reduce-scatter: step s sends block r-s and reduces block r-s-1 from prev into place; rank r ends up owning
  // the fully reduced block r+1. Step s+1 forwards exactly what step s reduced, segment by segment.
  for (int s = 0; s < n - 1; ++s) {
    int sb = mod(r - s, n), rb = mod(r - s - 1, n);
    c.postSend(next, buf + b.off[sb], b.len[sb], s == 0 ? in(sb) : last);
    last = c.postRecvReduce(prev, buf + b.off[rb], b.len[rb], in(rb));
  }
  fin[mod(r + 1, n)] = last;
  // All-gather: step t sends block r+1-t (reduced here, or received at step t-1) and receives block r-t.
  for (int t = 0; t < n - 1; ++t) {
    int sb = mod(r + 1 - t, n), rb = mod(r - t, n);
    c.postSend(next, buf + b.off[sb], b.len[sb], last);
    last = fin[rb] = c.postRecv(prev, buf + b.off[rb], b.len[rb]);
  }
  return fin;
}

const Xfer* treeUpDown(Comm& c, char* buf, size_t len, const TreeLinks& t, bool up, bool down, const Xfer* ready) {
  const Xfer* acc = ready;  // how far the reduction into buf has come
  const Xfer* sentUp = nullptr;
  if (up) {
    for (int i = 0; i < t.nchild; ++i) acc = c.postRecvReduce(t.child[i], buf, len, acc);
    if (t.parent >= 0) sentUp = c.postSend(t.parent, buf, len, acc);
  }
  const Xfer* have = acc;
  if (down) {
    // A rank overwrites a segment with the result only after it has sent that segment up.
    if (t.parent >= 0) have = c.postRecv(t.parent, buf, len, sentUp);
    for (int i = 0; i < t.nchild; ++i) c.postSend(t.child[i], buf, len, have);
  }
  return have;
}

void hierAllreduce(Comm& c, char* buf, size_t count, size_t es, const std::vector<std::vector<int>>& hosts,
                   int myHost, bool treeAcross) {
  const int nh = int(hosts.size());
  const std::vector<int>& local = hosts[myHost];
  const int leader = local[0];
  Group leaders;
  for (const auto& h : hosts) leaders.ranks.push_back(h[0]);
  leaders.me = c.rank() == leader ? myHost : -1;
  const Blocks blk = evenBlocks(count, treeAcross ? 2 : nh, es);
  const int nb = int(blk.len.size());
  // Blocks in the order the leader's cross-host phase consumes them (in) and completes them (out), so the local
  // phases feed and drain it in step.
  std::vector<int> inOrder, outOrder;
  for (int s = 0; s < nb; ++s) {
    inOrder.push_back(treeAcross ? s : mod(myHost - s, nh));
    outOrder.push_back(treeAcross ? s : mod(myHost + 1 - s, nh));
  }
  if (c.rank() != leader) {
    for (int k : inOrder) c.postSend(leader, buf + blk.off[k], blk.len[k]);
    for (int k : outOrder) c.postRecv(leader, buf + blk.off[k], blk.len[k]);
    c.waitAll();
    return;
  }
  // Reduce the host's ranks into the leader in rank order (deterministic), block by block.
  Deps ready(nb, nullptr);
  for (int k : inOrder)
    for (size_t i = 1; i < local.size(); ++i) ready[k] = c.postRecvReduce(local[i], buf + blk.off[k], blk.len[k], ready[k]);
  Deps fin;
  if (treeAcross) {
    fin.push_back(treeUpDown(c, buf + blk.off[0], blk.len[0], heapTree(leaders, 0, false), true, true, ready[0]));
    fin.push_back(treeUpDown(c, buf + blk.off[1], blk.len[1], heapTree(leaders, 0, true), true, true, ready[1]));
  } else {
    fin = ringAllreduce(c, leaders, buf, blk, &ready);
  }
  for (int k : outOrder)
    for (size_t i = 1; i < local.size(); ++i) c.postSend(local[i], buf + blk.off[k], blk.len[k], fin[k]);
  c.waitAll();
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
