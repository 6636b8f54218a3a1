// Shared pieces of the fuzz targets (fuzz/README.md): an in-memory rendezvous Store, a cursor over the fuzzer's
// input, raw socket helpers, and a pair of real plait::Comm (ranks 0 and 1 in this process, TCP transport) whose
// rank 1 the targets hijack: they write the fuzzer's bytes straight into rank 1's sockets while rank 0 runs.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "plait/comm.h"
#include "plait/store.h"

namespace fuzz {

// A thread-safe Store in memory; get() waits for the key up to 10 s, then throws plait::Error.
class MemStore : public plait::Store {
 public:
  void set(const std::string& k, const std::string& v) override;
  std::string get(const std::string& k) override;
  int64_t add(const std::string& k, int64_t d) override;
  bool check(const std::string& k) override;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> kv_;
};

// Reads the fuzzer's input front to back; past the end every read yields zeros / nothing.
struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t u8() { return n ? (--n, *p++) : 0; }
  uint16_t u16() { return uint16_t(u8() | (u8() << 8)); }
  std::string bytes(size_t k) {
    k = std::min(k, n);
    std::string s(reinterpret_cast<const char*>(p), k);
    p += k, n -= k;
    return s;
  }
  std::string rest() { return bytes(n); }
};

// Blocking send of everything (gives up on an error or after 2 s); returns whether it all went.
bool sendAll(int fd, const void* buf, size_t n);
// Receives exactly n bytes within `ms`; returns whether they came.
bool recvAll(int fd, void* buf, size_t n, int ms);
// A TCP connection to 127.0.0.1:port (blocking), or -1.
int connectLocal(int port);
// A listening socket on 127.0.0.1 (any port): returns the fd and sets *port.
int listenLocal(int* port);
int localPort(int listenFd);
// Dies (a crash libFuzzer records) with a message: the oracle of every target.
[[noreturn]] void die(const std::string& why);
// Quiet: plait's warnings (a refused connection per input) would flood the log.
void quietEnv();

// Two ranks of one group, both in this process, over TCP (Options.transport = "tcp").
struct CommPair {
  std::shared_ptr<MemStore> store;
  std::unique_ptr<plait::Comm> c[2];
  // Builds both ranks at once (two threads); throws if either fails.
  explicit CommPair(std::chrono::milliseconds timeout);
  ~CommPair();
  // Rank 1's data socket to rank 0 (stream s) and its control connection.
  int dataFd(int s = 0) const;
  int controlFd() const;
  int streams() const;
};

}  // namespace fuzz
