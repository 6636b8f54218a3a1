// All-reduce with summation servers (BytePS's mixed partition; README "Summation servers", cost_model.h
// planServerSplit). The buffer's first (1 - s) goes through the workers' own ring among the host leaders; the rest
// is cut into k contiguous parts, part j summed by server j. On a host leader the two run at once: the ring on this
// thread over the engine, the servers' exchange on a helper thread over the leader's server connections
// (server/link.h), each segment coming back as soon as the server holds it from every worker. With several ranks
// on a host, they first reduce into the leader over the local transport and get the result back from it afterwards.
// Every element is summed once (by its ring owner, or by one server in worker order), so every rank receives the
// same bits.
#include <atomic>
#include <cstring>
#include <exception>
#include <thread>

#include "plait/algo/collectives.h"
#include "plait/algo/cost_model.h"
#include "plait/algo/schedules.h"
#include "plait/kernels/codec.h"
#include "plait/kernels/reduce.h"
#include "plait/server/link.h"

namespace plait {
namespace coll {

ServerSplit serverSplitFor(const Comm& c, size_t bytes) {
  const ServerInfo& si = c.servers();
  const Topology& t = c.topology();
  const int n = int(c.hostRanks().size());
  const double workerGBps = t.linkUsPerByte > 0 ? 1e-3 / t.linkUsPerByte : 0;
  const double seg = double(knobs().serverSegBytes);
  if (si.k == 0 || bytes == 0) return ServerSplit{};
  if (knobs().serverShare >= 0) {
    ServerSplit r = serverTime(n, si.k, workerGBps > 0 ? workerGBps : 1, si.gbps > 0 ? si.gbps : 1, t.linkAlphaUs,
                               double(bytes), seg, knobs().serverShare);
    r.why = cat("PLAIT_SERVER_SHARE=", knobs().serverShare);
    return r;
  }
  return planServerSplit(n, si.k, workerGBps, si.gbps, t.linkAlphaUs, double(bytes), seg);
}

bool serverAllreduce(Comm& c, char* buf, size_t count, DType dtype, RedOp op, const codec::Spec* spec,
                     bool average, float* residual) {
  // Device memory (the device engine's staging) stays on the device path; groups across hosts stage device tensors
  // through host memory and come here on the host (Comm::runOnHost).
  if (c.onDevice()) return false;
  const bool coded = spec && spec->codec != codec::Codec::kNone;
  const size_t es = dtypeSize(dtype), bytes = count * es;
  // The planner weighs what crosses the links: encoded bytes for a compressed all-reduce.
  const ServerSplit plan = serverSplitFor(c, coded ? codec::encodedBytes(*spec, count) : bytes);
  const size_t serverCount = size_t(double(count) * plan.share);
  if (serverCount == 0) return false;
  c.setSchedule(coded ? uint8_t(Comm::kSchedServers | Comm::kSchedCompressed | (average ? Comm::kSchedAverage : 0))
                      : Comm::kSchedServers);
  if (infoEnabled()) {
    static thread_local std::string last;
    std::string key = cat(bytes, "/", plan.share, "/", coded);
    if (key != last)
      logInfo(cat("rank ", c.rank(), ": all_reduce of ", bytes, " B", coded ? " (compressed)" : "", " with ",
                  c.servers().k, " summation server(s): ", plan.why));
    last = key;
  }
  const auto& hosts = c.hostRanks();
  const int myHost = c.hostOf()[size_t(c.rank())];
  const std::vector<int>& local = hosts[size_t(myHost)];
  const int leader = local[0];
  bool flat = true;  // one rank per host: this rank's own values are what gets quantized
  for (const auto& h : hosts) flat = flat && h.size() == 1;
  if (residual && !flat) {
    std::memset(residual, 0, count * sizeof(float));
    residual = nullptr;
  }
  // AVG (compressed only): every encoder divides by the group size, so the sums it quantizes are averages. With
  // several ranks on a host every rank divides its own values first instead (as the hierarchical compressed
  // schedule does), so that half-precision host sums cannot overflow.
  float div = average ? float(c.size()) : 1.0f;
  if (average && !flat) {
    divideInPlace(dtype, buf, count, float(c.size()));
    div = 1.0f;
  }
  const size_t serverBytes = serverCount * es;
  // Inside the host: reduce into the leader in rank order (full precision).
  if (local.size() > 1) {
    if (c.rank() != leader) {
      c.postSend(leader, buf, bytes);
      c.postRecv(leader, buf, bytes);
      c.waitAll();
      c.countServerBytes(serverBytes, bytes - serverBytes);
      return true;
    }
    const Xfer* acc = nullptr;
    for (size_t i = 1; i < local.size(); ++i) acc = c.postRecvReduce(local[i], buf, bytes, acc);
    c.waitAll();
  }
  // The leaders: their own schedule on [0, workerCount), the servers on the rest, at once.
  const size_t workerCount = count - serverCount, workerBytes = workerCount * es;
  ServerLinks* links = c.serverLinks();
  PLAIT_CHECK(links, "plait: internal: rank ", c.rank(), " leads a host but has no server links");
  const int k = links->count();
  const Blocks parts = evenBlocks(serverCount, k, es);
  std::vector<ServerLinks::Part> sp(static_cast<size_t>(k));
  for (int j = 0; j < k; ++j) sp[size_t(j)] = {workerBytes + parts.off[size_t(j)], parts.len[size_t(j)]};
  std::atomic<bool> stop{false};
  std::exception_ptr serverErr;
  const std::string what = cat("all_reduce seq ", c.seq());
  const uint32_t seq = c.seq();
  const auto timeout = c.timeout();
  std::thread helper([&] {
    try {
      links->exchange(buf, sp, dtype, op, seq, knobs().serverSegBytes, timeout,
                      [&] { return stop.load(std::memory_order_relaxed) || c.aborted(); }, what,
                      coded ? spec : nullptr, div, residual);
    } catch (...) {
      serverErr = std::current_exception();
      if (!stop.load()) {
        // The engine's wait on this thread must not run into its timeout for peers that are fine: end it now.
        try {
          std::rethrow_exception(serverErr);
        } catch (const std::exception& e) {
          // The abort's message gets this rank's "plait: rank R: " prefix again: drop the one it has.
          std::string msg = e.what();
          const std::string mine = cat("plait: rank ", c.rank(), ": ");
          if (msg.compare(0, mine.size(), mine) == 0) msg = msg.substr(mine.size());
          c.requestAbort(msg);
        }
      }
    }
  });
  try {
    Group leaders;
    for (size_t h = 0; h < hosts.size(); ++h) leaders.ranks.push_back(hosts[h][0]);
    leaders.me = myHost;
    if (workerCount > 0 && leaders.size() > 1) {
      if (coded) {
        directCompressed(c, leaders, buf, workerCount, dtype, div, residual);
      } else {
        ringAllreduce(c, leaders, buf, evenBlocks(workerCount, leaders.size(), es));
        c.waitAll();
      }
    } else if (workerCount > 0 && coded) {
      // One host: nothing crosses a link for the workers' share, but it must be quantized as the rest is (and as
      // every other rank's result is), so that every rank gets the same bits.
      std::vector<char> tmp(codec::encodedBytes(*spec, workerCount));
      codec::encode(*spec, dtype, buf, workerCount, div, tmp.data());
      if (residual) {
        std::vector<float> d(workerCount);
        codec::decode(*spec, tmp.data(), workerCount, DType::kFloat32, d.data());
        IeeeFpScope fp;
        const float* v = reinterpret_cast<const float*>(buf);
        for (size_t i = 0; i < workerCount; ++i) residual[i] = v[i] - d[i];
      }
      codec::decode(*spec, tmp.data(), workerCount, dtype, buf);
    }
  } catch (...) {
    stop = true;
    helper.join();
    throw;  // a worker's failure (or the servers', which aborted the engine's wait with its message)
  }
  helper.join();
  if (serverErr) {
    try {
      std::rethrow_exception(serverErr);
    } catch (const ServerError& e) {
      c.fail(e.what(), false);
    } catch (const std::exception& e) {
      c.throwIfAborted();  // the helper stopped because the group was aborted: fail with the abort's reason
      c.fail(cat("plait: rank ", c.rank(), ": summation servers' exchange during ", what, ": ", e.what()), false);
    }
  }
  if (local.size() > 1) {
    for (size_t i = 1; i < local.size(); ++i) c.postSend(local[i], buf, bytes);
    c.waitAll();
  }
  c.countServerBytes(serverBytes, workerBytes);
  return true;
}

}  // namespace coll
}  // namespace plait
