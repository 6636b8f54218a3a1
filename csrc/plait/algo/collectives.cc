// The collectives of Comm, each a schedule from schedules.cc (or a direct exchange) over the engine verbs.
#include <cstring>

#include "plait/algo/cost_model.h"
#include "plait/algo/schedules.h"

namespace plait {

void Comm::allreduce(void* buf, size_t count, DType dtype, RedOp op, Algo algo) {
  if (stageOnDevice()) return deviceAllreduce(buf, count, dtype, op, algo);
  begin(CollCtx{Coll::kAllreduce, dtype, op, 0, count});
  const size_t es = dtypeSize(dtype), bytes = count * es;
  if (size_ == 1) return;
  AllreducePlan plan = planAllreduce(topo_, bytes, algo != Algo::kAuto ? algo : algo_);
  setSchedule(schedCode(plan.algo, plan.algo == Algo::kDirect && plan.oneShot));
  if (infoEnabled()) {
    static thread_local std::string last;
    std::string line = cat("rank ", rank_, ": all_reduce of ", bytes, " B: ", algoName(plan.algo),
                           plan.algo == Algo::kDirect ? (plan.oneShot ? " one-shot" : " two-shot") : "", ", ",
                           explain(plan, topo_, bytes));
    std::string key = cat(algoName(plan.algo), plan.oneShot, size_);
    if (key != last) logInfo(line);
    last = key;
  }
  char* b = static_cast<char*>(buf);
  switch (plan.algo) {
    case Algo::kRing:
      ringAllreduce(*this, allRanks(*this), b, evenBlocks(count, size_, es));
      waitAll();
      break;
    case Algo::kTree: {
      // Double binary tree: each tree carries half of the elements.
      size_t half = (count / 2) * es;
      treeUpDown(*this, b, half, heapTree(rank_, size_, 0, false), true, true);
      treeUpDown(*this, b + half, bytes - half, heapTree(rank_, size_, 0, true), true, true);
      waitAll();
      break;
    }
    case Algo::kHier:
    case Algo::kHierRing:
    case Algo::kHierTree:
      hierAllreduce(*this, b, count, es, hostRanks_, hostOf_[rank_], plan.algo == Algo::kHierTree);
      break;
    case Algo::kDirect:
    case Algo::kAuto:
      if (!plan.oneShot) {
        directTwoShot(*this, b, evenBlocks(count, size_, es));
        break;
      }
      {
        // One-shot: gather every rank's buffer, then fold in rank order so every rank computes the same bits.
        char* s = scratch(size_t(size_) * bytes);
        for (int p = 0; p < size_; ++p) {
          if (p == rank_) continue;
          postSend(p, b, bytes);
          postRecv(p, s + size_t(p) * bytes, bytes);
        }
        waitAll();
        localCopy(s + size_t(rank_) * bytes, b, bytes);
        localReduce(op, dtype, b, s, s + bytes, count);
        for (int p = 2; p < size_; ++p) localReduce(op, dtype, b, b, s + size_t(p) * bytes, count);
      }
      break;
  }
}

void Comm::broadcast(void* buf, size_t bytes, int root) {
  if (stageOnDevice()) return deviceBroadcast(buf, bytes, root);
  begin(CollCtx{Coll::kBroadcast, DType::kUInt8, RedOp::kSum, root, bytes});
  if (size_ == 1) return;
  treeUpDown(*this, static_cast<char*>(buf), bytes, heapTree(rank_, size_, root, false), false, true);
  waitAll();
}

void Comm::reduce(void* buf, size_t count, DType dtype, RedOp op, int root) {
  if (stageOnDevice()) return deviceReduce(buf, count, dtype, op, root);
  begin(CollCtx{Coll::kReduce, dtype, op, root, count});
  if (size_ == 1) return;
  const size_t bytes = count * dtypeSize(dtype);
  TreeLinks t = heapTree(rank_, size_, root, false);
  char* acc = static_cast<char*>(buf);
  if (rank_ != root && t.nchild > 0) {  // interior ranks accumulate in scratch: their input stays untouched
    acc = scratch(bytes);
    localCopy(acc, buf, bytes);
  }
  treeUpDown(*this, acc, bytes, t, true, false);
  waitAll();
}

void Comm::allgather(const void* in, void* out, const std::vector<size_t>& bytes) {
  PLAIT_CHECK(int(bytes.size()) == size_, "plait: internal: all_gather needs one size per rank");
  if (stageOnDevice()) return deviceAllgather(in, out, bytes);
  Blocks b = packedBlocks(bytes);
  begin(CollCtx{Coll::kAllgather, DType::kUInt8, RedOp::kSum, 0, totalOf(bytes)});
  char* o = static_cast<char*>(out);
  if (in != o + b.off[rank_]) localCopy(o + b.off[rank_], in, b.len[rank_]);
  if (size_ == 1) return;
  setSchedule(schedCode(algo_ == Algo::kRing ? Algo::kRing : Algo::kDirect));
  if (algo_ == Algo::kRing) {
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    const Xfer* last = nullptr;
    for (int t = 0; t < size_ - 1; ++t) {
      int sb = (rank_ - t + size_) % size_, rb = (rank_ - t - 1 + 2 * size_) % size_;
      postSend(next, o + b.off[sb], b.len[sb], last);
      last = postRecv(prev, o + b.off[rb], b.len[rb]);
    }
  } else {
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      postSend(p, o + b.off[rank_], b.len[rank_]);
      postRecv(p, o + b.off[p], b.len[p]);
    }
  }
  waitAll();
}

void Comm::reduceScatter(const void* in, void* out, const std::vector<size_t>& counts, DType dtype, RedOp op) {
  PLAIT_CHECK(int(counts.size()) == size_, "plait: internal: reduce_scatter needs one count per rank");
  if (stageOnDevice()) return deviceReduceScatter(in, out, counts, dtype, op);
  const size_t es = dtypeSize(dtype);
  std::vector<size_t> bytes(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) bytes[i] = counts[i] * es;
  Blocks b = packedBlocks(bytes);
  begin(CollCtx{Coll::kReduceScatter, dtype, op, 0, totalOf(counts)});
  const char* i8 = static_cast<const char*>(in);
  char* o = static_cast<char*>(out);
  setSchedule(schedCode(algo_ == Algo::kRing ? Algo::kRing : Algo::kDirect));
  if (size_ > 1 && algo_ == Algo::kRing) {
    // Ring on a copy of the input, shifted so that rank r finishes with block r.
    char* s = scratch(totalOf(bytes));
    localCopy(s, i8, totalOf(bytes));
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    const Xfer* last = nullptr;
    for (int st = 0; st < size_ - 1; ++st) {
      int sb = ((rank_ - st - 1) % size_ + size_) % size_, rb = ((rank_ - st - 2) % size_ + size_) % size_;
      postSend(next, s + b.off[sb], b.len[sb], last);
      last = postRecvReduce(prev, s + b.off[rb], b.len[rb]);
    }
    waitAll();
    localCopy(o, s + b.off[rank_], b.len[rank_]);
    return;
  }
  if (o != i8 + b.off[rank_]) localCopy(o, i8 + b.off[rank_], b.len[rank_]);
  const Xfer* acc = nullptr;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    postSend(p, i8 + b.off[p], b.len[p]);
    acc = postRecvReduce(p, o, b.len[rank_], acc);
  }
  waitAll();
}

void Comm::alltoall(const void* in, const std::vector<size_t>& sendBytes, void* out,
                    const std::vector<size_t>& recvBytes) {
  if (stageOnDevice()) return deviceAlltoall(in, sendBytes, out, recvBytes);
  Blocks sb = packedBlocks(sendBytes), rb = packedBlocks(recvBytes);
  begin(CollCtx{Coll::kAlltoall, DType::kUInt8, RedOp::kSum, 0, 0});
  const char* i8 = static_cast<const char*>(in);
  char* o = static_cast<char*>(out);
  if (sb.len[rank_] != rb.len[rank_])  // fail(): the peers hear of it instead of waiting out the timeout
    fail(cat("plait: rank ", rank_, ": all_to_all (seq ", seq_, ") sends ", sb.len[rank_],
             " bytes to itself but expects to receive ", rb.len[rank_], " (size mismatch)"));
  localCopy(o + rb.off[rank_], i8 + sb.off[rank_], sb.len[rank_]);
  for (int k = 1; k < size_; ++k) {  // staggered so that not every rank starts with the same peer
    int p = (rank_ + k) % size_, q = (rank_ - k + size_) % size_;
    postSend(p, i8 + sb.off[p], sb.len[p]);
    postRecv(q, o + rb.off[q], rb.len[q]);
  }
  waitAll();
}

void Comm::gather(const void* in, size_t bytes, void* out, int root) {
  if (stageOnDevice()) return deviceGather(in, bytes, out, root);
  begin(CollCtx{Coll::kGather, DType::kUInt8, RedOp::kSum, root, bytes});
  if (rank_ != root) {
    postSend(root, in, bytes);
  } else {
    char* o = static_cast<char*>(out);
    localCopy(o + size_t(rank_) * bytes, in, bytes);
    for (int p = 0; p < size_; ++p)
      if (p != rank_) postRecv(p, o + size_t(p) * bytes, bytes);
  }
  waitAll();
}

void Comm::scatter(const void* in, void* out, size_t bytes, int root) {
  if (stageOnDevice()) return deviceScatter(in, out, bytes, root);
  begin(CollCtx{Coll::kScatter, DType::kUInt8, RedOp::kSum, root, bytes});
  if (rank_ != root) {
    postRecv(root, out, bytes);
  } else {
    const char* i8 = static_cast<const char*>(in);
    localCopy(out, i8 + size_t(rank_) * bytes, bytes);
    for (int p = 0; p < size_; ++p)
      if (p != rank_) postSend(p, i8 + size_t(p) * bytes, bytes);
  }
  waitAll();
}

void Comm::isend(const void* buf, size_t bytes, int peer, int tag, Done done) {
  PLAIT_CHECK(peer >= 0 && peer < size_ && peer != rank_, "plait: rank ", rank_, ": send to invalid peer rank ", peer,
              " (group size ", size_, ")");
  begin(CollCtx{Coll::kSendRecv, DType::kUInt8, RedOp::kSum, tag, bytes});
  Xfer* x = postSend(peer, buf, bytes);
  x->onDone = std::move(done);
  x->deadline = Clock::now() + timeout();
}

void Comm::irecv(void* buf, size_t bytes, int peer, int tag, Done done) {
  PLAIT_CHECK(peer >= 0 && peer < size_ && peer != rank_, "plait: rank ", rank_,
              ": recv from invalid peer rank ", peer, " (group size ", size_, ")");
  begin(CollCtx{Coll::kSendRecv, DType::kUInt8, RedOp::kSum, tag, bytes});
  Xfer* x = postRecv(peer, buf, bytes);
  x->onDone = std::move(done);
  x->deadline = Clock::now() + timeout();
  matchUnexpectedOrFail(peer);  // the message may be here already
}

void Comm::irecvAny(void* buf, size_t bytes, int tag, AnyDone done) {
  PLAIT_CHECK(size_ > 1, "plait: rank ", rank_, ": recv from any source in a group of one rank would never finish");
  begin(CollCtx{Coll::kSendRecv, DType::kUInt8, RedOp::kSum, tag, bytes});
  anyQ_.push_back(AnyRecv{static_cast<char*>(buf), bytes, tag, std::move(done), Clock::now() + timeout()});
  ++pending_;
  // A message already buffered from some peer (lowest rank first) may be the one.
  for (int p = 0; p < size_ && !anyQ_.empty(); ++p)
    if (p != rank_ && p2pRecvQ_[p].empty()) matchUnexpectedOrFail(p);
}

void Comm::barrier() {
  begin(CollCtx{Coll::kBarrier, DType::kUInt8, RedOp::kSum, 0, 0});
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    postSend(p, nullptr, 0);
    postRecv(p, nullptr, 0);
  }
  waitAll();
}

void Comm::monitoredBarrier(std::chrono::milliseconds timeout, bool waitAllRanks) {
  begin(CollCtx{Coll::kMonitoredBarrier, DType::kUInt8, RedOp::kSum, 0, 0});
  if (size_ == 1) return;
  if (rank_ != 0) {
    postSend(0, nullptr, 0);
    postRecv(0, nullptr, 0);
    waitAll(timeout);
    return;
  }
  std::vector<Xfer*> arrivals(size_, nullptr);
  for (int p = 1; p < size_; ++p) arrivals[p] = postRecv(p, nullptr, 0);
  if (!waitAll(timeout, false)) {
    std::string missing;
    for (int p = 1; p < size_; ++p) {
      if (finished(arrivals[p])) continue;
      missing += cat(missing.empty() ? "" : ", ", p);
      if (!waitAllRanks) break;
    }
    fail(cat("plait: monitored_barrier: rank", waitAllRanks ? "(s) " : " ", missing,
             " failed to pass the barrier within ", timeout.count(), " ms (seen by rank 0, seq ", seq_, ")"));
  }
  for (int p = 1; p < size_; ++p) postSend(p, nullptr, 0);
  waitAll(timeout);
}

}  // namespace plait
