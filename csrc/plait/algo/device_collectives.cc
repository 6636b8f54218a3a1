// Device mode (Comm::setDevice): every collective copies its buffers into a staging buffer, runs the very same
// collective code there, and copies the result out.
//   - One host: the staging buffer is the device engine's (device memory its local peers map); the copies and the
//     whole collective are enqueued on the stream. Element-wise collectives (all-reduce, broadcast, reduce) go
//     through in slices of the staging buffer; the others grow it, every rank by the same amount at the same call.
//   - Several hosts: the staging buffer is page-locked host memory; the host waits for the copy in, runs the
//     collective on the host engine (TCP between hosts) and enqueues the copy out.
#include <algorithm>
#include <limits>

#include "plait/algo/schedules.h"
#include "plait/device.h"
#include "plait/transport/device.h"

namespace plait {

namespace {
// Marks "inside a staged device collective" for the duration of one call (pointers are in the staging buffer).
struct StagedScope {
  bool& flag;
  explicit StagedScope(bool& f) : flag(f) { flag = true; }
  ~StagedScope() { flag = false; }
};
}  // namespace

// Leaves device mode for the duration of a host-engine call inside a device collective, and comes back to it
// whatever way the call ends.
struct Comm::HostScope {
  Comm& c;
  bool device;
  explicit HostScope(Comm& comm) : c(comm), device(comm.topo_.device) {
    c.devActive_ = false;
    c.topo_.device = false;
  }
  ~HostScope() {
    c.devActive_ = true;
    c.topo_.device = device;
  }
};

char* Comm::stageBuf(size_t need) {
  if (dev_) {
    dev_->reserve(need);
    return dev_->staging();
  }
  if (need > hostStageBytes_) {
    viaHost_->synchronize();  // copies out of the old buffer may still be in flight
    if (hostStage_) viaHost_->releaseHost(hostStage_);
    hostStage_ = nullptr;
    hostStageBytes_ = 0;
    hostStage_ = static_cast<char*>(viaHost_->allocHost(std::max<size_t>(need, 4096)));
    hostStageBytes_ = std::max<size_t>(need, 4096);
  }
  return hostStage_;
}

size_t Comm::stageSlice() const { return dev_ ? dev_->capacity() : std::numeric_limits<size_t>::max(); }

template <typename F>
void Comm::runStaged(F&& body) {
  if (dev_) {
    StagedScope s(devStaged_);
    body();
    return;
  }
  viaHost_->synchronize();  // the copies in have landed in host memory
  HostScope h(*this);
  body();
}

// Element-wise collectives go through in slices of `per` elements: copy the slice in (copyIn), run the collective
// on it, copy it out (copyOut).
template <typename F>
void Comm::inSlices(void* buf, size_t count, size_t es, size_t per, bool copyIn, bool copyOut, F&& run) {
  per = std::max<size_t>(1, std::min(count, per));
  char* user = static_cast<char*>(buf);
  size_t off = 0;
  do {
    size_t n = std::min(per, count - off);
    char* s = stageBuf(n * es);
    if (copyIn) localCopy(s, user + off * es, n * es);
    if (dev_) dev_->setScratchBase(n * es);
    runStaged([&] { run(s, n); });
    if (copyOut) localCopy(user + off * es, s, n * es);
    off += n;
  } while (off < count);
}

void Comm::deviceAllreduce(void* buf, size_t count, DType dtype, RedOp op, Algo algo) {
  const size_t es = dtypeSize(dtype);
  // Room for the slice and, for one-shot, one copy per rank after it.
  inSlices(buf, count, es, stageSlice() / (size_t(size_ + 1) * es), true, true,
           [&](char* s, size_t n) { allreduce(s, n, dtype, op, algo); });
}

void Comm::deviceBroadcast(void* buf, size_t bytes, int root) {
  inSlices(buf, bytes, 1, stageSlice(), rank_ == root, rank_ != root,
           [&](char* s, size_t n) { broadcast(s, n, root); });
}

void Comm::deviceReduce(void* buf, size_t count, DType dtype, RedOp op, int root) {
  const size_t es = dtypeSize(dtype);
  // The slice, then scratch for interior ranks of the tree.
  inSlices(buf, count, es, stageSlice() / (2 * es), true, rank_ == root,
           [&](char* s, size_t n) { reduce(s, n, dtype, op, root); });
}

void Comm::deviceAllgather(const void* in, void* out, const std::vector<size_t>& bytes) {
  const size_t all = totalOf(bytes);
  Blocks b = packedBlocks(bytes);
  char* s = stageBuf(all);
  localCopy(s + b.off[rank_], in, b.len[rank_]);
  runStaged([&] { allgather(s + b.off[rank_], s, bytes); });
  localCopy(out, s, all);
}

void Comm::deviceReduceScatter(const void* in, void* out, const std::vector<size_t>& counts, DType dtype, RedOp op) {
  const size_t es = dtypeSize(dtype), all = totalOf(counts) * es;
  const size_t most = *std::max_element(counts.begin(), counts.end()) * es;
  char* s = stageBuf(2 * all + most);  // input, output, scratch (the ring reduces a copy of the input)
  localCopy(s, in, all);
  if (dev_) dev_->setScratchBase(all + most);
  runStaged([&] { reduceScatter(s, s + all, counts, dtype, op); });
  localCopy(out, s + all, counts[rank_] * es);
}

void Comm::deviceAlltoall(const void* in, const std::vector<size_t>& sendBytes, void* out,
                          const std::vector<size_t>& recvBytes) {
  const size_t sendAll = totalOf(sendBytes), recvAll = totalOf(recvBytes);
  uint64_t need = sendAll + recvAll;
  if (dev_) {
    // Each rank knows only its own sizes, and the device staging buffer grows collectively: agree on the largest
    // need on the host first (the only device-engine collective whose host talks to its peers).
    HostScope h(*this);
    allreduce(&need, 1, DType::kInt64, RedOp::kMax, Algo::kDirect);
  }
  char* s = stageBuf(size_t(need));
  localCopy(s, in, sendAll);
  runStaged([&] { alltoall(s, sendBytes, s + sendAll, recvBytes); });
  localCopy(out, s + sendAll, recvAll);
}

void Comm::deviceGather(const void* in, size_t bytes, void* out, int root) {
  char* s = stageBuf(size_t(size_) * bytes);
  localCopy(s + size_t(rank_) * bytes, in, bytes);
  runStaged([&] { gather(s + size_t(rank_) * bytes, bytes, s, root); });
  if (rank_ == root) localCopy(out, s, size_t(size_) * bytes);
}

void Comm::deviceScatter(const void* in, void* out, size_t bytes, int root) {
  char* s = stageBuf(size_t(size_ + 1) * bytes);
  if (rank_ == root) localCopy(s, in, size_t(size_) * bytes);
  runStaged([&] { scatter(s, s + size_t(size_) * bytes, bytes, root); });
  localCopy(out, s + size_t(size_) * bytes, bytes);
}

}  // namespace plait
