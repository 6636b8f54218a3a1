// A summation server (README "Summation servers"): a process on a host that does not train, started with the job's
// rendezvous endpoint, that sums the part of each all-reduce the workers send it and sends the sum back
// (protocol.h). It keeps no model state: per job (one process group incarnation) it holds a few segment buffers per
// worker, sums each segment in worker order (so every worker receives the same bits) with the CPU kernels, and
// forgets the job when its workers leave. Any number of jobs may use one server at once, each on its own thread.
#pragma once

#include <atomic>
#include <functional>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "plait/store.h"

namespace plait {

struct ServerOptions {
  int port = 0;               // 0: any free port
  std::string advertise;      // the address workers dial ("" : the one that routes to storeHost)
  std::string storeHost;      // the rendezvous host (to pick the interface to advertise)
  int threads = 0;            // summation threads per job (0: the host's cores, at most 8)
  size_t depth = 4;           // segments buffered per worker (and sums buffered per worker)
};

class SumServer {
 public:
  // Listens; register() publishes the address in the store's registry.
  SumServer(std::shared_ptr<Store> store, const ServerOptions& opts);
  ~SumServer();
  SumServer(const SumServer&) = delete;
  SumServer& operator=(const SumServer&) = delete;

  std::string address() const { return address_; }
  // Adds this server to the registry (protocol.h); returns its index there.
  int64_t registerSelf();
  // Empties this server's registry entry (a graceful stop).
  void deregister();
  // Starts the accept thread (returns at once); stop() ends it and every job (their workers are told).
  void start();
  void stop();
  struct Stats {
    uint64_t jobsStarted = 0, jobsActive = 0, jobsAborted = 0, refused = 0, segments = 0, bytesIn = 0, bytesOut = 0;
    uint64_t peakBufferBytes = 0;  // the most bytes of segment buffers held at once, over all jobs
  };
  Stats stats() const;
  // The last few log lines (refusals, job starts / ends / aborts), also written to stderr.
  std::vector<std::string> recentLog() const;

  struct Job;  // one process group incarnation's connections and summation thread (server.cc)

 private:
  void acceptLoop();
  // One pass of the accept loop: reap jobs, accept, advance handshakes.
  void acceptOnce(std::vector<struct Pending>& pend,
                  const std::function<void(size_t, const std::string&, bool)>& refuse);
  void admit(int fd, const std::string& from, const struct AdmitInfo& info);
  void log(const std::string& line);
  std::string secretFor(const std::string& job);

  std::shared_ptr<Store> store_;
  std::mutex storeMu_;
  ServerOptions opts_;
  int listenFd_ = -1;
  std::string address_;
  int64_t index_ = -1;
  std::atomic<bool> stop_{false};
  std::thread acceptThread_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;  // by job id, while they run
  mutable std::mutex logMu_;
  std::vector<std::string> log_;
  friend struct JobRunner;
 public:
  // Counters (updated by the job threads).
  std::atomic<uint64_t> jobsStarted_{0}, jobsAborted_{0}, refused_{0}, segments_{0}, bytesIn_{0}, bytesOut_{0};
  std::atomic<uint64_t> bufferBytes_{0}, peakBufferBytes_{0};
  void noteBuffer(int64_t delta);
};

}  // namespace plait
