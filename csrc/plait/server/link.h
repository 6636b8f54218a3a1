// The workers' side of the summation servers (README "Summation servers"): each host leader of a group with
// PLAIT_SERVERS=k holds one authenticated connection per server (ServerLinks) and, per all-reduce, streams each
// server its part of the buffer in segments while the sums come back in place (protocol.h). attachServers() is the
// group-creation step: pick k live servers from the store's registry, connect, and measure their links.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "plait/common.h"
#include "plait/kernels/codec.h"
#include "plait/store.h"

namespace plait {

// A summation server exchange failed. serverFault: the server or the link to it failed (the message names the
// server's host); false: the server dropped the job because of something a worker did (its message says what).
class ServerError : public Error {
 public:
  ServerError(const std::string& msg, bool serverFault) : Error(msg), serverFault(serverFault) {}
  bool serverFault;
};

class ServerLinks {
 public:
  // Dials and authenticates with each server (addrs[j]) as worker `worker` of `nworkers` of job `job`.
  ServerLinks(int rank, int worker, int nworkers, const std::vector<std::string>& addrs, const std::string& job,
              const std::string& secret, std::chrono::milliseconds timeout);
  ~ServerLinks();  // says goodbye to each server (the job ends cleanly there), then closes
  ServerLinks(const ServerLinks&) = delete;
  ServerLinks& operator=(const ServerLinks&) = delete;

  int count() const { return int(addrs_.size()); }
  const std::string& address(int j) const { return addrs_[size_t(j)]; }
  struct Part {
    size_t off = 0, bytes = 0;  // of the buffer; bytes 0: nothing for this server
  };
  // Sends server j parts[j] of buf in segments of segBytes (a multiple of the element size) and receives the sums
  // into the same bytes. Throws ServerError (naming the server and `what`) on a failure, a protocol error or when
  // no server answers within `timeout`; plait::Error("stopped") when stopped() says so (checked every few ms).
  // With `spec` (a compressed all-reduce, SUM of float32 / bfloat16 / float16): each segment (whole codec blocks)
  // is encoded once, its values first divided by `div`, and the encoded sum that comes back is decoded into the
  // buffer; `residual` (float32, div 1, optional; indexed like buf's values) receives value - decoded value for
  // every value sent (error feedback).
  void exchange(char* buf, const std::vector<Part>& parts, DType dt, RedOp op, uint32_t seq, size_t segBytes,
                std::chrono::milliseconds timeout, const std::function<bool()>& stopped, const std::string& what,
                const codec::Spec* spec = nullptr, float div = 1.0f, float* residual = nullptr);
  // A failing group: shuts every connection down so the servers drop the job at once (without a goodbye).
  void shutdownAll();

 private:
  int rank_;
  std::vector<std::string> addrs_;
  std::vector<int> fds_;
};

// What every rank of a group knows about its servers (the same on every rank).
struct ServerInfo {
  int k = 0;
  std::vector<std::string> addrs;
  double gbps = 0;  // per server, the slowest one's (GB/s of the buffer, all workers sending at once)
  std::string source;
};

// Whether a server answers at addr ("host:port") within `wait` (one connection attempt) and can serve `job` (it
// finds the job's secret in its store; "" asks only whether a plait-server listens there).
bool pingServer(const std::string& addr, std::chrono::milliseconds wait, const std::string& job = "");

// Group creation, on every rank (collective): rank 0 writes the job's secret where servers read it (root: the
// rendezvous store's root, where servers register), picks the first k registered servers that answer (waiting for
// them up to `timeout`) and publishes them under `prefix`; every host leader connects to all of them; their links
// are measured (or PLAIT_SERVER_GBPS). Returns the leader's links (nullptr on other ranks). Raises on every rank,
// naming what is missing, when fewer than k servers answer within the timeout or a leader cannot connect.
std::unique_ptr<ServerLinks> attachServers(Store& store, Store* root, const std::string& prefix,
                                           const std::string& job, const std::string& secretHex, int rank,
                                           const std::vector<std::vector<int>>& hostRanks,
                                           const std::vector<int>& hostOf, int k,
                                           std::chrono::milliseconds timeout, const std::string& storeDesc,
                                           ServerInfo* info);

}  // namespace plait
