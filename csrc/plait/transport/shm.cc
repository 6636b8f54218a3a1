#include "plait/transport/shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>
#include <new>
#include <vector>

#include <pthread.h>

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
  int32_t livenessLock;                      // 1: the owner holds its liveness lock (lockGone works)
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
// name: a segment's bellName (cap bytes; a peer's segment may hold anything, so never read past it).
sockaddr_un bellAddr(const char* name, size_t cap, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  size_t n = strnlen(name, std::min(cap, sizeof(a.sun_path) - 2));
  std::memcpy(a.sun_path + 1, name, n);  // abstract namespace: leading NUL, nothing on the file system
  *len = socklen_t(offsetof(sockaddr_un, sun_path) + 1 + n);
  return a;
}

void sendBell(ShmSegHeader* h) {
  static int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return;
  socklen_t len;
  sockaddr_un a = bellAddr(h->bellName, sizeof(h->bellName), &len);
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

void reserveShm(int fd, size_t bytes, const std::string& name, const std::string& what) {
  int e = ftruncate(fd, off_t(bytes)) == 0 ? 0 : errno;
  if (e == 0) e = posix_fallocate(fd, 0, off_t(bytes));
  if (e == EOPNOTSUPP || e == EINVAL) e = 0;  // a file system without fallocate: ftruncate is all there is
  if (e != 0) {
    struct statvfs sv{};
    std::string room;
    if (statvfs("/dev/shm", &sv) == 0)
      room = cat(" (/dev/shm: ", (uint64_t(sv.f_bavail) * sv.f_frsize) >> 20, " MiB free of ",
                 (uint64_t(sv.f_blocks) * sv.f_frsize) >> 20, " MiB)");
    throw Error(cat(what, ": cannot reserve ", bytes, " bytes of shared memory for ", name, " in /dev/shm: ",
                    std::strerror(e), room,
                    "; make /dev/shm larger (docker run --shm-size=1g) or use smaller rings (PLAIT_SHM_RING_BYTES)"));
  }
}

namespace {
// Descriptors holding a liveness lock. A child made by fork (DataLoader workers) inherits them, and with them the
// lock: the rank could die while its children keep it "alive". The child closes its copies at once; the lock stays
// with the parent's descriptor.
std::mutex gLiveMu;
std::vector<int>& liveFds() {
  static auto* v = new std::vector<int>();
  return *v;
}
void liveForkPrepare() { gLiveMu.lock(); }
void liveForkParent() { gLiveMu.unlock(); }
void liveForkChild() {
  for (int fd : liveFds()) close(fd);
  liveFds().clear();
  gLiveMu.unlock();
}
}  // namespace

bool holdLiveness(int fd) {
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) return false;
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(liveForkPrepare, liveForkParent, liveForkChild); });
  std::lock_guard<std::mutex> lk(gLiveMu);
  liveFds().push_back(fd);
  return true;
}

void closeLiveness(int fd) {
  if (fd < 0) return;
  {
    std::lock_guard<std::mutex> lk(gLiveMu);
    auto& v = liveFds();
    v.erase(std::remove(v.begin(), v.end(), fd), v.end());
  }
  close(fd);
}

bool lockGone(int fd) {
  struct flock fl{};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return false;  // cannot tell: assume alive
  return fl.l_type == F_UNLCK;
}

ShmDomain::ShmDomain(const std::string& name, int rank, const std::vector<int>& local, size_t ringBytes)
    : name_(name), rank_(rank), nranks_(int(local.size())), local_(local),
      ringBytes_((std::max<size_t>(ringBytes, 64) + 63) & ~size_t(63)) {
  segBytes_ = kHdrBytes + size_t(nranks_) * (kRingHdrBytes + ringBytes_);
  const std::string who = cat("plait: rank ", rank);
  int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  PLAIT_CHECK(fd >= 0, who, ": shm_open(", name_, ") failed: ", std::strerror(errno));
  try {
    reserveShm(fd, segBytes_, name_, cat(who, " (", nranks_, " rings of ", ringBytes_, " B)"));
  } catch (...) {
    close(fd);
    shm_unlink(name_.c_str());
    throw;
  }
  void* p = mmap(nullptr, segBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    shm_unlink(name_.c_str());
    throw Error(cat(who, ": mmap of ", name_, " failed: ", std::strerror(e)));
  }
  ownFd_ = fd;  // kept open: it holds the liveness lock
  own_ = {p, segBytes_};
  auto* h = new (p) ShmSegHeader();
  h->rank = rank;
  h->nranks = nranks_;
  h->pid = int32_t(getpid());
  h->livenessLock = holdLiveness(fd) ? 1 : 0;
  h->ringBytes = ringBytes_;
  h->bell.store(0);
  h->waiters.store(0);
  h->pollers.store(0);
  std::snprintf(h->bellName, sizeof(h->bellName), "plait-bell%s", name_.c_str());
  bellFd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  socklen_t len;
  sockaddr_un a = bellAddr(h->bellName, sizeof(h->bellName), &len);
  if (bellFd_ >= 0 && bind(bellFd_, reinterpret_cast<sockaddr*>(&a), len) != 0) {
    close(bellFd_);
    bellFd_ = -1;  // no socket doorbell: pollers fall back to short timeouts
  }
  h->abortBy.store(0);
  h->abortClaim.store(0);
  h->abortMsg[0] = '\0';
  for (int i = 0; i < nranks_; ++i) new (ringAt(p, i, ringBytes_)) RingHdr();
  std::atomic_thread_fence(std::memory_order_seq_cst);
  h->magic = kMagic;
  const int maxRank = local_.empty() ? 0 : *std::max_element(local_.begin(), local_.end());
  peers_.assign(size_t(maxRank) + 1, nullptr);
  peerMaps_.assign(size_t(maxRank) + 1, Mapping{});
  peerFds_.assign(size_t(maxRank) + 1, -1);
}

ShmDomain::~ShmDomain() {
  unlinkOwn();
  if (bellFd_ >= 0) close(bellFd_);
  for (auto& m : peerMaps_)
    if (m.base) munmap(m.base, m.bytes);
  for (int fd : peerFds_)
    if (fd >= 0) close(fd);
  if (own_.base) munmap(own_.base, own_.bytes);
  closeLiveness(ownFd_);  // releases the liveness lock
}

int ShmDomain::slot(int r) const {
  auto it = std::find(local_.begin(), local_.end(), r);
  PLAIT_CHECK(it != local_.end(), "plait: internal: rank ", r, " is not a local peer of rank ", rank_);
  return int(it - local_.begin());
}

void ShmDomain::attach(int peer, const std::string& name) {
  slot(peer);
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  PLAIT_CHECK(fd >= 0, "plait: rank ", rank_, ": cannot open shared memory ", name, " of peer rank ", peer, ": ",
              std::strerror(errno));
  struct stat st;
  fstat(fd, &st);
  if (size_t(st.st_size) != segBytes_) {
    close(fd);
    throw Error(cat("plait: rank ", rank_, ": shared memory of peer rank ", peer, " has ", st.st_size,
                    " bytes, expected ", segBytes_, " (PLAIT_SHM_RING_BYTES differs between ranks?)"));
  }
  void* p = mmap(nullptr, segBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    close(fd);
    throw Error(cat("plait: rank ", rank_, ": mmap of peer rank ", peer, "'s segment failed"));
  }
  auto* h = header(p);
  if (!(h->magic == kMagic && h->rank == peer)) {
    munmap(p, segBytes_);
    close(fd);
    throw Error(cat("plait: rank ", rank_, ": segment ", name, " is not peer rank ", peer, "'s"));
  }
  peerMaps_[peer] = {p, segBytes_};
  peerFds_[peer] = fd;  // kept: it tells whether the peer still holds its liveness lock
  peers_[peer] = h;
}

bool ShmDomain::peerGone(int peer) const {
  const ShmSegHeader* h = peers_[peer];
  if (!h) return false;
  if (h->livenessLock) return lockGone(peerFds_[peer]);
  // No OFD locks on this kernel: the process id, valid only within one PID namespace.
  const int pid = h->pid;
  return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
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
  ShmChannel(ShmSegHeader* peerHdr, RingHdr* out, RingHdr* in, size_t cap, int rank, int peer)
      : peerHdr_(peerHdr), out_(out), in_(in), cap_(cap), rank_(rank), peer_(peer) {}
  TransportKind kind() const override { return TransportKind::kShm; }

  size_t write(const void* src, size_t n) override {
    uint64_t tail = out_->tail.load(std::memory_order_relaxed);
    // The reader's position is re-read only when the cached one leaves too little room: one shared line less
    // per message on the busy path.
    size_t space = cap_ - std::min(cap_, size_t(tail - headCache_));
    if (space < n) {
      headCache_ = out_->head.load(std::memory_order_acquire);
      // The reader's index lives in memory the peer writes: never trust it past the ring's bounds.
      if (headCache_ > tail || tail - headCache_ > cap_) corrupt("read", headCache_, tail);
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
    size_t avail = checkedAvail(head, tail);
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
    n = std::min(n, checkedAvail(head, tail));
    if (n == 0) return 0;
    size_t pos = size_t(head % cap_), first = std::min(n, cap_ - pos);
    const char* data = ringData(in_);
    std::memcpy(dst, data + pos, first);
    if (n > first) std::memcpy(static_cast<char*>(dst) + first, data, n - first);
    consume(n);
    return n;
  }

  size_t available() override {
    uint64_t head = in_->head.load(std::memory_order_relaxed);
    return checkedAvail(head, in_->tail.load(std::memory_order_acquire));
  }

 private:
  // The writer's index lives in memory the peer writes: bytes beyond the ring's capacity would be read out of
  // bounds, so a tail outside [head, head + cap] is a corrupt ring, not data.
  size_t checkedAvail(uint64_t head, uint64_t tail) const {
    if (tail < head || tail - head > cap_) corrupt("write", head, tail);
    return size_t(tail - head);
  }
  [[noreturn]] void corrupt(const char* side, uint64_t head, uint64_t tail) const {
    throw Error(cat("plait: rank ", rank_, ": the shared-memory ring with peer rank ", peer_, " is corrupt (", side,
                    " index out of bounds: head ", head, ", tail ", tail, ", capacity ", cap_, ")"));
  }
  ShmSegHeader* peerHdr_;
  RingHdr* out_;
  RingHdr* in_;
  size_t cap_;
  int rank_, peer_;
  uint64_t headCache_ = 0;
};

std::unique_ptr<Channel> ShmDomain::channel(int peer) {
  PLAIT_CHECK(peers_[peer] != nullptr, "plait: rank ", rank_, ": no shared memory mapped for peer rank ", peer);
  return std::make_unique<ShmChannel>(peers_[peer], ringAt(peers_[peer], slot(rank_), ringBytes_),
                                      ringAt(own_.base, slot(peer), ringBytes_), ringBytes_, rank_, peer);
}

}  // namespace plait
