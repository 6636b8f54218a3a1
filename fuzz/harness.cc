#include "harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <thread>

#include "plait/transport/tcp.h"

namespace fuzz {

void MemStore::set(const std::string& k, const std::string& v) {
  {
    std::lock_guard<std::mutex> g(mu_);
    kv_[k] = v;
  }
  cv_.notify_all();
}

std::string MemStore::get(const std::string& k) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!cv_.wait_for(lk, std::chrono::seconds(10), [&] { return kv_.count(k) > 0; }))
    throw plait::Error("fuzz store: timed out waiting for key " + k);
  return kv_[k];
}

int64_t MemStore::add(const std::string& k, int64_t d) {
  int64_t v;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = kv_.find(k);
    v = (it == kv_.end() ? 0 : std::atoll(it->second.c_str())) + d;
    kv_[k] = std::to_string(v);
  }
  cv_.notify_all();
  return v;
}

bool MemStore::check(const std::string& k) {
  std::lock_guard<std::mutex> g(mu_);
  return kv_.count(k) > 0;
}

bool sendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (std::chrono::steady_clock::now() > until) return false;
      pollfd pf{fd, POLLOUT, 0};
      poll(&pf, 1, 10);
      continue;
    }
    if (r <= 0) return false;
    p += r, n -= size_t(r);
  }
  return true;
}

bool recvAll(int fd, void* buf, size_t n, int ms) {
  char* p = static_cast<char*>(buf);
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (n > 0) {
    int left = int(std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now())
                       .count());
    pollfd pf{fd, POLLIN, 0};
    if (left <= 0 || poll(&pf, 1, left) <= 0) return false;
    ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (r <= 0) return false;
    p += r, n -= size_t(r);
  }
  return true;
}

int connectLocal(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(uint16_t(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

int listenLocal(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(fd, 64) != 0) die("bind/listen");
  *port = localPort(fd);
  return fd;
}

int localPort(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

void die(const std::string& why) {
  std::fprintf(stderr, "FUZZ ORACLE FAILED: %s\n", why.c_str());
  std::fflush(stderr);
  std::abort();
}

void quietEnv() {
  setenv("PLAIT_DEBUG", "0", 0);
  setenv("PLAIT_TCP_DEAD_PEER_S", "0", 0);
  setenv("PLAIT_LINK_PROBE", "0", 0);
  setenv("PLAIT_SPIN_US", "0", 0);
  setenv("PLAIT_YIELD_US", "0", 0);
}

CommPair::CommPair(std::chrono::milliseconds timeout) : store(std::make_shared<MemStore>()) {
  plait::Options o;
  o.transport = "tcp";
  std::exception_ptr err[2];
  auto make = [&](int r) {
    try {
      c[r] = std::make_unique<plait::Comm>(store, r, 2, timeout, o);
    } catch (...) {
      err[r] = std::current_exception();
    }
  };
  std::thread t(make, 1);
  make(0);
  t.join();
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
}

CommPair::~CommPair() = default;

int CommPair::dataFd(int s) const { return c[1]->tcpDomain()->fd(0, s); }
int CommPair::controlFd() const { return c[1]->tcpDomain()->controlFd(0); }
int CommPair::streams() const { return c[1]->tcpDomain()->streams(); }

}  // namespace fuzz
