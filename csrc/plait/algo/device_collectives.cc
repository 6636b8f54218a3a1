// Device mode (Comm::setDevice): every collective copies its buffers into a staging buffer, runs the very same
// collective code there, and copies the result out.
//   - One host: the staging buffer is the device engine's (device memory its local peers map); the copies and the
//     whole collective are enqueued on the stream. Element-wise collectives (all-reduce, broadcast, reduce) go
//     through in slices of the staging buffer; the others grow it, every rank by the same amount at the same call.
//   - Several hosts: the staging buffer is page-locked host memory; the host waits for the copy in, runs the
//     collective on the host engine (TCP between hosts) and enqueues the copy out.
#include <algorithm>
#include <limits>

#include "plait/algo/collectives.h"
#include "plait/algo/schedules.h"
#include "plait/device.h"
#include "plait/transport/device.h"

namespace plait {
namespace coll {

// Element-wise collectives go through in slices of `per` elements: copy the slice in (copyIn), run the collective
// on it, copy it out (copyOut).
template <typename F>
void inSlices(Comm& c, void* buf, size_t count, size_t es, size_t per, bool copyIn, bool copyOut, F&& run) {
  per = std::max<size_t>(1, std::min(count, per));
  char* user = static_cast<char*>(buf);
  size_t off = 0;
  do {
    size_t n = std::min(per, count - off);
    char* s = c.stageBuf(n * es);
    if (copyIn) c.localCopy(s, user + off * es, n * es);
    c.setStageScratchBase(n * es);
    c.runStaged([&] { run(s, n); });
    if (copyOut) c.localCopy(user + off * es, s, n * es);
    off += n;
  } while (off < count);
}

void deviceAllreduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, Algo algo) {
  const size_t es = dtypeSize(dtype);
  // Room for the slice and, for one-shot, one copy per rank after it.
  inSlices(c, buf, count, es, c.stageSlice() / (size_t(c.size() + 1) * es), true, true,
           [&](char* s, size_t n) { allreduce(c, s, n, dtype, op, algo); });
}

void deviceBroadcast(Comm& c, void* buf, size_t bytes, int root) {
  inSlices(c, buf, bytes, 1, c.stageSlice(), c.rank() == root, c.rank() != root,
           [&](char* s, size_t n) { broadcast(c, s, n, root); });
}

void deviceReduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, int root) {
  const size_t es = dtypeSize(dtype);
  // The slice, then scratch for interior ranks of the tree.
  inSlices(c, buf, count, es, c.stageSlice() / (2 * es), true, c.rank() == root,
           [&](char* s, size_t n) { reduce(c, s, n, dtype, op, root); });
}

void deviceAllgather(Comm& c, const void* in, void* out, const std::vector<size_t>& bytes) {
  const size_t all = totalOf(bytes);
  Blocks b = packedBlocks(bytes);
  char* s = c.stageBuf(all);
  c.localCopy(s + b.off[c.rank()], in, b.len[c.rank()]);
  c.runStaged([&] { allgather(c, s + b.off[c.rank()], s, bytes); });
  c.localCopy(out, s, all);
}

void deviceReduceScatter(Comm& c, const void* in, void* out, const std::vector<size_t>& counts, DType dtype, RedOp op) {
  const size_t es = dtypeSize(dtype), all = totalOf(counts) * es;
  const size_t most = *std::max_element(counts.begin(), counts.end()) * es;
  char* s = c.stageBuf(2 * all + most);  // input, output, scratch (the ring reduces a copy of the input)
  c.localCopy(s, in, all);
  c.setStageScratchBase(all + most);
  c.runStaged([&] { reduceScatter(c, s, s + all, counts, dtype, op); });
  c.localCopy(out, s + all, counts[c.rank()] * es);
}

void deviceAlltoall(Comm& c, const void* in, const std::vector<size_t>& sendBytes, void* out,
                          const std::vector<size_t>& recvBytes) {
  const size_t sendAll = totalOf(sendBytes), recvAll = totalOf(recvBytes);
  uint64_t need = sendAll + recvAll;
  if (c.hasDeviceEngine()) {
    // Each rank knows only its own sizes, and the device staging buffer grows collectively: agree on the largest
    // need on the host first (the only device-engine collective whose host talks to its peers).
    c.runOnHost([&] { allreduce(c, &need, 1, DType::kInt64, RedOp::kMax, Algo::kDirect); });
  }
  char* s = c.stageBuf(size_t(need));
  c.localCopy(s, in, sendAll);
  c.runStaged([&] { alltoall(c, s, sendBytes, s + sendAll, recvBytes); });
  c.localCopy(out, s + sendAll, recvAll);
}

void deviceGather(Comm& c, const void* in, size_t bytes, void* out, int root) {
  char* s = c.stageBuf(size_t(c.size()) * bytes);
  c.localCopy(s + size_t(c.rank()) * bytes, in, bytes);
  c.runStaged([&] { gather(c, s + size_t(c.rank()) * bytes, bytes, s, root); });
  if (c.rank() == root) c.localCopy(out, s, size_t(c.size()) * bytes);
}

void deviceScatter(Comm& c, const void* in, void* out, size_t bytes, int root) {
  char* s = c.stageBuf(size_t(c.size() + 1) * bytes);
  if (c.rank() == root) c.localCopy(s, in, size_t(c.size()) * bytes);
  c.runStaged([&] { scatter(c, s, s + size_t(c.size()) * bytes, bytes, root); });
  c.localCopy(out, s + size_t(c.size()) * bytes, bytes);
}

}  // namespace coll
}  // namespace plait
