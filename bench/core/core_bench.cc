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

#include "bench/core/dir_store.h"
#include "plait/algo/collectives.h"

namespace {

using plait_tools::DirStore;

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
