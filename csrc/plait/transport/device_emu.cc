// The emulated device (PLAIT_DEVICE=emulate): device memory is host shared memory (a memfd each peer opens through
// /proc/<pid>/fd), and each stream operation runs at once on the calling thread. See transport/device.h.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "plait/kernels/reduce.h"
#include "plait/transport/device.h"

namespace plait {

namespace {

class EmulatedDeviceOps : public DeviceOps {
 public:
  explicit EmulatedDeviceOps(std::chrono::milliseconds timeout) : timeout_(timeout) {}
  ~EmulatedDeviceOps() override {
    for (auto& [p, m] : maps_) {
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
    return p;
  }
  void release(void* p) override { unmap(p); }
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
  void closeImported(void* p) override { unmap(p); }
  void* allocHost(size_t bytes) override {
    void* p = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
    PLAIT_CHECK(p, "plait: emulated device: cannot allocate ", bytes, " B of host staging memory");
    return p;
  }
  void releaseHost(void* p) override { std::free(p); }
  void* mapHost(void* p, size_t) override { return p; }
  void unmapHost(void*) override {}

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
  void reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t count) override {
    plait::reduce(op, dt, dst, a, b, count);
  }
  void pull(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
            uint32_t* err, uint32_t errCode) override {
    const volatile PullDesc* d = desc;
    uint64_t off = d->offset, len = d->bytes;
    std::atomic_thread_fence(std::memory_order_acquire);
    if (len != bytes) {
      if (*err == 0) *err = errCode;
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
  void synchronize() override {}

 private:
  struct Map {
    size_t bytes;
    int fd;
  };
  void unmap(void* p) {
    auto it = maps_.find(p);
    if (it == maps_.end()) return;
    munmap(p, it->second.bytes);
    if (it->second.fd >= 0) close(it->second.fd);
    maps_.erase(it);
  }
  std::chrono::milliseconds timeout_;
  std::map<void*, Map> maps_;
};

}  // namespace

std::unique_ptr<DeviceOps> makeEmulatedDeviceOps(std::chrono::milliseconds timeout) {
  return std::make_unique<EmulatedDeviceOps>(timeout);
}

}  // namespace plait
