// Fuzz target: the TCP transport's connection handshake and its HMAC authentication (transport/tcp.cc, auth.cc).
//
// Input: [mode][conns][per connection: flags, len u16, bytes]...
//   mode bit 0 = 0: a plait listener (rank 0's TcpDomain::connectAll) receives the fuzzer's connections, each
//     optionally behind a well-formed Hello (flags bit 0) and then closed / half-closed / left open (flags bits 1-2);
//     then the real rank 1 dials. Oracle: the listener refuses every fuzz connection and goes on, so both ranks
//     connect; nothing crashes, nothing outlives its deadline.
//   mode bit 0 = 1: a plait dialer (rank 1's connectAll) dials a fake rank 0 that answers each connection with the
//     fuzzer's bytes, optionally behind a correct challenge (flags bit 0: the fake knows the job's secret). Oracle:
//     connectAll returns or throws plait::Error within its deadline; nothing crashes.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "harness.h"
#include "plait/transport/auth.h"
#include "plait/transport/tcp.h"

using namespace std::chrono;

namespace {
const std::string kSecret = "fuzz-secret-0123456789abcdef0123";
const std::string kJob = "plait/0/fuzzjob";

// tcp.cc's handshake layout (kept in sync by the seeds: a drifted layout stops the dialer target's correct answers).
struct Hello {
  uint32_t magic;
  uint16_t version, stream;
  int32_t from, to;
  uint8_t nonce[16];
};
struct Challenge {
  uint32_t magic, reserved;
  uint8_t nonce[16];
  uint8_t mac[32];
};
constexpr uint32_t kHelloMagic = 0x504c5441, kChallMagic = 0x504c5443;

struct Script {
  uint8_t flags;
  std::string bytes;
};

std::vector<Script> scripts(fuzz::Input& in) {
  std::vector<Script> v;
  int n = 1 + in.u8() % 4;
  for (int i = 0; i < n && in.n > 0; ++i) {
    Script s;
    s.flags = in.u8();
    s.bytes = in.bytes(in.u16() % 1024);
    v.push_back(std::move(s));
  }
  return v;
}

void fuzzListener(fuzz::Input& in) {
  const int streams = plait::knobs().tcpStreams;
  plait::TcpDomain listener(0, 2, streams);
  const std::string addr0 = listener.listenAddress("127.0.0.1");
  const int port = std::atoi(addr0.substr(addr0.rfind(':') + 1).c_str());
  std::string lerr;
  bool lok = false;
  std::thread lt([&] {
    try {
      listener.connectAll({1}, {"", ""}, kSecret, kJob, 5000);
      lok = true;
    } catch (const plait::Error& e) {
      lerr = e.what();
    } catch (const std::exception& e) {
      lerr = std::string("NOT a plait::Error: ") + e.what();
    }
  });
  std::vector<int> open;
  for (const Script& s : scripts(in)) {
    int fd = fuzz::connectLocal(port);
    if (fd < 0) continue;
    std::string msg;
    if (s.flags & 1) {  // a well-formed Hello from rank 1 first: the fuzz bytes are then the proof (and beyond)
      Hello h{kHelloMagic, 1, uint16_t((s.flags >> 4) % (streams + 1)), 1, 0, {}};
      msg.assign(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    msg += s.bytes;
    fuzz::sendAll(fd, msg.data(), msg.size());
    if (s.flags & 2) {
      open.push_back(fd);  // left open: a silent connection must not hold up the real peer
      if (s.flags & 4) shutdown(fd, SHUT_WR);
    } else {
      close(fd);
    }
  }
  plait::TcpDomain dialer(1, 2, streams);
  std::string derr;
  try {
    dialer.connectAll({0}, {addr0, ""}, kSecret, kJob, 5000);
  } catch (const std::exception& e) {
    derr = e.what();
  }
  lt.join();
  for (int fd : open) close(fd);
  if (!lok) fuzz::die("the listener gave up after garbage connections: " + lerr);
  if (!derr.empty()) fuzz::die("the real dialer was refused after garbage connections: " + derr);
}

void fuzzDialer(fuzz::Input& in) {
  static int lport = 0;
  static int lfd = fuzz::listenLocal(&lport);
  const int streams = plait::knobs().tcpStreams;
  // Connections left over from an earlier input (the dialer gave up before we accepted them).
  for (;;) {
    pollfd pf{lfd, POLLIN, 0};
    if (poll(&pf, 1, 0) <= 0) break;
    int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) close(fd);
  }
  std::vector<Script> ss = scripts(in);
  plait::TcpDomain dialer(1, 2, streams);
  std::atomic<bool> finished{false};
  std::string err;
  auto t0 = steady_clock::now();
  std::thread dt([&] {
    try {
      dialer.connectAll({0}, {"127.0.0.1:" + std::to_string(lport), ""}, kSecret, kJob, 300);
    } catch (const plait::Error& e) {
      err = e.what();
    } catch (const std::exception& e) {
      err = std::string("NOT a plait::Error: ") + e.what();
    }
    finished = true;
  });
  size_t next = 0;
  std::vector<int> fds;
  while (!finished.load()) {
    pollfd pf{lfd, POLLIN, 0};
    if (poll(&pf, 1, 20) <= 0) continue;
    int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    fds.push_back(fd);
    if (next >= ss.size()) {  // out of scripts: hang up at once
      close(fd);
      fds.pop_back();
      continue;
    }
    const Script& s = ss[next++];
    Hello h{};
    if (!fuzz::recvAll(fd, &h, sizeof(h), 1000)) continue;
    std::string msg;
    if (s.flags & 1) {  // a correct challenge: the fake rank 0 holds the secret
      Challenge c{kChallMagic, 0, {}, {}};
      for (int i = 0; i < 16; ++i) c.nonce[i] = uint8_t(i * 7 + s.flags);
      std::string m(1, 'L');
      m += kJob;
      m.append(reinterpret_cast<const char*>(&h), sizeof(h));
      m.append(reinterpret_cast<const char*>(c.nonce), 16);
      plait::Digest d = plait::hmacSha256(kSecret, m.data(), m.size());
      std::memcpy(c.mac, d.data(), 32);
      msg.assign(reinterpret_cast<const char*>(&c), sizeof(c));
    }
    msg += s.bytes;
    fuzz::sendAll(fd, msg.data(), msg.size());
    if (s.flags & 2) shutdown(fd, SHUT_WR);
    else if (!(s.flags & 4)) close(fd), fds.pop_back();
  }
  dt.join();
  for (int fd : fds) close(fd);
  auto took = duration_cast<milliseconds>(steady_clock::now() - t0).count();
  if (err.rfind("NOT", 0) == 0) fuzz::die(err);
  if (took > 2500) fuzz::die("the dialer outlived its 300 ms deadline: " + std::to_string(took) + " ms");
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quietEnv();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in{data, size};
  if (in.u8() & 1) fuzzDialer(in);
  else fuzzListener(in);
  return 0;
}
