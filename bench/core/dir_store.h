// A plait::Store over a directory of files, for the torch-free programs that fork their ranks (bench/core/core_bench.cc,
// tests/core/core_test.cc): every key is a file, written to a temporary name and renamed so that readers never see
// half a value. get() waits for the key up to the store's timeout, then throws (a rank that died before publishing
// its key must not leave the others waiting forever).
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "plait/common.h"
#include "plait/store.h"

namespace plait_tools {

class DirStore : public plait::Store {
 public:
  explicit DirStore(std::string dir, std::chrono::milliseconds timeout = std::chrono::minutes(5))
      : dir_(std::move(dir)), timeout_(timeout) {}
  void set(const std::string& k, const std::string& v) override {
    std::string p = path(k), tmp = p + ".tmp" + std::to_string(getpid());
    std::ofstream(tmp, std::ios::binary) << v;
    std::rename(tmp.c_str(), p.c_str());
  }
  std::string get(const std::string& k) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      std::ifstream f(path(k), std::ios::binary);
      if (f) {
        std::stringstream ss;
        ss << f.rdbuf();
        return ss.str();
      }
      if (std::chrono::steady_clock::now() >= deadline)
        throw plait::Error(plait::cat("DirStore: key '", k, "' not set within ", timeout_.count(), " ms (", dir_, ")"));
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  bool check(const std::string& k) override { return access(path(k).c_str(), F_OK) == 0; }
  int64_t add(const std::string& k, int64_t d) override {
    // A lock directory serializes the read-modify-write (used a few times per rank at start-up).
    std::string lock = path(k) + ".lock";
    while (mkdir(lock.c_str(), 0700) != 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    int64_t v = 0;
    std::ifstream(path(k)) >> v;
    v += d;
    {
      std::string p = path(k), tmp = p + ".tmp" + std::to_string(getpid());
      std::ofstream(tmp) << v;
      std::rename(tmp.c_str(), p.c_str());
    }
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
  std::chrono::milliseconds timeout_;
};

}  // namespace plait_tools
