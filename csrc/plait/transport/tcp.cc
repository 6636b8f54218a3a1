#include "plait/transport/tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "plait/common.h"

namespace plait {

namespace {
constexpr uint32_t kHelloMagic = 0x504c5448;  // "PLTH"
constexpr size_t kBounceBytes = 256 * 1024;

void setNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  int buf = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
}
void setNonBlocking(int fd, bool on) {
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

// Blocking full read/write with a deadline, used only during connection set-up.
bool ioAll(int fd, void* buf, size_t n, bool isWrite, Clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    pollfd pfd{fd, short(isWrite ? POLLOUT : POLLIN), 0};
    int ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (ms <= 0 || poll(&pfd, 1, ms) <= 0) return false;
    ssize_t r = isWrite ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (r <= 0) return false;
    p += r;
    n -= size_t(r);
  }
  return true;
}

struct Hello {
  uint32_t magic;
  int32_t rank;
  char token[56];
};
}  // namespace

TcpDomain::TcpDomain(int rank, int nranks) : rank_(rank), nranks_(nranks), fds_(nranks, -1) {
  listenFd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  PLAIT_CHECK(listenFd_ >= 0, "plait: rank ", rank, ": socket() failed: ", std::strerror(errno));
  int one = 1;
  setsockopt(listenFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  PLAIT_CHECK(bind(listenFd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0, "plait: rank ", rank,
              ": bind failed: ", std::strerror(errno));
  PLAIT_CHECK(listen(listenFd_, 256) == 0, "plait: rank ", rank, ": listen failed: ", std::strerror(errno));
  socklen_t len = sizeof(a);
  getsockname(listenFd_, reinterpret_cast<sockaddr*>(&a), &len);
  port_ = ntohs(a.sin_port);
}

TcpDomain::~TcpDomain() {
  closeListener();
  for (int fd : fds_)
    if (fd >= 0) close(fd);
}

void TcpDomain::closeListener() {
  if (listenFd_ >= 0) close(listenFd_);
  listenFd_ = -1;
}

std::string TcpDomain::listenAddress(const std::string& hint) const {
  std::string addr = knobs().socketAddr;
  if (addr.empty() && !hint.empty()) {
    // The address of the interface that routes towards the rendezvous host.
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    if (getaddrinfo(hint.c_str(), "9", &hints, &res) == 0 && res) {
      int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      if (s >= 0 && connect(s, res->ai_addr, res->ai_addrlen) == 0) {
        sockaddr_in me{};
        socklen_t len = sizeof(me);
        if (getsockname(s, reinterpret_cast<sockaddr*>(&me), &len) == 0) {
          char buf[INET_ADDRSTRLEN];
          inet_ntop(AF_INET, &me.sin_addr, buf, sizeof(buf));
          addr = buf;
        }
      }
      if (s >= 0) close(s);
      freeaddrinfo(res);
    }
  }
  if (addr.empty()) addr = "127.0.0.1";
  return cat(addr, ":", port_);
}

void TcpDomain::connectAll(const std::vector<int>& peers, const std::vector<std::string>& addrs,
                           const std::string& token, int64_t timeoutMs) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeoutMs);
  int expectAccept = 0;
  Hello mine{};
  mine.magic = kHelloMagic;
  mine.rank = rank_;
  std::strncpy(mine.token, token.c_str(), sizeof(mine.token) - 1);
  for (int p : peers) {
    if (p > rank_) {
      ++expectAccept;
      continue;
    }
    const std::string& hp = addrs[p];
    auto colon = hp.rfind(':');
    std::string host = hp.substr(0, colon), port = hp.substr(colon + 1);
    int fd = -1;
    while (true) {
      addrinfo hints{}, *res = nullptr;
      hints.ai_family = AF_INET;
      hints.ai_socktype = SOCK_STREAM;
      PLAIT_CHECK(getaddrinfo(host.c_str(), port.c_str(), &hints, &res) == 0 && res, "plait: rank ", rank_,
                  ": cannot resolve ", hp, " of peer rank ", p);
      fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      int rc = connect(fd, res->ai_addr, res->ai_addrlen);
      freeaddrinfo(res);
      if (rc == 0) break;
      int e = errno;
      close(fd);
      PLAIT_CHECK(Clock::now() < deadline, "plait: rank ", rank_, ": cannot connect to peer rank ", p, " at ", hp,
                  ": ", std::strerror(e));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    setNoDelay(fd);
    PLAIT_CHECK(ioAll(fd, &mine, sizeof(mine), true, deadline), "plait: rank ", rank_,
                ": handshake with peer rank ", p, " at ", hp, " failed");
    fds_[p] = fd;
  }
  while (expectAccept > 0) {
    pollfd pfd{listenFd_, POLLIN, 0};
    int ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    PLAIT_CHECK(ms > 0 && poll(&pfd, 1, ms) > 0, "plait: rank ", rank_, ": timed out waiting for ", expectAccept,
                " higher-ranked peer(s) to connect");
    int fd = accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    setNoDelay(fd);
    Hello h{};
    auto helloDeadline = std::min(deadline, Clock::now() + std::chrono::seconds(5));
    bool ok = ioAll(fd, &h, sizeof(h), false, helloDeadline) && h.magic == kHelloMagic && h.rank > rank_ &&
              h.rank < nranks_ && fds_[h.rank] < 0 &&
              std::strncmp(h.token, mine.token, sizeof(h.token)) == 0;
    if (!ok) {  // a stray or foreign connection: refuse it and keep waiting for the real peers
      logWarn(cat("rank ", rank_, ": refused a TCP connection that did not present this job's token"));
      close(fd);
      continue;
    }
    fds_[h.rank] = fd;
    --expectAccept;
  }
  for (int p : peers) setNonBlocking(fds_[p], true);
}

void TcpDomain::abortAll() {
  for (int fd : fds_)
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

class TcpChannel : public Channel {
 public:
  TcpChannel(int fd, int rank, int peer) : fd_(fd), rank_(rank), peer_(peer), bounce_(kBounceBytes) {}
  TransportKind kind() const override { return TransportKind::kTcp; }

  size_t write(const void* src, size_t n) override {
    if (n == 0) return 0;
    ssize_t r = send(fd_, src, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) return size_t(r);
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    throw Error(cat("plait: rank ", rank_, ": connection to peer rank ", peer_, " lost while sending: ",
                    std::strerror(errno)));
  }

  size_t peek(const void** p) override {
    if (end_ - begin_ < 64) fill();
    *p = bounce_.data() + begin_;
    return end_ - begin_;
  }
  void consume(size_t n) override { begin_ += n; }

  size_t read(void* dst, size_t n) override {
    size_t got = std::min(n, end_ - begin_);
    std::memcpy(dst, bounce_.data() + begin_, got);
    begin_ += got;
    if (got < n) {  // straight into the destination, no bounce
      ssize_t r = recvSome(static_cast<char*>(dst) + got, n - got);
      got += size_t(r);
    }
    return got;
  }
  size_t available() override {
    if (begin_ == end_) fill();
    return end_ - begin_;
  }

 private:
  ssize_t recvSome(char* dst, size_t n) {
    ssize_t r = recv(fd_, dst, n, MSG_DONTWAIT);
    if (r > 0) return r;
    if (r == 0)
      throw Error(cat("plait: rank ", rank_, ": connection to peer rank ", peer_,
                      " closed (the peer exited or aborted)"));
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    throw Error(cat("plait: rank ", rank_, ": connection to peer rank ", peer_, " lost while receiving: ",
                    std::strerror(errno)));
  }
  void fill() {
    if (begin_ > 0) {
      std::memmove(bounce_.data(), bounce_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    if (end_ < bounce_.size()) end_ += size_t(recvSome(bounce_.data() + end_, bounce_.size() - end_));
  }
  int fd_, rank_, peer_;
  std::vector<char> bounce_;
  size_t begin_ = 0, end_ = 0;
};

std::unique_ptr<Channel> TcpDomain::channel(int peer) {
  PLAIT_CHECK(fds_[peer] >= 0, "plait: rank ", rank_, ": no TCP connection to peer rank ", peer);
  return std::make_unique<TcpChannel>(fds_[peer], rank_, peer);
}

}  // namespace plait
