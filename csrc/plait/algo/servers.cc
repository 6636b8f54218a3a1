// All-reduce with summation servers (BytePS's mixed partition; README "Summation servers", cost_model.h
// planServerSplit). The buffer's first (1 - s) goes through the workers' own ring among the host leaders; the rest
// is cut into k contiguous parts, part j summed by server j. On a host leader the two run at once: the ring on this
// thread over the engine, the servers' exchange on a helper thread over the leader's server connections
// (server/link.h), each segment coming back as soon as the server holds it from every worker. With several ranks
// on a host, they first reduce into the leader over the local transport and get the result back from it afterwards.
// Every element is summed once (by its ring owner, or by one server in worker order), so every rank receives the
// same bits.
#include <atomic>
#include <exception>
#include <thread>

#include "plait/algo/collectives.h"
#include "plait/algo/cost_model.h"
#include "plait/algo/schedules.h"
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

bool serverAllreduce(Comm& c, char* buf, size_t count, DType dtype, RedOp op) {
  // Device memory (the device engine's staging) stays on the device path; groups across hosts stage device tensors
  // through host memory and come here on the host (Comm::runOnHost).
  if (c.onDevice()) return false;
  const size_t es = dtypeSize(dtype), bytes = count * es;
  const ServerSplit plan = serverSplitFor(c, bytes);
  const size_t viaServers = size_t(double(count) * plan.share) * es;
  if (viaServers == 0) return false;
  c.setSchedule(Comm::kSchedServers);
  if (infoEnabled()) {
    static thread_local std::string last;
    std::string key = cat(bytes, "/", plan.share);
    if (key != last)
      logInfo(cat("rank ", c.rank(), ": all_reduce of ", bytes, " B with ", c.servers().k, " summation server(s): ",
                  plan.why));
    last = key;
  }
  const auto& hosts = c.hostRanks();
  const int myHost = c.hostOf()[size_t(c.rank())];
  const std::vector<int>& local = hosts[size_t(myHost)];
  const int leader = local[0];
  // Inside the host: reduce into the leader in rank order.
  if (local.size() > 1) {
    if (c.rank() != leader) {
      c.postSend(leader, buf, bytes);
      c.postRecv(leader, buf, bytes);
      c.waitAll();
      c.countServerBytes(viaServers, bytes - viaServers);
      return true;
    }
    const Xfer* acc = nullptr;
    for (size_t i = 1; i < local.size(); ++i) acc = c.postRecvReduce(local[i], buf, bytes, acc);
    c.waitAll();
  }
  // The leaders: the ring on [0, workerBytes), the servers on the rest, at once.
  const size_t workerCount = count - viaServers / es, workerBytes = workerCount * es;
  ServerLinks* links = c.serverLinks();
  PLAIT_CHECK(links, "plait: internal: rank ", c.rank(), " leads a host but has no server links");
  const int k = links->count();
  const Blocks parts = evenBlocks(viaServers / es, k, es);
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
                      [&] { return stop.load(std::memory_order_relaxed) || c.aborted(); }, what);
    } catch (...) {
      serverErr = std::current_exception();
      if (!stop.load()) {
        // The ring on this thread must not wait out its timeout for peers that are fine: end it now.
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
      ringAllreduce(c, leaders, buf, evenBlocks(workerCount, leaders.size(), es));
      c.waitAll();
    }
  } catch (...) {
    stop = true;
    helper.join();
    throw;  // a worker's failure (or the servers', which aborted the ring with its message)
  }
  helper.join();
  if (serverErr) {
    try {
      std::rethrow_exception(serverErr);
    } catch (const std::exception& e) {
      c.fail(e.what(), false);
    }
  }
  if (local.size() > 1) {
    for (size_t i = 1; i < local.size(); ++i) c.postSend(local[i], buf, bytes);
    c.waitAll();
  }
  c.countServerBytes(viaServers, workerBytes);
  return true;
}

}  // namespace coll
}  // namespace plait
