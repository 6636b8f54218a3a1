// The collectives, free functions over the communicator's engine verbs: each a schedule from schedules.cc (or a direct exchange) over the engine verbs.
#include <cstring>

#include "plait/algo/cost_model.h"
#include "plait/algo/collectives.h"
#include "plait/algo/schedules.h"

namespace plait {
namespace coll {


void allreduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, Algo algo) {
  if (c.stageOnDevice()) return deviceAllreduce(c, buf, count, dtype, op, algo);
  c.begin(Comm::CollCtx{Coll::kAllreduce, dtype, op, 0, count});
  const size_t es = dtypeSize(dtype), bytes = count * es;
  if (c.size() == 1) return;
  if (c.servers().k > 0 && serverAllreduce(c, static_cast<char*>(buf), count, dtype, op)) return;
  AllreducePlan plan = planAllreduce(c.topology(), bytes, algo != Algo::kAuto ? algo : c.forcedAlgo());
  c.setSchedule(Comm::schedCode(plan.algo, plan.algo == Algo::kDirect && plan.oneShot));
  if (infoEnabled()) {
    static thread_local std::string last;
    std::string line = cat("rank ", c.rank(), ": all_reduce of ", bytes, " B: ", algoName(plan.algo),
                           plan.algo == Algo::kDirect ? (plan.oneShot ? " one-shot" : " two-shot") : "", ", ",
                           explain(plan, c.topology(), bytes));
    std::string key = cat(algoName(plan.algo), plan.oneShot, c.size());
    if (key != last) logInfo(line);
    last = key;
  }
  char* b = static_cast<char*>(buf);
  switch (plan.algo) {
    case Algo::kRing:
      ringAllreduce(c, allRanks(c), b, evenBlocks(count, c.size(), es));
      c.waitAll();
      break;
    case Algo::kTree: {
      // Double binary tree: each tree carries half of the elements.
      size_t half = (count / 2) * es;
      treeUpDown(c, b, half, heapTree(c.rank(), c.size(), 0, false), true, true);
      treeUpDown(c, b + half, bytes - half, heapTree(c.rank(), c.size(), 0, true), true, true);
      c.waitAll();
      break;
    }
    case Algo::kHier:
    case Algo::kHierRing:
    case Algo::kHierTree:
      hierAllreduce(c, b, count, es, c.hostRanks(), c.hostOf()[c.rank()], plan.algo == Algo::kHierTree);
      break;
    case Algo::kDirect:
    case Algo::kAuto:
      if (!plan.oneShot) {
        directTwoShot(c, b, evenBlocks(count, c.size(), es));
        break;
      }
      {
        // One-shot: gather every rank's buffer, then fold in rank order so every rank computes the same bits.
        char* s = c.scratch(size_t(c.size()) * bytes);
        for (int p = 0; p < c.size(); ++p) {
          if (p == c.rank()) continue;
          c.postSend(p, b, bytes);
          c.postRecv(p, s + size_t(p) * bytes, bytes);
        }
        c.waitAll();
        c.localCopy(s + size_t(c.rank()) * bytes, b, bytes);
        c.localReduce(op, dtype, b, s, s + bytes, count);
        for (int p = 2; p < c.size(); ++p) c.localReduce(op, dtype, b, b, s + size_t(p) * bytes, count);
      }
      break;
  }
}

void broadcast(Comm& c, void* buf, size_t bytes, int root) {
  if (c.stageOnDevice()) return deviceBroadcast(c, buf, bytes, root);
  c.begin(Comm::CollCtx{Coll::kBroadcast, DType::kUInt8, RedOp::kSum, root, bytes});
  if (c.size() == 1) return;
  const TreeLinks t = heapTree(c.rank(), c.size(), root, false);
  // The root check: every rank hears from its predecessor in rank order (which does not depend on the root), the
  // tree's message when the predecessor is its parent, else an empty message posted at once. Every message carries
  // the sender's root in its header, so ranks that disagree on the root raise here, every one of them: a rank that
  // believes it is the root would otherwise only send and return (two such ranks would each return their own data).
  const int n = c.size(), next = (c.rank() + 1) % n, prev = (c.rank() + n - 1) % n;
  if (t.child[0] != next && t.child[1] != next) c.postSend(next, nullptr, 0);
  if (t.parent != prev) c.postRecv(prev, nullptr, 0);
  treeUpDown(c, static_cast<char*>(buf), bytes, t, false, true);
  c.waitAll();
}

void reduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, int root) {
  if (c.stageOnDevice()) return deviceReduce(c, buf, count, dtype, op, root);
  c.begin(Comm::CollCtx{Coll::kReduce, dtype, op, root, count});
  if (c.size() == 1) return;
  const size_t bytes = count * dtypeSize(dtype);
  TreeLinks t = heapTree(c.rank(), c.size(), root, false);
  char* acc = static_cast<char*>(buf);
  if (c.rank() != root && t.nchild > 0) {  // interior ranks accumulate in scratch: their input stays untouched
    acc = c.scratch(bytes);
    c.localCopy(acc, buf, bytes);
  }
  treeUpDown(c, acc, bytes, t, true, false);
  c.waitAll();
}

void allgather(Comm& c, const void* in, void* out, const std::vector<size_t>& bytes) {
  PLAIT_CHECK(int(bytes.size()) == c.size(), "plait: internal: all_gather needs one size per rank");
  if (c.stageOnDevice()) return deviceAllgather(c, in, out, bytes);
  Blocks b = packedBlocks(bytes);
  c.begin(Comm::CollCtx{Coll::kAllgather, DType::kUInt8, RedOp::kSum, 0, totalOf(bytes)});
  char* o = static_cast<char*>(out);
  if (in != o + b.off[c.rank()]) c.localCopy(o + b.off[c.rank()], in, b.len[c.rank()]);
  if (c.size() == 1) return;
  c.setSchedule(Comm::schedCode(c.forcedAlgo() == Algo::kRing ? Algo::kRing : Algo::kDirect));
  if (c.forcedAlgo() == Algo::kRing) {
    const int next = (c.rank() + 1) % c.size(), prev = (c.rank() + c.size() - 1) % c.size();
    const Xfer* last = nullptr;
    for (int t = 0; t < c.size() - 1; ++t) {
      int sb = (c.rank() - t + c.size()) % c.size(), rb = (c.rank() - t - 1 + 2 * c.size()) % c.size();
      c.postSend(next, o + b.off[sb], b.len[sb], last);
      last = c.postRecv(prev, o + b.off[rb], b.len[rb]);
    }
  } else {
    for (int p = 0; p < c.size(); ++p) {
      if (p == c.rank()) continue;
      c.postSend(p, o + b.off[c.rank()], b.len[c.rank()]);
      c.postRecv(p, o + b.off[p], b.len[p]);
    }
  }
  c.waitAll();
}

void reduceScatter(Comm& c, const void* in, void* out, const std::vector<size_t>& counts, DType dtype, RedOp op) {
  PLAIT_CHECK(int(counts.size()) == c.size(), "plait: internal: reduce_scatter needs one count per rank");
  if (c.stageOnDevice()) return deviceReduceScatter(c, in, out, counts, dtype, op);
  const size_t es = dtypeSize(dtype);
  std::vector<size_t> bytes(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) bytes[i] = counts[i] * es;
  Blocks b = packedBlocks(bytes);
  c.begin(Comm::CollCtx{Coll::kReduceScatter, dtype, op, 0, totalOf(counts)});
  const char* i8 = static_cast<const char*>(in);
  char* o = static_cast<char*>(out);
  c.setSchedule(Comm::schedCode(c.forcedAlgo() == Algo::kRing ? Algo::kRing : Algo::kDirect));
  if (c.size() > 1 && c.forcedAlgo() == Algo::kRing) {
    // Ring on a copy of the input, shifted so that rank r finishes with block r.
    char* s = c.scratch(totalOf(bytes));
    c.localCopy(s, i8, totalOf(bytes));
    const int next = (c.rank() + 1) % c.size(), prev = (c.rank() + c.size() - 1) % c.size();
    const Xfer* last = nullptr;
    for (int st = 0; st < c.size() - 1; ++st) {
      int sb = ((c.rank() - st - 1) % c.size() + c.size()) % c.size(), rb = ((c.rank() - st - 2) % c.size() + c.size()) % c.size();
      c.postSend(next, s + b.off[sb], b.len[sb], last);
      last = c.postRecvReduce(prev, s + b.off[rb], b.len[rb]);
    }
    c.waitAll();
    c.localCopy(o, s + b.off[c.rank()], b.len[c.rank()]);
    return;
  }
  if (o != i8 + b.off[c.rank()]) c.localCopy(o, i8 + b.off[c.rank()], b.len[c.rank()]);
  const Xfer* acc = nullptr;
  for (int p = 0; p < c.size(); ++p) {
    if (p == c.rank()) continue;
    c.postSend(p, i8 + b.off[p], b.len[p]);
    acc = c.postRecvReduce(p, o, b.len[c.rank()], acc);
  }
  c.waitAll();
}

void alltoall(Comm& c, const void* in, const std::vector<size_t>& sendBytes, void* out,
                    const std::vector<size_t>& recvBytes) {
  if (c.stageOnDevice()) return deviceAlltoall(c, in, sendBytes, out, recvBytes);
  Blocks sb = packedBlocks(sendBytes), rb = packedBlocks(recvBytes);
  c.begin(Comm::CollCtx{Coll::kAlltoall, DType::kUInt8, RedOp::kSum, 0, 0});
  const char* i8 = static_cast<const char*>(in);
  char* o = static_cast<char*>(out);
  if (sb.len[c.rank()] != rb.len[c.rank()])  // c.fail(): the peers hear of it instead of waiting out the timeout
    c.fail(cat("plait: rank ", c.rank(), ": all_to_all (seq ", c.seq(), ") sends ", sb.len[c.rank()],
             " bytes to itself but expects to receive ", rb.len[c.rank()], " (size mismatch)"));
  c.localCopy(o + rb.off[c.rank()], i8 + sb.off[c.rank()], sb.len[c.rank()]);
  for (int k = 1; k < c.size(); ++k) {  // staggered so that not every rank starts with the same peer
    int p = (c.rank() + k) % c.size(), q = (c.rank() - k + c.size()) % c.size();
    c.postSend(p, i8 + sb.off[p], sb.len[p]);
    c.postRecv(q, o + rb.off[q], rb.len[q]);
  }
  c.waitAll();
}

void gather(Comm& c, const void* in, size_t bytes, void* out, int root) {
  if (c.stageOnDevice()) return deviceGather(c, in, bytes, out, root);
  c.begin(Comm::CollCtx{Coll::kGather, DType::kUInt8, RedOp::kSum, root, bytes});
  if (c.rank() != root) {
    c.postSend(root, in, bytes);
  } else {
    char* o = static_cast<char*>(out);
    c.localCopy(o + size_t(c.rank()) * bytes, in, bytes);
    for (int p = 0; p < c.size(); ++p)
      if (p != c.rank()) c.postRecv(p, o + size_t(p) * bytes, bytes);
  }
  c.waitAll();
}

void scatter(Comm& c, const void* in, void* out, size_t bytes, int root) {
  if (c.stageOnDevice()) return deviceScatter(c, in, out, bytes, root);
  c.begin(Comm::CollCtx{Coll::kScatter, DType::kUInt8, RedOp::kSum, root, bytes});
  if (c.rank() != root) {
    c.postRecv(root, out, bytes);
  } else {
    const char* i8 = static_cast<const char*>(in);
    c.localCopy(out, i8 + size_t(c.rank()) * bytes, bytes);
    for (int p = 0; p < c.size(); ++p)
      if (p != c.rank()) c.postSend(p, i8 + size_t(p) * bytes, bytes);
  }
  c.waitAll();
}

void barrier(Comm& c) {
  c.begin(Comm::CollCtx{Coll::kBarrier, DType::kUInt8, RedOp::kSum, 0, 0});
  for (int p = 0; p < c.size(); ++p) {
    if (p == c.rank()) continue;
    c.postSend(p, nullptr, 0);
    c.postRecv(p, nullptr, 0);
  }
  c.waitAll();
}

void monitoredBarrier(Comm& c, std::chrono::milliseconds timeout, bool waitAllRanks) {
  c.begin(Comm::CollCtx{Coll::kMonitoredBarrier, DType::kUInt8, RedOp::kSum, 0, 0});
  if (c.size() == 1) return;
  if (c.rank() != 0) {
    c.postSend(0, nullptr, 0);
    c.postRecv(0, nullptr, 0);
    c.waitAll(timeout);
    return;
  }
  std::vector<Xfer*> arrivals(c.size(), nullptr);
  for (int p = 1; p < c.size(); ++p) arrivals[p] = c.postRecv(p, nullptr, 0);
  if (!c.waitAll(timeout, false)) {
    std::string missing;
    for (int p = 1; p < c.size(); ++p) {
      if (c.finished(arrivals[p])) continue;
      missing += cat(missing.empty() ? "" : ", ", p);
      if (!waitAllRanks) break;
    }
    c.fail(cat("plait: monitored_barrier: rank", waitAllRanks ? "(s) " : " ", missing,
             " failed to pass the barrier within ", timeout.count(), " ms (seen by rank 0, seq ", c.seq(), ")"));
  }
  for (int p = 1; p < c.size(); ++p) c.postSend(p, nullptr, 0);
  c.waitAll(timeout);
}

}  // namespace coll
}  // namespace plait
