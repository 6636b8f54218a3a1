// Fuzz target: the summation servers' protocol (server/protocol.h): the server's handshake, ping and segment
// stream (server/server.cc), and the worker's side (server/link.cc).
//
// One SumServer runs in this process for the whole run (as plait-server would), over an in-memory store that holds
// a fresh job secret per input. Input: [mode][...]
//   mode 0: unauthenticated clients: each connection sends the fuzzer's bytes, optionally behind a well-formed
//     join / ping Hello for a job the server knows, then closes or stays open.
//   mode 1: authenticated workers (1 or 2, correct handshakes): each then sends the fuzzer's bytes as its segment
//     stream and half-closes; the harness reads what the server answers until it closes the job.
//   mode 2: a fake server answers a real worker (ServerLinks): a correct or fuzzed challenge and acceptance, then
//     the fuzzer's bytes as the sums of one all-reduce exchange (raw or compressed).
// Oracle: the server refuses what it must, ends jobs whose workers left, and keeps serving (a real ping for a known
// job answers after every input); the worker finishes or raises plait::Error within its deadline; nothing crashes,
// reads or writes out of bounds, leaks or allocates without bound.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "harness.h"
#include "plait/server/link.h"
#include "plait/server/protocol.h"
#include "plait/server/server.h"

using namespace std::chrono;
namespace srv = plait::srv;

namespace {
std::shared_ptr<fuzz::MemStore> gStore;
std::unique_ptr<plait::SumServer> gServer;
int gPort = 0;
const std::string kSecret = "0123456789abcdef0123456789abcdef";  // raw bytes; the store holds their hex

std::string newJob() {
  static uint64_t n = 0;
  char id[17];
  std::snprintf(id, sizeof(id), "%016llx", static_cast<unsigned long long>(++n));
  gStore->set(srv::jobSecretKey(id), plait::toHex(kSecret.data(), kSecret.size()));
  return id;
}

srv::Hello hello(const std::string& job, uint16_t kind, int worker, int nworkers) {
  srv::Hello h{};
  h.magic = srv::kHelloMagic;
  h.version = srv::kVersion;
  h.kind = kind;
  h.worker = worker;
  h.nworkers = nworkers;
  h.timeoutMs = 1000;
  std::memcpy(h.job, job.data(), srv::kJobIdLen);
  for (int i = 0; i < 16; ++i) h.nonce[i] = uint8_t(i + worker);
  return h;
}

// Reads until the server closes (or `ms` pass); returns whether it closed.
bool drainUntilClosed(int fd, int ms) {
  auto until = steady_clock::now() + milliseconds(ms);
  char buf[4096];
  while (steady_clock::now() < until) {
    pollfd pf{fd, POLLIN, 0};
    if (poll(&pf, 1, 20) <= 0) continue;
    ssize_t r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) return true;
  }
  return false;
}

void unauthenticated(fuzz::Input& in) {
  const std::string job = newJob();
  std::vector<int> open;
  int n = 1 + in.u8() % 4;
  for (int i = 0; i < n && in.n > 0; ++i) {
    uint8_t flags = in.u8();
    std::string bytes = in.bytes(in.u16() % 2048);
    int fd = fuzz::connectLocal(gPort);
    if (fd < 0) fuzz::die("cannot connect to the server");
    std::string msg;
    if (flags & 1) {
      srv::Hello h = hello(job, flags & 2 ? srv::kPing : srv::kJoin, (flags >> 4) & 1, 1 + ((flags >> 5) & 1));
      msg.assign(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    msg += bytes;
    fuzz::sendAll(fd, msg.data(), msg.size());
    if (flags & 4) open.push_back(fd);
    else close(fd);
  }
  for (int fd : open) close(fd);
}

void authenticated(fuzz::Input& in) {
  const std::string job = newJob();
  const int nw = 1 + in.u8() % 2;
  std::vector<int> fds;
  for (int w = 0; w < nw; ++w) {
    int fd = fuzz::connectLocal(gPort);
    if (fd < 0) fuzz::die("cannot connect to the server");
    srv::Hello h = hello(job, srv::kJoin, w, nw);
    srv::Challenge c{};
    if (!fuzz::sendAll(fd, &h, sizeof(h)) || !fuzz::recvAll(fd, &c, sizeof(c), 2000) || c.magic != srv::kChallMagic)
      fuzz::die("the server did not challenge a well-formed join");
    plait::Digest d = srv::proofOf(kSecret, 'W', h, c.nonce);
    uint32_t ok[2] = {0, 1};
    if (!fuzz::sendAll(fd, d.data(), d.size()) || !fuzz::recvAll(fd, ok, sizeof(ok), 2000) ||
        ok[0] != srv::kAcceptMagic || ok[1] != 0)
      fuzz::die("the server did not accept a correct proof");
    fds.push_back(fd);
  }
  // Worker w's stream: the input, split between the workers.
  const std::string all = in.rest();
  const size_t cut = nw == 1 ? all.size() : all.size() / 2;
  for (int w = 0; w < nw; ++w) {
    std::string part = w == 0 ? all.substr(0, cut) : all.substr(cut);
    fuzz::sendAll(fds[w], part.data(), part.size());
    shutdown(fds[w], SHUT_WR);
  }
  for (int w = 0; w < nw; ++w)
    if (!drainUntilClosed(fds[w], 5000)) fuzz::die("the server kept a job whose workers all left");
  for (int fd : fds) close(fd);
}

void fakeServer(fuzz::Input& in) {
  static int lport = 0;
  static int lfd = fuzz::listenLocal(&lport);
  const uint8_t flags = in.u8(), shape = in.u8();
  const std::string ack = in.bytes(flags & 2 ? 0 : 8);
  const std::string bytes = in.rest();
  const std::string job = "00000000000000aa";
  std::atomic<bool> finished{false};
  std::string err;
  auto t0 = steady_clock::now();
  std::thread worker([&] {
    try {
      plait::ServerLinks links(0, 0, 1, {"127.0.0.1:" + std::to_string(lport)}, job, kSecret, milliseconds(300));
      std::vector<float> buf(64 * 4, 1.0f), resid(64 * 4);
      const size_t vals = 1 + shape % 64;
      plait::codec::Spec spec{};
      const bool coded = shape & 0x40;
      if (coded) spec = plait::codec::makeSpec(plait::codec::Codec(1 + (shape >> 3) % 4), 0);
      links.exchange(reinterpret_cast<char*>(buf.data()), {{0, vals * 4}}, plait::DType::kFloat32,
                     plait::RedOp::kSum, 5, 16 * (1 + (shape & 3)), milliseconds(300), nullptr, "fuzz all_reduce",
                     coded ? &spec : nullptr, 1.0f, coded && (shape & 0x80) ? resid.data() : nullptr);
    } catch (const plait::Error& e) {
      err = e.what();
    } catch (const std::exception& e) {
      err = std::string("NOT a plait::Error: ") + e.what();
    }
    finished = true;
  });
  std::vector<int> fds;
  bool served = false;
  while (!finished.load()) {
    pollfd pf{lfd, POLLIN, 0};
    if (poll(&pf, 1, 20) <= 0) continue;
    int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    if (served) {
      close(fd);
      continue;
    }
    served = true;
    fds.push_back(fd);
    srv::Hello h{};
    if (!fuzz::recvAll(fd, &h, sizeof(h), 1000)) continue;
    std::string msg;
    if (flags & 1) {  // a correct challenge: the fake holds the job's secret
      srv::Challenge c{srv::kChallMagic, 0, {}, {}};
      plait::Digest d = srv::proofOf(kSecret, 'S', h, c.nonce);
      std::memcpy(c.mac, d.data(), 32);
      msg.assign(reinterpret_cast<const char*>(&c), sizeof(c));
      srv::Proof p{};
      fuzz::sendAll(fd, msg.data(), msg.size());
      msg.clear();
      fuzz::recvAll(fd, &p, sizeof(p), 1000);
      if (flags & 2) {
        uint32_t ok[2] = {srv::kAcceptMagic, 0};
        msg.assign(reinterpret_cast<const char*>(ok), sizeof(ok));
      }
    }
    msg += ack + bytes;
    fuzz::sendAll(fd, msg.data(), msg.size());
    if (flags & 4) shutdown(fd, SHUT_WR);
    else close(fd), fds.pop_back();
  }
  worker.join();
  for (int fd : fds) close(fd);
  auto took = duration_cast<milliseconds>(steady_clock::now() - t0).count();
  if (err.rfind("NOT", 0) == 0) fuzz::die(err);
  if (took > 3000) fuzz::die("the worker outlived its 300 ms deadline: " + std::to_string(took) + " ms");
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quietEnv();
  gStore = std::make_shared<fuzz::MemStore>();
  plait::ServerOptions o;
  o.advertise = "127.0.0.1";
  o.threads = 1;
  o.depth = 2;
  gServer = std::make_unique<plait::SumServer>(gStore, o);
  gServer->start();
  const std::string a = gServer->address();
  gPort = std::atoi(a.substr(a.rfind(':') + 1).c_str());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in{data, size};
  const uint8_t mode = in.u8() % 3;
  if (mode == 0) unauthenticated(in);
  else if (mode == 1) authenticated(in);
  else fakeServer(in);
  if (mode != 2) {
    // The server must still serve: a ping for a job it knows answers.
    const std::string job = newJob();
    if (!plait::pingServer("127.0.0.1:" + std::to_string(gPort), milliseconds(3000), job))
      fuzz::die("the server stopped answering pings after the input");
  }
  return 0;
}
