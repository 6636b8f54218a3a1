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
#include "plait/transport/auth.h"
#include "plait/transport/sock.h"

namespace plait {

namespace {
constexpr uint32_t kHelloMagic = 0x504c5441;   // "PLTA": a dialer introduces itself
constexpr uint32_t kChallMagic = 0x504c5443;   // "PLTC": the listener's challenge and proof
constexpr uint32_t kAcceptMagic = 0x504c544b;  // "PLTK": accepted, data may flow
constexpr uint16_t kVersion = 1;
constexpr size_t kBounceBytes = 256 * 1024;
constexpr size_t kStripeBytes = 128 * 1024;  // with several streams, consecutive stripes go round-robin
constexpr auto kHandshakeLimit = std::chrono::seconds(10);
// Connections in their handshake at once: beyond this the oldest is dropped, so a flood of silent connections cannot
// use up this process's file descriptors (and hold the real peers out) for kHandshakeLimit.
constexpr size_t kMaxPending = 256;

struct Hello {
  uint32_t magic;
  uint16_t version, stream;
  int32_t from, to;
  uint8_t nonce[16];
};
struct Challenge {
  uint32_t magic, reserved;
  uint8_t nonce[16];
  uint8_t mac[32];  // the listener proves it holds the secret, bound to the dialer's nonce
};
struct Proof {
  uint8_t mac[32];  // the dialer proves it holds the secret, bound to the listener's nonce
};
static_assert(sizeof(Hello) == 32 && sizeof(Challenge) == 56 && sizeof(Proof) == 32, "handshake layout");

Digest proofOf(const std::string& secret, char who, const std::string& jobId, const Hello& h,
               const uint8_t* listenerNonce) {
  std::string m(1, who);
  m += jobId;
  m.append(reinterpret_cast<const char*>(&h), sizeof(h));
  m.append(reinterpret_cast<const char*>(listenerNonce), 16);
  return hmacSha256(secret, m.data(), m.size());
}

// One connection being accepted: the listener runs every pending handshake at once, so a silent or slow
// connection cannot hold up the real peers.
struct Pending {
  int fd;
  std::string from;
  Clock::time_point deadline;
  int stage = 0;  // 0: reading Hello, 1: reading Proof
  Hello hello{};
  Proof proof{};
  size_t got = 0;
  uint8_t nonce[16];
};
}  // namespace

TcpDomain::TcpDomain(int rank, int nranks, int streams)
    : rank_(rank), nranks_(nranks), streams_(std::max(1, streams)), fds_(nranks) {
  for (auto& v : fds_) v.assign(streams_ + 1, -1);
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
  for (auto& v : fds_)
    for (int fd : v)
      if (fd >= 0) close(fd);
}

void TcpDomain::closeListener() {
  if (listenFd_ >= 0) close(listenFd_);
  listenFd_ = -1;
}

std::string TcpDomain::listenAddress(const std::string& hint) const {
  // The address of the interface that routes towards the rendezvous host.
  return cat(sock::routeTo(hint), ":", port_);
}

void TcpDomain::dial(int p, int stream, const std::string& hp, const std::string& secret, const std::string& jobId,
                     int64_t deadlineMs) {
  auto deadline = Clock::time_point(std::chrono::milliseconds(deadlineMs));
  int fd = sock::dial(hp, deadline, cat("plait: rank ", rank_, ": peer rank ", p));
  auto fail = [&](const std::string& why) {
    close(fd);
    throw Error(cat("plait: rank ", rank_, ": TCP handshake with peer rank ", p, " at ", hp, " (stream ", stream,
                    ") failed: ", why));
  };
  Hello h{kHelloMagic, kVersion, uint16_t(stream), rank_, p, {}};
  randomBytes(h.nonce, sizeof(h.nonce));
  Challenge c{};
  if (!sock::ioAll(fd, &h, sizeof(h), true, deadline) || !sock::ioAll(fd, &c, sizeof(c), false, deadline))
    fail("no challenge came back (the peer refused this connection, or is not a plait rank of this job)");
  if (c.magic != kChallMagic) fail("the peer answered with something that is not a plait challenge");
  Digest want = proofOf(secret, 'L', jobId, h, c.nonce);
  if (!digestEqual(want.data(), c.mac)) fail("the peer could not prove it holds this job's secret");
  Digest mine = proofOf(secret, 'D', jobId, h, c.nonce);
  Proof pr;
  std::memcpy(pr.mac, mine.data(), sizeof(pr.mac));
  uint32_t ack = 0;
  if (!sock::ioAll(fd, &pr, sizeof(pr), true, deadline) || !sock::ioAll(fd, &ack, sizeof(ack), false, deadline) ||
      ack != kAcceptMagic)
    fail("the peer did not accept this rank's proof (do both ranks belong to the same job?)");
  fds_[p][stream] = fd;
}

void TcpDomain::connectAll(const std::vector<int>& peers, const std::vector<std::string>& addrs,
                           const std::string& secret, const std::string& jobId, int64_t timeoutMs) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeoutMs);
  int64_t deadlineMs =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline.time_since_epoch()).count();
  int expect = 0;
  // Tests hold the peers' listeners open this way while rogue clients knock on them.
  if (knobs().testDialDelayMs > 0) std::this_thread::sleep_for(std::chrono::milliseconds(knobs().testDialDelayMs));
  for (int p : peers) {
    if (p > rank_) {
      expect += streams_ + 1;
      continue;
    }
    for (int s = 0; s <= streams_; ++s) dial(p, s, addrs[p], secret, jobId, deadlineMs);
  }
  std::vector<Pending> pend;
  std::string acceptTrouble;
  auto refuse = [&](size_t i, const std::string& why) {
    logWarn(cat("rank ", rank_, ": refused a TCP connection from ", pend[i].from, ": ", why));
    close(pend[i].fd);
    pend.erase(pend.begin() + long(i));
  };
  try {
    while (expect > 0) {
      auto now = Clock::now();
      if (now >= deadline) {
        // Name the peers that never connected (an unreachable host, a rank that died or never started).
        std::string who;
        for (int p : peers) {
          if (p <= rank_) continue;
          int missing = 0;
          for (int st = 0; st <= streams_; ++st) missing += fds_[p][st] < 0;
          if (missing)
            who += cat(who.empty() ? "" : ", ", "rank ", p, " at ", addrs[p], " (", missing, " of ", streams_ + 1,
                       " connections missing)");
        }
        throw Error(cat("plait: rank ", rank_, ": timed out after ", timeoutMs, " ms waiting for ", expect,
                        " connection(s) from higher-ranked peer(s): ", who, acceptTrouble));
      }
      for (size_t i = 0; i < pend.size();)
        if (now >= pend[i].deadline) refuse(i, "no complete handshake within 10 s");
        else ++i;
      std::vector<pollfd> pfds{pollfd{listenFd_, POLLIN, 0}};
      for (auto& q : pend) pfds.push_back(pollfd{q.fd, POLLIN, 0});
      if (poll(pfds.data(), pfds.size(), 100) <= 0) continue;
      if (pfds[0].revents & POLLIN) {
        int fd = accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)) {
          // The connection stays queued and the listener stays readable: without a pause, poll returns at once
          // and this loop spins a core until the deadline. Remember why, for the timeout's message.
          acceptTrouble = cat(" (accept failed: ", std::strerror(errno), ", raise the open-files limit: ulimit -n)");
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        if (fd >= 0) {
          sock::tune(fd);
          Pending q{fd, sock::peerName(fd), Clock::now() + kHandshakeLimit};
          randomBytes(q.nonce, sizeof(q.nonce));
          pend.push_back(q);
        }
      }
      // Walk backwards so refusing (erasing) one does not skip another.
      for (size_t k = pfds.size() - 1; k >= 1; --k) {
        if (!pfds[k].revents) continue;
        size_t i = k - 1;
        Pending& q = pend[i];
        char* dst = q.stage == 0 ? reinterpret_cast<char*>(&q.hello) : reinterpret_cast<char*>(&q.proof);
        size_t want = q.stage == 0 ? sizeof(Hello) : sizeof(Proof);
        ssize_t r = recv(q.fd, dst + q.got, want - q.got, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
          refuse(i, "closed before completing the handshake");
          continue;
        }
        if (r < 0) continue;
        q.got += size_t(r);
        if (q.got < want) continue;
        q.got = 0;
        const Hello& h = q.hello;
        if (q.stage == 0) {
          if (h.magic != kHelloMagic || h.version != kVersion) {
            refuse(i, "not a plait handshake (garbage or another program)");
            continue;
          }
          if (h.to != rank_ || h.from <= rank_ || h.from >= nranks_ || h.stream > streams_) {
            refuse(i, cat("claims to be rank ", h.from, " stream ", h.stream, " calling rank ", h.to,
                          ", which is not a connection this rank expects"));
            continue;
          }
          Challenge c{kChallMagic, 0, {}, {}};
          std::memcpy(c.nonce, q.nonce, sizeof(c.nonce));
          Digest mac = proofOf(secret, 'L', jobId, h, q.nonce);
          std::memcpy(c.mac, mac.data(), sizeof(c.mac));
          if (send(q.fd, &c, sizeof(c), MSG_NOSIGNAL | MSG_DONTWAIT) != ssize_t(sizeof(c))) {
            refuse(i, "could not send the challenge");
            continue;
          }
          q.stage = 1;
          continue;
        }
        Digest want2 = proofOf(secret, 'D', jobId, h, q.nonce);
        if (!digestEqual(want2.data(), q.proof.mac)) {
          refuse(i, cat("claimed to be rank ", h.from, " but failed the challenge (no or wrong job secret, or a "
                        "replayed handshake)"));
          continue;
        }
        if (fds_[h.from][h.stream] >= 0) {
          refuse(i, cat("rank ", h.from, " stream ", h.stream, " is already connected"));
          continue;
        }
        uint32_t ack = kAcceptMagic;
        if (send(q.fd, &ack, sizeof(ack), MSG_NOSIGNAL | MSG_DONTWAIT) != ssize_t(sizeof(ack))) {
          refuse(i, "could not send the acceptance");
          continue;
        }
        fds_[h.from][h.stream] = q.fd;
        pend.erase(pend.begin() + long(i));
        --expect;
      }
      // After the pass above (erasing before it would shift `pend` against `pfds`).
      while (pend.size() > kMaxPending) refuse(0, "too many connections in their handshake");
    }
  } catch (...) {
    for (auto& q : pend) close(q.fd);
    throw;
  }
  for (auto& q : pend) close(q.fd);
  for (int p : peers)
    for (int fd : fds_[p]) sock::setNonBlocking(fd, true);
}

void TcpDomain::abortAll() {
  for (auto& v : fds_)
    for (int fd : v)
      if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

// The byte stream to one peer, striped over `fds.size()` sockets in kStripeBytes pieces, round-robin (both
// sides use the same order, so the stream is reassembled exactly). With one socket this is a plain stream.
class TcpChannel : public Channel {
 public:
  TcpChannel(std::vector<int> fds, int rank, std::string peer)
      : fds_(std::move(fds)), rank_(rank), peer_(std::move(peer)), bounce_(kBounceBytes) {}
  TransportKind kind() const override { return TransportKind::kTcp; }

  size_t write(const void* src, size_t n) override {
    const char* s = static_cast<const char*>(src);
    size_t total = 0;
    while (total < n) {
      size_t k = std::min(n - total, fds_.size() > 1 ? kStripeBytes - wOff_ : n - total);
      ssize_t r = send(fds_[wStream_], s + total, k, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
        throw Error(cat("plait: rank ", rank_, ": connection to ", peer_, " lost while sending: ",
                        std::strerror(errno)));
      }
      total += size_t(r);
      advance(wStream_, wOff_, size_t(r));
      if (size_t(r) < k) break;
    }
    return total;
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
    if (got < n) got += recvSome(static_cast<char*>(dst) + got, n - got);  // straight in, no bounce
    return got;
  }
  size_t available() override {
    if (begin_ == end_) fill();
    return end_ - begin_;
  }
  int pollFd(bool forWrite) const override { return forWrite ? fds_[wStream_] : fds_[rStream_]; }

 private:
  void advance(size_t& stream, size_t& off, size_t n) {
    if (fds_.size() == 1) return;
    off += n;
    if (off == kStripeBytes) off = 0, stream = (stream + 1) % fds_.size();
  }
  size_t recvSome(char* dst, size_t n) {
    size_t total = 0;
    while (total < n) {
      size_t k = std::min(n - total, fds_.size() > 1 ? kStripeBytes - rOff_ : n - total);
      ssize_t r = recv(fds_[rStream_], dst + total, k, MSG_DONTWAIT);
      if (r == 0)
        throw Error(cat("plait: rank ", rank_, ": connection to ", peer_,
                        " closed (the peer exited or aborted)"));
      if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
        throw Error(cat("plait: rank ", rank_, ": connection to ", peer_, " lost while receiving: ",
                        std::strerror(errno)));
      }
      total += size_t(r);
      advance(rStream_, rOff_, size_t(r));
      if (size_t(r) < k) break;
    }
    return total;
  }
  void fill() {
    if (begin_ > 0) {
      std::memmove(bounce_.data(), bounce_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    if (end_ < bounce_.size()) end_ += recvSome(bounce_.data() + end_, bounce_.size() - end_);
  }
  std::vector<int> fds_;
  int rank_;
  std::string peer_;
  size_t wStream_ = 0, wOff_ = 0, rStream_ = 0, rOff_ = 0;
  std::vector<char> bounce_;
  size_t begin_ = 0, end_ = 0;
};

std::unique_ptr<Channel> TcpDomain::channel(int peer, const std::string& peerDesc) {
  for (int fd : fds_[peer])
    PLAIT_CHECK(fd >= 0, "plait: rank ", rank_, ": no TCP connection to peer rank ", peer);
  return std::make_unique<TcpChannel>(std::vector<int>(fds_[peer].begin(), fds_[peer].begin() + streams_), rank_,
                                      peerDesc);
}

}  // namespace plait
