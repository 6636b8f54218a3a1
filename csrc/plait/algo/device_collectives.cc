// Device mode (Comm::setDevice): every collective copies its buffers into a staging buffer, runs the very same
// collective code there, and copies the result out. Where the staging is (Comm::Stage):
//   - kDevice (one host): the device engine's staging buffer (device memory its local peers map); the copies and the
//     whole collective are enqueued on the stream. Element-wise collectives (all-reduce, broadcast, reduce) go
//     through in slices of the staging buffer; the others grow it, every rank by the same amount at the same call.
//   - The host path: kHostShared (one host: page-locked memory the local ranks share, summed by the CPU) or
//     kHostPrivate (several hosts: private page-locked memory, the host engine over TCP). Element-wise collectives
//     are pipelined in chunks (hostChunks): the download of chunk i+1 and the upload of chunk i-1 run on the copy
//     streams while the host works on chunk i, so the link, the copies and the CPU overlap; the others download
//     their input, run, and upload.
// An all-reduce on the device engine may send a share of its buffer through kHostShared at the same time (the
// split, hostSplitFor): the device engine sums the rest meanwhile.
//
// Words: a *window* is the part of the buffer that fits the host staging at once; a *chunk* (PLAIT_HOST_CHUNK_BYTES)
// is the unit the host path downloads, runs a collective on, and uploads.
#include <algorithm>
#include <cmath>
#include <limits>

#include "plait/algo/collectives.h"
#include "plait/algo/cost_model.h"
#include "plait/algo/schedules.h"
#include "plait/device.h"
#include "plait/transport/device.h"

namespace plait {
namespace coll {

namespace {

// Element-wise collectives on the device engine go through in slices of `per` elements: copy the slice in (copyIn),
// run the collective on it, copy it out (copyOut).
template <typename F>
void inSlices(Comm& c, char* user, size_t count, size_t es, size_t per, bool copyIn, bool copyOut, F&& run) {
  per = std::max<size_t>(1, std::min(count, per));
  size_t off = 0;
  do {
    size_t n = std::min(per, count - off);
    char* s = c.stageBuf(n * es);
    if (copyIn) c.stageIn(s, user + off * es, n * es);
    c.setStageScratchBase(n * es);
    c.runStaged([&] { run(s, n); });
    if (copyOut) c.stageOut(user + off * es, s, n * es);
    off += n;
  } while (off < count);
}

// Element-wise collectives on the host path: window by window, every chunk of the window is downloaded first (copyIn),
// then chunk by chunk the host waits for the chunk's download, runs the collective on it and uploads it (copyOut).
// `scratchChunks` chunks of scratch follow the window in the staging buffer. `between` (optional) runs once the
// first window's downloads are enqueued: the device engine's share of a split collective, which then overlaps the
// host's work.
template <typename F>
void hostChunks(Comm& c, char* user, size_t count, size_t es, size_t scratchChunks, bool copyIn, bool copyOut,
                F&& run, const std::function<void()>& between = {}) {
  constexpr size_t kMaxChunksPerWindow = 256;  // the copy streams' tickets (transport/device.h) outlive a window
  // At least 4 chunks per window: each window boundary waits for the previous window's uploads.
  const size_t slice = std::max<size_t>(std::max(c.stageSlice(), 4 * knobs().hostChunkBytes) / es, 1);
  const size_t window = std::max<size_t>(1, std::min(count, slice));
  const size_t chunk = std::max({size_t(1), std::min(window, knobs().hostChunkBytes / es),
                                 (window + kMaxChunksPerWindow - 1) / kMaxChunksPerWindow});
  std::vector<uint64_t> tickets;
  size_t off = 0;
  bool first = true;
  do {
    const size_t wn = std::min(window, count - off);
    // The same need at every window (and on every rank): kHostShared grows collectively. kHostPrivate runs the
    // collective on the host engine, which has scratch of its own.
    if (c.stage() == Comm::Stage::kHostPrivate) scratchChunks = 0;
    char* s = c.stageBuf((window + scratchChunks * chunk) * es);
    if (!first) c.stageFence();
    if (!copyIn) c.stageWaitUploads();  // the host writes the window without downloading into it first
    tickets.clear();
    for (size_t k = 0; k < wn || (k == 0 && wn == 0); k += chunk)
      tickets.push_back(copyIn ? c.stageIn(s + k * es, user + (off + k) * es, std::min(chunk, wn - k) * es) : 0);
    if (first && between) between();
    first = false;
    for (size_t i = 0; i < tickets.size(); ++i) {
      const size_t k = i * chunk, n = std::min(chunk, wn - k);
      c.setStageScratchBase(window * es);
      c.runStaged([&] { run(s + k * es, n); }, tickets[i]);
      if (copyOut) c.stageOut(user + (off + k) * es, s + k * es, n * es);
    }
    off += wn;
  } while (off < count);
  c.stageDone();
}

bool onHostPath(const Comm& c) { return c.stage() != Comm::Stage::kDevice; }

// Measures the host path's rates (Comm::hostRates) on this group: every local rank, at the same call (the first
// device all-reduce of kHostPathMinBytes or more with the host path available). Each figure is the best of two
// runs, then the slowest rank's, so every rank plans with the same numbers.
void measureHostPath(Comm& c) {
  struct Measuring {
    Comm& c;
    explicit Measuring(Comm& comm) : c(comm) { c.setMeasuringHostPath(true); }
    ~Measuring() { c.setMeasuringHostPath(false); }
  } m(c);
  constexpr size_t kBig = size_t(8) << 20, kSmall = size_t(64) << 10;
  DeviceOps& dev = c.deviceOps();
  struct Probe {
    Comm& c;
    DeviceOps& ops;
    char* p;
    ~Probe() {
      try {
        c.syncDevice();
        ops.release(p);
      } catch (...) {
        // a failed stream may still use it: leaked rather than freed under it
      }
    }
  } probe{c, dev, static_cast<char*>(dev.alloc(kBig))};
  auto timed = [&](const std::function<void()>& fn) {
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < 2; ++rep) {
      c.syncDevice();
      auto t0 = Clock::now();
      fn();
      c.syncDevice();
      best = std::min(best, std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    return best;
  };
  auto onDevice = [&](size_t bytes) { allreduce(c, probe.p, bytes / 4, DType::kFloat32, RedOp::kSum); };
  auto onHost = [&](size_t bytes) {
    c.withStage(Comm::Stage::kHostShared, [&] { allreduce(c, probe.p, bytes / 4, DType::kFloat32, RedOp::kSum); });
  };
  double t[6];  // device big, device small, host big, host small, both directions of the link, CPU summation
  t[0] = timed([&] { onDevice(kBig); });
  t[1] = timed([&] { onDevice(kSmall); });
  t[2] = timed([&] { onHost(kBig); });
  t[3] = timed([&] { onHost(kSmall); });
  c.withStage(Comm::Stage::kHostShared, [&] {
    // Two buffers for the copies, then scratch for a one-shot sum.
    char* s = c.stageBuf((2 + size_t(c.size())) * kBig);
    c.setStageScratchBase(2 * kBig);
    t[4] = timed([&] {
      c.stageIn(s, probe.p, kBig);
      c.stageOut(probe.p, s + kBig, kBig);
      c.stageDone();
    });
    t[5] = timed([&] { c.runStaged([&] { allreduce(c, s, kBig / 4, DType::kFloat32, RedOp::kSum); }, 0); });
  });
  c.runOnHost([&] { allreduce(c, t, 6, DType::kFloat64, RedOp::kMax, Algo::kDirect); });
  HostPathRates r;
  auto gbps = [](double bytes, double us) { return bytes / std::max(us, 1e-3) * 1e-3; };
  r.deviceGBps = gbps(double(kBig - kSmall), t[0] - t[1]);
  r.deviceCallUs = std::max(0.0, t[1] - double(kSmall) / (r.deviceGBps * 1e3));
  r.pcieGBps = gbps(double(kBig), t[4]);
  r.sumGBps = gbps(double(kBig), t[5]);
  r.pathGBps = gbps(double(kBig - kSmall), t[2] - t[3]);
  r.hostCallUs = std::max(0.0, t[3] - double(kSmall) / (hostPathGBps(r) * 1e3));
  r.measured = true;
  c.setHostRates(r);
  if (infoEnabled())
    logInfo(cat("rank ", c.rank(), ": host path measured: link ", r.pcieGBps, " GB/s per direction (both at once), CPU summation ",
                r.sumGBps, " GB/s, device engine ", r.deviceGBps, " GB/s; fixed cost host ", r.hostCallUs,
                " us, device ", r.deviceCallUs, " us"));
}

}  // namespace

HostSplit hostSplitFor(Comm& c, size_t bytes) {
  HostSplit h;
  if (onHostPath(c)) {
    h.share = 1;
    h.why = "host path";
    return h;
  }
  if (!c.hostPathBeside() || c.measuringHostPath()) {
    h.why = c.hostPathBeside() ? "measuring the host path" : "device only: PLAIT_HOST_PATH=off";
    return h;
  }
  bool needsRates = false;
  h = decideHostSplit(true, c.hostRates(), bytes, &needsRates);
  if (needsRates) {
    measureHostPath(c);
    h = decideHostSplit(true, c.hostRates(), bytes);
  }
  if (infoEnabled()) {
    static thread_local std::string last;
    std::string line = cat("rank ", c.rank(), ": device all_reduce of ", bytes, " B: ", h.why);
    if (line != last) logInfo(line);
    last = line;
  }
  return h;
}

void deviceAllreduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, Algo algo) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    const size_t es = dtypeSize(dtype);
    char* user = static_cast<char*>(buf);
    auto run = [&](char* s, size_t n) { allreduce(c, s, n, dtype, op, algo); };
    auto counted = [&](size_t onDev, size_t onHost) {  // what took which path (not the measurement's probes)
      if (!c.measuringHostPath()) c.countPathBytes(onDev * es, onHost * es);
    };
    // One-shot needs one copy of the chunk per rank as scratch.
    if (onHostPath(c)) {
      counted(0, count);
      return hostChunks(c, user, count, es, size_t(c.size()), true, true, run);
    }
    auto onDevice = [&](char* b, size_t n) {
      // Room for the slice and, for one-shot, one copy per rank after it.
      inSlices(c, b, n, es, c.stageSlice() / (size_t(c.size() + 1) * es), true, true, run);
    };
    const HostSplit h = hostSplitFor(c, count * es);
    const size_t nh = std::min(count, size_t(std::floor(double(count) * h.share))), nd = count - nh;
    counted(nd, nh);
    if (nh == 0) return onDevice(user, count);
    // The device engine's share [0, nd) is enqueued once the host share's first downloads are, then the host sums
    // its share [nd, count) while the device works.
    c.withStage(Comm::Stage::kHostShared, [&] {
      hostChunks(c, user + nd * es, nh, es, size_t(c.size()), true, true, run, [&] {
        if (nd) c.withStage(Comm::Stage::kDevice, [&] { onDevice(user, nd); });
      });
    });
  });
}

void deviceBroadcast(Comm& c, void* buf, size_t bytes, int root) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    auto run = [&](char* s, size_t n) { broadcast(c, s, n, root); };
    char* user = static_cast<char*>(buf);
    if (onHostPath(c)) return hostChunks(c, user, bytes, 1, 0, c.rank() == root, c.rank() != root, run);
    inSlices(c, user, bytes, 1, c.stageSlice(), c.rank() == root, c.rank() != root, run);
  });
}

void deviceReduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, int root) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    const size_t es = dtypeSize(dtype);
    auto run = [&](char* s, size_t n) { reduce(c, s, n, dtype, op, root); };
    char* user = static_cast<char*>(buf);
    // Scratch for interior ranks of the tree: one chunk (slice) after it.
    if (onHostPath(c)) return hostChunks(c, user, count, es, 1, true, c.rank() == root, run);
    inSlices(c, user, count, es, c.stageSlice() / (2 * es), true, c.rank() == root, run);
  });
}

void deviceAllgather(Comm& c, const void* in, void* out, const std::vector<size_t>& bytes) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    const size_t all = totalOf(bytes);
    Blocks b = packedBlocks(bytes);
    char* s = c.stageBuf(all);
    c.stageIn(s + b.off[c.rank()], in, b.len[c.rank()]);
    c.runStaged([&] { allgather(c, s + b.off[c.rank()], s, bytes); });
    c.stageOut(out, s, all);
    c.stageDone();
  });
}

void deviceReduceScatter(Comm& c, const void* in, void* out, const std::vector<size_t>& counts, DType dtype, RedOp op) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    const size_t es = dtypeSize(dtype), all = totalOf(counts) * es;
    const size_t most = *std::max_element(counts.begin(), counts.end()) * es;
    char* s = c.stageBuf(2 * all + most);  // input, output, scratch (the ring reduces a copy of the input)
    c.stageIn(s, in, all);
    c.setStageScratchBase(all + most);
    c.runStaged([&] { reduceScatter(c, s, s + all, counts, dtype, op); });
    c.stageOut(out, s + all, counts[c.rank()] * es);
    c.stageDone();
  });
}

void deviceAlltoall(Comm& c, const void* in, const std::vector<size_t>& sendBytes, void* out,
                    const std::vector<size_t>& recvBytes) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    const size_t sendAll = totalOf(sendBytes), recvAll = totalOf(recvBytes);
    uint64_t need = sendAll + recvAll;
    if (c.stageGrowsCollectively()) {
      // Each rank knows only its own sizes, and the staging buffer grows collectively: agree on the largest need on
      // the host first (the only device collective whose host talks to its peers before the copies).
      c.runOnHost([&] { allreduce(c, &need, 1, DType::kInt64, RedOp::kMax, Algo::kDirect); });
    }
    char* s = c.stageBuf(size_t(need));
    c.stageIn(s, in, sendAll);
    c.runStaged([&] { alltoall(c, s, sendBytes, s + sendAll, recvBytes); });
    c.stageOut(out, s + sendAll, recvAll);
    c.stageDone();
  });
}

void deviceGather(Comm& c, const void* in, size_t bytes, void* out, int root) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    char* s = c.stageBuf(size_t(c.size()) * bytes);
    c.stageIn(s + size_t(c.rank()) * bytes, in, bytes);
    c.runStaged([&] { gather(c, s + size_t(c.rank()) * bytes, bytes, s, root); });
    if (c.rank() == root) c.stageOut(out, s, size_t(c.size()) * bytes);
    c.stageDone();
  });
}

void deviceScatter(Comm& c, const void* in, void* out, size_t bytes, int root) {
  DeviceCollective dc(c);  // the descriptors carry this collective's key
  c.guardStaged([&] {
    char* s = c.stageBuf(size_t(c.size() + 1) * bytes);
    if (c.rank() == root) c.stageIn(s, in, size_t(c.size()) * bytes);
    c.runStaged([&] { scatter(c, s, s + size_t(c.size()) * bytes, bytes, root); });
    c.stageOut(out, s + size_t(c.size()) * bytes, bytes);
    c.stageDone();
  });
}

}  // namespace coll
}  // namespace plait
