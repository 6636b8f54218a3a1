#include "plait/transport/sock.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

namespace plait {
namespace sock {

namespace {
constexpr int kSockBufBytes = 4 << 20;  // bounded kernel buffers per socket
}

void tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  int buf = kSockBufBytes;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
  // A peer host that vanishes without closing its connections (power, cable, partition) sends no FIN or RST:
  // keepalive probes catch it on an idle connection, TCP_USER_TIMEOUT when data stays unacknowledged, both
  // within about PLAIT_TCP_DEAD_PEER_S seconds instead of the group's (often 30-minute) timeout.
  const int deadS = knobs().tcpDeadPeerS;
  if (deadS > 0) {
    int idle = std::max(1, deadS / 3), intvl = std::max(1, deadS / 6), cnt = 3;
    unsigned userMs = unsigned(deadS) * 1000u;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &userMs, sizeof(userMs));
  }
}

void setNonBlocking(int fd, bool on) {
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

bool ioAll(int fd, void* buf, size_t n, bool isWrite, Clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    pollfd pfd{fd, short(isWrite ? POLLOUT : POLLIN), 0};
    int ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (ms <= 0 || poll(&pfd, 1, ms) <= 0) return false;
    ssize_t r = isWrite ? send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT) : recv(fd, p, n, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
    if (r <= 0) return false;
    p += r;
    n -= size_t(r);
  }
  return true;
}

std::string routeTo(const std::string& hint) {
  std::string addr = knobs().socketAddr;
  if (addr.empty() && !hint.empty()) {
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
  return addr.empty() ? "127.0.0.1" : addr;
}

std::string peerName(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof(a);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return "?";
  char buf[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof(buf));
  return cat(buf, ":", ntohs(a.sin_port));
}

int dial(const std::string& hp, Clock::time_point deadline, const std::string& what, bool retry) {
  auto colon = hp.rfind(':');
  PLAIT_CHECK(colon != std::string::npos, what, ": malformed address '", hp, "' (want host:port)");
  std::string host = hp.substr(0, colon), port = hp.substr(colon + 1);
  while (true) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    PLAIT_CHECK(getaddrinfo(host.c_str(), port.c_str(), &hints, &res) == 0 && res, what, ": cannot resolve ", hp);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      int e = errno;
      freeaddrinfo(res);
      throw Error(cat(what, ": socket() for the connection to ", hp, " failed: ", std::strerror(e)));
    }
    tune(fd);  // buffer sizes must be set before connect to take effect on the window
    // Non-blocking connect, waited for with the deadline: a blocking one to an address that drops SYNs waits the
    // kernel's retry schedule (minutes), whatever the caller's timeout says.
    setNonBlocking(fd, true);
    int rc = connect(fd, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    int e = rc == 0 ? 0 : errno;
    if (rc != 0 && e == EINPROGRESS) {
      pollfd pfd{fd, POLLOUT, 0};
      int ms = int(std::max<int64_t>(
          0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()));
      int pr = poll(&pfd, 1, ms);
      if (pr > 0) {
        int soErr = 0;
        socklen_t sl = sizeof(soErr);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soErr, &sl);
        e = soErr;
      } else {
        e = ETIMEDOUT;
      }
    }
    if (e == 0) {
      setNonBlocking(fd, false);
      return fd;
    }
    close(fd);
    PLAIT_CHECK(retry && Clock::now() < deadline, what, ": cannot connect to ", hp, ": ", std::strerror(e));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace sock
}  // namespace plait
