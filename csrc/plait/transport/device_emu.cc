// The emulated device (PLAIT_DEVICE=emulate): device memory is host shared memory (a memfd each peer opens through
// /proc/<pid>/fd), and each stream operation runs at once on the calling thread. See transport/device.h.
// With a modelled link (PLAIT_EMU_PCIE_GBPS > 0) the host path's downloads and uploads run on two copy-engine threads
// instead, each copy taking at least bytes / rate, so that the host path's pipelining can be measured without a GPU.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "plait/kernels/reduce.h"
#include "plait/transport/device.h"

namespace plait {

namespace {

// One emulated copy engine: a thread that runs copies in the order they were queued, each taking at least
// bytes / rate (it sleeps off the rest: a copy engine does not use the host's cores).
class CopyEngine {
 public:
  explicit CopyEngine(double bytesPerUs) : bytesPerUs_(bytesPerUs), th_([this] { loop(); }) {}
  ~CopyEngine() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    th_.join();
  }
  uint64_t push(void* dst, const void* src, size_t bytes) {
    std::lock_guard<std::mutex> g(m_);
    q_.push_back(Job{dst, src, bytes});
    cv_.notify_all();
    return ++queued_;
  }
  // Waits until job `ticket` (1-based, in queue order) has finished; `poll` runs every few milliseconds.
  void wait(uint64_t ticket, std::chrono::milliseconds timeout, const std::function<void()>& poll) {
    const auto deadline = Clock::now() + timeout;
    std::unique_lock<std::mutex> l(m_);
    while (done_ < ticket) {
      cv_.wait_for(l, std::chrono::milliseconds(2));
      if (done_ >= ticket) break;
      if (poll) {
        l.unlock();
        poll();
        l.lock();
      }
      if (Clock::now() >= deadline)
        throw Error(cat("plait: emulated device: a host-path copy (", ticket - done_, " still queued) did not finish "
                        "within ", timeout.count(), " ms"));
    }
  }
  uint64_t queued() {
    std::lock_guard<std::mutex> g(m_);
    return queued_;
  }
  // Drops the copies not yet started (counted as done, so no wait hangs on them) and waits for the running one.
  void cancel() noexcept {
    std::unique_lock<std::mutex> l(m_);
    if (!q_.empty()) {
      const size_t drop = q_.size() - (running_ ? 1 : 0);
      q_.erase(q_.end() - std::ptrdiff_t(drop), q_.end());
      done_ += drop;
    }
    ++cancels_;  // cuts the running copy's modelled time short (its bytes have moved)
    cv_.notify_all();
    cv_.wait(l, [&] { return !running_; });
  }

 private:
  struct Job {
    void* dst;
    const void* src;
    size_t bytes;
  };
  void loop() {
    std::unique_lock<std::mutex> l(m_);
    for (;;) {
      cv_.wait(l, [&] { return stop_ || !q_.empty(); });
      if (q_.empty()) return;
      Job j = q_.front();
      running_ = true;
      const uint64_t cancels = cancels_;
      l.unlock();
      const auto start = Clock::now();
      if (j.bytes && j.dst != j.src) std::memmove(j.dst, j.src, j.bytes);
      l.lock();
      cv_.wait_until(l, start + std::chrono::microseconds(int64_t(double(j.bytes) / bytesPerUs_)),
                     [&] { return stop_ || cancels_ != cancels; });
      running_ = false;
      q_.pop_front();
      ++done_;
      cv_.notify_all();
    }
  }
  double bytesPerUs_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Job> q_;
  uint64_t queued_ = 0, done_ = 0, cancels_ = 0;
  bool stop_ = false, running_ = false;
  std::thread th_;
};

class EmulatedDeviceOps : public DeviceOps {
 public:
  EmulatedDeviceOps(std::chrono::milliseconds timeout, double pcieGBps, DeviceOps* pinWith)
      : timeout_(timeout), pinWith_(pinWith) {
    if (pcieGBps > 0) {
      down_ = std::make_unique<CopyEngine>(pcieGBps * 1e3);
      up_ = std::make_unique<CopyEngine>(pcieGBps * 1e3);
    }
  }
  ~EmulatedDeviceOps() override {
    abandon(false);  // the memory the queued copies would touch may be gone
    down_.reset();
    up_.reset();
    for (auto& [p, m] : maps_) {
      if (pinWith_ && m.fd >= 0) pinWith_->unpin(p);
      munmap(p, m.bytes);
      if (m.fd >= 0) close(m.fd);
    }
  }
  const char* name() const override { return "emulated"; }
  void bind(int, void*) override {}

  void* alloc(size_t bytes) override {
    bytes = std::max<size_t>(bytes, 1);
    int fd = memfd_create("plait-emulated-device", MFD_CLOEXEC);
    PLAIT_CHECK(fd >= 0, "plait: emulated device: memfd_create failed: ", std::strerror(errno));
    if (ftruncate(fd, off_t(bytes)) != 0) {
      int e = errno;
      close(fd);
      throw Error(cat("plait: emulated device: cannot size ", bytes, " B of memory: ", std::strerror(e)));
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      close(fd);
      throw Error(cat("plait: emulated device: mmap of ", bytes, " B failed: ", std::strerror(e)));
    }
    maps_[p] = Map{bytes, fd};
    if (pinWith_) {
      try {
        pinWith_->pin(p, bytes);
      } catch (...) {
        unmap(p, false);
        throw;
      }
    }
    return p;
  }
  void release(void* p) override { unmap(p, true); }
  std::string exportMem(void* p) override {
    auto it = maps_.find(p);
    PLAIT_CHECK(it != maps_.end() && it->second.fd >= 0, "plait: emulated device: export of unknown memory");
    return cat(getpid(), ":", it->second.fd, ":", it->second.bytes);
  }
  void* importMem(const std::string& h) override {
    long pid = 0, fd = 0;
    unsigned long long bytes = 0;
    PLAIT_CHECK(std::sscanf(h.c_str(), "%ld:%ld:%llu", &pid, &fd, &bytes) == 3,
                "plait: emulated device: malformed memory handle '", h, "'");
    std::string path = cat("/proc/", pid, "/fd/", fd);
    int f = open(path.c_str(), O_RDWR | O_CLOEXEC);
    PLAIT_CHECK(f >= 0, "plait: emulated device: cannot open a peer's memory at ", path, ": ", std::strerror(errno));
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
    close(f);
    PLAIT_CHECK(p != MAP_FAILED, "plait: emulated device: cannot map a peer's memory (", bytes, " B)");
    maps_[p] = Map{size_t(bytes), -1};
    return p;
  }
  void closeImported(void* p) override { unmap(p, false); }
  void* allocHost(size_t bytes) override {
    void* p = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
    PLAIT_CHECK(p, "plait: emulated device: cannot allocate ", bytes, " B of host staging memory");
    return p;
  }
  void releaseHost(void* p) override { std::free(p); }
  void* mapHost(void* p, size_t) override { return p; }
  void unmapHost(void*) override {}

  void copy(void* dst, const void* src, size_t bytes) override {
    drain();  // stream order: after the host path's copies queued so far
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
  // The host path's copies: on the copy-engine threads with a modelled link, else at once (the defaults).
  void fence() override {
    if (up_) up_->wait(up_->queued(), timeout_, poll_);
  }
  void fork() override { fence(); }
  uint64_t download(void* dst, const void* src, size_t bytes) override {
    if (!down_) return DeviceOps::download(dst, src, bytes);
    return down_->push(dst, src, bytes);
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (!up_) return DeviceOps::upload(dst, src, bytes);
    up_->push(dst, src, bytes);
  }
  void waitDownload(uint64_t ticket) override {
    if (down_) down_->wait(ticket, timeout_, poll_);
  }
  void waitUploads() override { fence(); }
  void waitIdle() override { drain(); }
  void abandon(bool) noexcept override {
    if (down_) down_->cancel();
    if (up_) up_->cancel();
  }
  void setWaitTimeout(std::chrono::milliseconds t) override { timeout_ = t; }
  // The emulated bound stream is the calling thread: it waits for the copies here.
  void join() override { drain(); }
  void reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t count) override {
    plait::reduce(op, dt, dst, a, b, count);
  }
  void pull(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
            PullKey key, uint32_t* err, uint32_t errCode) override {
    const volatile PullDesc* d = desc;
    uint64_t off = d->offset, len = d->bytes;
    const uint32_t gotSeq = d->key.seq, gotWord = d->key.word;
    std::atomic_thread_fence(std::memory_order_acquire);
    if (len != bytes || gotSeq != key.seq || gotWord != key.word) {
      volatile uint32_t* e = err;
      if (*e == 0) {  // as the CUDA kernel: the record, then the code
        e[cuda::kErrGotSeq] = gotSeq;
        e[cuda::kErrGotWord] = gotWord;
        e[cuda::kErrExpSeq] = key.seq;
        e[cuda::kErrExpWord] = key.word;
        e[cuda::kErrGotBytesLo] = uint32_t(len);
        e[cuda::kErrGotBytesHi] = uint32_t(len >> 32);
        e[cuda::kErrExpBytesLo] = uint32_t(bytes);
        e[cuda::kErrExpBytesHi] = uint32_t(uint64_t(bytes) >> 32);
        std::atomic_thread_fence(std::memory_order_release);
        *e = errCode;
      }
      return;
    }
    if (bytes == 0) return;
    if (withReduce) plait::reduce(op, dt, dst, dst, peerBase + off, bytes / dtypeSize(dt));
    else std::memcpy(dst, peerBase + off, bytes);
  }
  void write32(uint32_t* addr, uint32_t v) override {
    reinterpret_cast<std::atomic<uint32_t>*>(addr)->store(v, std::memory_order_release);
  }
  void waitGeq(const uint32_t* addr, uint32_t v, const std::function<std::string()>& what) override {
    auto* a = reinterpret_cast<const std::atomic<uint32_t>*>(addr);
    auto reached = [&] { return int32_t(a->load(std::memory_order_acquire) - v) >= 0; };
    if (reached()) return;
    const auto start = Clock::now(), deadline = start + timeout_;
    for (int i = 0; !reached(); ++i) {
      if (i < 200) {
        sched_yield();
        continue;
      }
      if (poll_ && i % 16 == 0) poll_();
      if (Clock::now() >= deadline)
        throw Error(cat(what(), ": not reached within ", timeout_.count(), " ms (emulated device)"));
      std::this_thread::sleep_for(std::chrono::microseconds(Clock::now() - start < std::chrono::milliseconds(5) ? 20 : 200));
    }
  }
  void synchronize() override { drain(); }

 private:
  void drain() {
    if (down_) down_->wait(down_->queued(), timeout_, poll_);
    if (up_) up_->wait(up_->queued(), timeout_, poll_);
  }
  struct Map {
    size_t bytes;
    int fd;
  };
  void unmap(void* p, bool unpin) {
    auto it = maps_.find(p);
    if (it == maps_.end()) return;
    if (unpin && pinWith_ && it->second.fd >= 0) pinWith_->unpin(p);
    munmap(p, it->second.bytes);
    if (it->second.fd >= 0) close(it->second.fd);
    maps_.erase(it);
  }
  std::chrono::milliseconds timeout_;
  DeviceOps* pinWith_;
  std::map<void*, Map> maps_;
  std::unique_ptr<CopyEngine> down_, up_;
};

}  // namespace

std::unique_ptr<DeviceOps> makeEmulatedDeviceOps(std::chrono::milliseconds timeout, double pcieGBps,
                                                 DeviceOps* pinWith) {
  return std::make_unique<EmulatedDeviceOps>(timeout, pcieGBps, pinWith);
}

}  // namespace plait
