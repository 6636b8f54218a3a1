// Fuzz target: the TCP control connection (tcp.h controlFd), which carries a failing rank's last words: the reader is
// Comm::heardFromTcpPeers (comm.cc), called when a rank fails first-hand.
//
// A fresh pair of real plait::Comm (ranks 0 and 1, TCP) per input; rank 1 is hijacked: the fuzzer's bytes go onto
// its control connection (then, by the first input byte, the connection is half-closed or left open), its data
// stream is half-closed, and rank 0 runs a receive from rank 1, which fails ("connection closed") and reads the
// control connection for the cause. Oracle: rank 0 raises plait::Error within its timeout; nothing crashes or
// reads out of bounds.
//
// Input: [flags][bytes on the control connection...]
#include <sys/socket.h>

#include <atomic>
#include <thread>

#include "harness.h"

using namespace std::chrono;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quietEnv();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in{data, size};
  const uint8_t flags = in.u8();
  const std::string bytes = in.rest();
  std::unique_ptr<fuzz::CommPair> pair;
  try {
    pair = std::make_unique<fuzz::CommPair>(milliseconds(5000));
  } catch (const std::exception& e) {
    fuzz::die(std::string("cannot build the comm pair: ") + e.what());
  }
  plait::Comm& c0 = *pair->c[0];
  c0.setTimeout(milliseconds(500));
  fuzz::sendAll(pair->controlFd(), bytes.data(), bytes.size());
  if (flags & 1) shutdown(pair->controlFd(), SHUT_WR);
  for (int s = 0; s < pair->streams(); ++s) shutdown(pair->dataFd(s), SHUT_WR);
  auto t0 = steady_clock::now();
  std::string err;
  std::atomic<int> left{1};
  char buf[64];
  try {
    c0.irecv(buf, sizeof(buf), 1, 7, [&](const std::string* e) {
      if (e) err = *e;
      left--;
    });
    while (left.load() > 0 && steady_clock::now() - t0 < seconds(5)) c0.progressP2P(microseconds(20000));
  } catch (const plait::Error& e) {
    err = e.what();
  } catch (const std::exception& e) {
    fuzz::die(std::string("rank 0 raised something other than plait::Error: ") + e.what());
  }
  auto took = duration_cast<milliseconds>(steady_clock::now() - t0).count();
  if (left.load() > 0) fuzz::die("rank 0's receive never completed");
  if (err.empty()) fuzz::die("rank 0's receive from a closed stream succeeded");
  if (took > 3000) fuzz::die("rank 0 took " + std::to_string(took) + " ms to fail (timeout 500 ms)");
  return 0;
}
