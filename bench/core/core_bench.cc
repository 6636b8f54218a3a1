// Torch-free benchmark of the plait core: forks N ranks that rendezvous through a directory of files and time
// all-reduce of float32 buffers with a forced algorithm. For tuning transports and schedules without the
// Python/dispatcher layers in the way.
//
//   build/core_bench [nranks=2] [algo=auto|ring|tree|direct] [sizes=4,1M,16M] [iters=20]
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "plait/algo/collectives.h"

namespace {

class DirStore : public plait::Store {
 public:
  explicit DirStore(std::string dir) : dir_(std::move(dir)) {}
  void set(const std::string& k, const std::string& v) override {
    std::string p = path(k), tmp = p + ".tmp" + std::to_string(getpid());
    std::ofstream(tmp, std::ios::binary) << v;
    std::rename(tmp.c_str(), p.c_str());
  }
  std::string get(const std::string& k) override {
    for (;;) {
      std::ifstream f(path(k), std::ios::binary);
      if (f) {
        std::stringstream ss;
        ss << f.rdbuf();
        return ss.str();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  bool check(const std::string& k) override { return access(path(k).c_str(), F_OK) == 0; }
  int64_t add(const std::string& k, int64_t d) override {
    // Only used once per rank at start-up; a lock file serializes it.
    std::string lock = path(k) + ".lock";
    while (mkdir(lock.c_str(), 0700) != 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    int64_t v = 0;
    std::ifstream(path(k)) >> v;
    v += d;
    std::ofstream(path(k)) << v;
    rmdir(lock.c_str());
    return v;
  }

 private:
  std::string path(const std::string& k) const {
    std::string s = k;
    std::replace(s.begin(), s.end(), '/', '_');
    return dir_ + "/" + s;
  }
  std::string dir_;
};

size_t parseSize(const std::string& s) {
  double x = std::atof(s.c_str());
  char c = s.back();
  return size_t(x * (c == 'K' ? 1024.0 : c == 'M' ? 1048576.0 : c == 'G' ? 1073741824.0 : 1.0));
}

}  // namespace

int main(int argc, char** argv) {
  int n = argc > 1 ? std::atoi(argv[1]) : 2;
  std::string algo = argc > 2 ? argv[2] : "auto";
  std::string sizesArg = argc > 3 ? argv[3] : "4,1M,16M";
  int iters = argc > 4 ? std::atoi(argv[4]) : 20;
  std::vector<size_t> sizes;
  std::stringstream ss(sizesArg);
  for (std::string tok; std::getline(ss, tok, ',');) sizes.push_back(parseSize(tok));
  char tmpl[] = "/tmp/plait-core-bench-XXXXXX";
  std::string dir = mkdtemp(tmpl);
  for (int r = 0; r < n; ++r) {
    if (fork() != 0) continue;
    auto store = std::make_shared<DirStore>(dir);
    plait::Options o;
    o.algo = algo;
    plait::Comm comm(store, r, n, std::chrono::seconds(60), o);
    for (size_t bytes : sizes) {
      size_t count = std::max<size_t>(1, bytes / 4);
      std::vector<float> buf(count, 1.0f);
      int it = bytes <= 65536 ? iters * 50 : bytes <= (4u << 20) ? iters * 5 : iters;
      std::vector<double> ts;
      for (int i = 0; i < it + 3; ++i) {
        std::fill(buf.begin(), buf.begin() + std::min<size_t>(count, 16), 1.0f);
        if (!std::getenv("NOBARRIER")) plait::coll::barrier(comm);
        auto t0 = std::chrono::steady_clock::now();
        plait::coll::allreduce(comm, buf.data(), count, plait::DType::kFloat32, plait::RedOp::kSum);
        if (i >= 3) ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      if (buf[0] != float(n)) std::fprintf(stderr, "rank %d: wrong result %f\n", r, buf[0]);
      std::sort(ts.begin(), ts.end());
      double med = ts[ts.size() / 2];
      if (r == 0)
        std::printf("%-6s n=%d %10zu B  %10.1f us  busbw %6.2f GB/s\n", algo.c_str(), n, bytes, med * 1e6,
                    bytes / med / 1e9 * 2.0 * (n - 1) / n);
    }
    std::fflush(stdout);
    _exit(0);
  }
  int status = 0, bad = 0;
  for (int r = 0; r < n; ++r) {
    wait(&status);
    bad |= !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::string rm = "rm -rf " + dir;
  (void)!std::system(rm.c_str());
  return bad;
}
