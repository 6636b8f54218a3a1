#include "plait/transport/shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <new>

#include "plait/common.h"

namespace plait {

namespace {
constexpr uint64_t kMagic = 0x31544941'4c50ull;  // "PLAIT1"
}

struct alignas(64) ShmSegHeader {
  uint64_t magic;
  int32_t rank, nranks, pid;
  uint64_t ringBytes;
  alignas(64) std::atomic<uint32_t> bell;
  std::atomic<uint32_t> waiters;
  std::atomic<uint32_t> pollers;  // threads of the owner sleeping in poll(2) (on TCP and bellFd) instead of the futex
  char bellName[96];                // abstract UNIX datagram socket that wakes them (without the leading NUL)
  alignas(64) std::atomic<int32_t> abortBy;  // rank + 1 of the rank that aborted, 0 if none
  std::atomic<int32_t> abortClaim;           // the first aborter claims abortMsg, fills it, then sets abortBy
  char abortMsg[1024];                       // the aborting rank's error, NUL-terminated
};

struct RingHdr {
  alignas(64) std::atomic<uint64_t> head;  // bytes consumed (reader's)
  alignas(64) std::atomic<uint64_t> tail;  // bytes produced (writer's)
};

namespace {
constexpr size_t kHdrBytes = (sizeof(ShmSegHeader) + 63) & ~size_t(63);
constexpr size_t kRingHdrBytes = sizeof(RingHdr);

RingHdr* ringAt(void* base, int idx, size_t ringBytes) {
  return reinterpret_cast<RingHdr*>(static_cast<char*>(base) + kHdrBytes + size_t(idx) * (kRingHdrBytes + ringBytes));
}
char* ringData(RingHdr* r) { return reinterpret_cast<char*>(r) + kRingHdrBytes; }

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* ts) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}
}  // namespace

// The writer (or reader) changed a ring, then checks for an announced waiter. The waiter announces, then
// re-checks the rings. With both sides sequentially consistent, one of them sees the other: no lost wake-up.
namespace {
sockaddr_un bellAddr(const char* name, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  size_t n = strnlen(name, sizeof(a.sun_path) - 2);
  std::memcpy(a.sun_path + 1, name, n);  // abstract namespace: leading NUL, nothing on the file system
  *len = socklen_t(offsetof(sockaddr_un, sun_path) + 1 + n);
  return a;
}

void sendBell(ShmSegHeader* h) {
  static int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return;
  socklen_t len;
  sockaddr_un a = bellAddr(h->bellName, &len);
  char b = 1;
  // A full socket queue already holds a wake-up; an unreachable one (another network namespace declared the same
  // host through PLAIT_HOST_ID) leaves the poller to its timeout.
  sendto(fd, &b, 1, MSG_DONTWAIT | MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&a), len);
}
}  // namespace

void ringBell(ShmSegHeader* h) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (h->pollers.load(std::memory_order_seq_cst) != 0) sendBell(h);
  if (h->waiters.load(std::memory_order_seq_cst) == 0) return;
  h->bell.fetch_add(1, std::memory_order_seq_cst);
  futex(&h->bell, FUTEX_WAKE, INT_MAX, nullptr);
}

ShmDomain::ShmDomain(const std::string& name, int rank, int nranks, size_t ringBytes)
    : name_(name), rank_(rank), nranks_(nranks), ringBytes_((std::max<size_t>(ringBytes, 64) + 63) & ~size_t(63)) {
  segBytes_ = kHdrBytes + size_t(nranks) * (kRingHdrBytes + ringBytes_);
  int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  PLAIT_CHECK(fd >= 0, "plait: rank ", rank, ": shm_open(", name_, ") failed: ", std::strerror(errno));
  if (ftruncate(fd, off_t(segBytes_)) != 0) {
    int e = errno;
    close(fd);
    shm_unlink(name_.c_str());
    throw Error(cat("plait: rank ", rank, ": ftruncate of shared memory ", name_, " to ", segBytes_,
                    " bytes failed: ", std::strerror(e)));
  }
  void* p = mmap(nullptr, segBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    int e = errno;
    shm_unlink(name_.c_str());
    throw Error(cat("plait: rank ", rank, ": mmap of ", name_, " failed: ", std::strerror(e)));
  }
  own_ = {p, segBytes_};
  auto* h = new (p) ShmSegHeader();
  h->rank = rank;
  h->nranks = nranks;
  h->pid = int32_t(getpid());
  h->ringBytes = ringBytes_;
  h->bell.store(0);
  h->waiters.store(0);
  h->pollers.store(0);
  std::snprintf(h->bellName, sizeof(h->bellName), "plait-bell%s", name_.c_str());
  bellFd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  socklen_t len;
  sockaddr_un a = bellAddr(h->bellName, &len);
  if (bellFd_ >= 0 && bind(bellFd_, reinterpret_cast<sockaddr*>(&a), len) != 0) {
    close(bellFd_);
    bellFd_ = -1;  // no socket doorbell: pollers fall back to short timeouts
  }
  h->abortBy.store(0);
  h->abortClaim.store(0);
  h->abortMsg[0] = '\0';
  for (int i = 0; i < nranks; ++i) new (ringAt(p, i, ringBytes_)) RingHdr();
  std::atomic_thread_fence(std::memory_order_seq_cst);
  h->magic = kMagic;
  peers_.assign(nranks, nullptr);
  peerMaps_.assign(nranks, Mapping{});
}

ShmDomain::~ShmDomain() {
  unlinkOwn();
  if (bellFd_ >= 0) close(bellFd_);
  for (auto& m : peerMaps_)
    if (m.base) munmap(m.base, m.bytes);
  if (own_.base) munmap(own_.base, own_.bytes);
}

void ShmDomain::attach(int peer, const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  PLAIT_CHECK(fd >= 0, "plait: rank ", rank_, ": cannot open shared memory ", name, " of peer rank ", peer, ": ",
              std::strerror(errno));
  struct stat st;
  fstat(fd, &st);
  PLAIT_CHECK(size_t(st.st_size) == segBytes_, "plait: rank ", rank_, ": shared memory of peer rank ", peer,
              " has ", st.st_size, " bytes, expected ", segBytes_, " (PLAIT_SHM_RING_BYTES differs between ranks?)");
  void* p = mmap(nullptr, segBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  PLAIT_CHECK(p != MAP_FAILED, "plait: rank ", rank_, ": mmap of peer rank ", peer, "'s segment failed");
  auto* h = header(p);
  PLAIT_CHECK(h->magic == kMagic && h->rank == peer, "plait: rank ", rank_, ": segment ", name,
              " is not peer rank ", peer, "'s");
  peerMaps_[peer] = {p, segBytes_};
  peers_[peer] = h;
}

void ShmDomain::unlinkOwn() {
  if (!unlinked_ && own_.base) {
    shm_unlink(name_.c_str());
    unlinked_ = true;
  }
}

uint32_t ShmDomain::announce() {
  auto* h = header(own_.base);
  uint32_t t = h->bell.load(std::memory_order_seq_cst);
  h->waiters.fetch_add(1, std::memory_order_seq_cst);
  return t;
}

void ShmDomain::sleep(uint32_t ticket, int64_t micros) {
  auto* h = header(own_.base);
  timespec ts{time_t(micros / 1000000), long((micros % 1000000) * 1000)};
  futex(&h->bell, FUTEX_WAIT, ticket, &ts);
  h->waiters.fetch_sub(1, std::memory_order_seq_cst);
}

void ShmDomain::retract() { header(own_.base)->waiters.fetch_sub(1, std::memory_order_seq_cst); }

void ShmDomain::announcePoll() { header(own_.base)->pollers.fetch_add(1, std::memory_order_seq_cst); }

void ShmDomain::retractPoll() {
  header(own_.base)->pollers.fetch_sub(1, std::memory_order_seq_cst);
  char buf[64];
  if (bellFd_ >= 0)
    while (recv(bellFd_, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
    }
}

void ShmDomain::poke() {
  auto* h = header(own_.base);
  if (h->pollers.load(std::memory_order_seq_cst) != 0) sendBell(h);
  h->bell.fetch_add(1, std::memory_order_seq_cst);
  futex(&h->bell, FUTEX_WAKE, INT_MAX, nullptr);
}

void ShmDomain::abortPeers(const std::string& why) {
  for (auto* h : peers_) {
    if (!h) continue;
    int32_t expected = 0;
    if (h->abortClaim.compare_exchange_strong(expected, rank_ + 1)) {
      size_t n = std::min(why.size(), sizeof(h->abortMsg) - 1);
      std::memcpy(h->abortMsg, why.data(), n);
      h->abortMsg[n] = '\0';
      h->abortBy.store(rank_ + 1, std::memory_order_release);
    }
    ringBell(h);
  }
}

int ShmDomain::abortedBy(std::string* why) const {
  auto* h = header(own_.base);
  int by = h->abortBy.load(std::memory_order_acquire) - 1;
  if (by >= 0 && why) *why = std::string(h->abortMsg, strnlen(h->abortMsg, sizeof(h->abortMsg)));
  return by;
}

class ShmChannel : public Channel {
 public:
  ShmChannel(ShmSegHeader* peerHdr, RingHdr* out, RingHdr* in, size_t cap)
      : peerHdr_(peerHdr), out_(out), in_(in), cap_(cap) {}
  TransportKind kind() const override { return TransportKind::kShm; }

  size_t write(const void* src, size_t n) override {
    uint64_t tail = out_->tail.load(std::memory_order_relaxed);
    // The reader's position is re-read only when the cached one leaves too little room: one shared line less
    // per message on the busy path.
    size_t space = cap_ - size_t(tail - headCache_);
    if (space < n) {
      headCache_ = out_->head.load(std::memory_order_acquire);
      space = cap_ - size_t(tail - headCache_);
    }
    if (n > space) n = space;
    if (n == 0) return 0;
    size_t pos = size_t(tail % cap_), first = std::min(n, cap_ - pos);
    char* data = ringData(out_);
    std::memcpy(data + pos, src, first);
    if (n > first) std::memcpy(data, static_cast<const char*>(src) + first, n - first);
    out_->tail.store(tail + n, std::memory_order_release);
    ringBell(peerHdr_);
    return n;
  }

  size_t peek(const void** p) override {
    uint64_t head = in_->head.load(std::memory_order_relaxed);
    uint64_t tail = in_->tail.load(std::memory_order_acquire);
    size_t avail = size_t(tail - head);
    if (avail == 0) return 0;
    size_t pos = size_t(head % cap_);
    *p = ringData(in_) + pos;
    return std::min(avail, cap_ - pos);
  }

  void consume(size_t n) override {
    in_->head.store(in_->head.load(std::memory_order_relaxed) + n, std::memory_order_release);
    ringBell(peerHdr_);
  }

  size_t read(void* dst, size_t n) override {
    uint64_t head = in_->head.load(std::memory_order_relaxed);
    uint64_t tail = in_->tail.load(std::memory_order_acquire);
    n = std::min(n, size_t(tail - head));
    if (n == 0) return 0;
    size_t pos = size_t(head % cap_), first = std::min(n, cap_ - pos);
    const char* data = ringData(in_);
    std::memcpy(dst, data + pos, first);
    if (n > first) std::memcpy(static_cast<char*>(dst) + first, data, n - first);
    consume(n);
    return n;
  }

  size_t available() override {
    return size_t(in_->tail.load(std::memory_order_acquire) - in_->head.load(std::memory_order_relaxed));
  }

 private:
  ShmSegHeader* peerHdr_;
  RingHdr* out_;
  RingHdr* in_;
  size_t cap_;
  uint64_t headCache_ = 0;
};

std::unique_ptr<Channel> ShmDomain::channel(int peer) {
  PLAIT_CHECK(peers_[peer] != nullptr, "plait: rank ", rank_, ": no shared memory mapped for peer rank ", peer);
  return std::make_unique<ShmChannel>(peers_[peer], ringAt(peers_[peer], rank_, ringBytes_),
                                      ringAt(own_.base, peer, ringBytes_), ringBytes_);
}

}  // namespace plait
