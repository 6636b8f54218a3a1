// Shared vocabulary of the torch-free core: errors, dtypes, reduction ops, deadlines, knobs, logging.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace plait {

// Every failure in the core is a plait::Error whose message says which rank, peer, op and sequence number.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// A failure another rank reported, whose message already names the original cause.
class PeerFailed : public Error {
 public:
  using Error::Error;
};

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

#define PLAIT_CHECK(cond, ...)                                  \
  do {                                                          \
    if (!(cond)) throw ::plait::Error(::plait::cat(__VA_ARGS__)); \
  } while (0)

enum class DType : uint8_t { kFloat32, kFloat64, kFloat16, kBFloat16, kInt8, kUInt8, kInt32, kInt64, kBool, kCount };
enum class RedOp : uint8_t { kSum, kProd, kMin, kMax, kBand, kBor, kBxor, kCount };

size_t dtypeSize(DType t);
const char* dtypeName(DType t);
const char* redOpName(RedOp op);

using Clock = std::chrono::steady_clock;

// A point in time after which a wait gives up and reports what it was waiting for.
struct Deadline {
  Clock::time_point at;
  static Deadline after(std::chrono::milliseconds ms) { return Deadline{Clock::now() + ms}; }
  bool passed() const { return Clock::now() >= at; }
};

// Environment knobs: read once per process (first use), documented in the README's table.
struct Knobs {
  std::string algo;        // PLAIT_ALGO: auto|ring|tree|direct
  std::string transport;   // PLAIT_TRANSPORT: auto|shm|tcp
  int debug;               // PLAIT_DEBUG: 0 = WARN, 1 = INFO, 2 = TRACE
  size_t chunkBytes;       // PLAIT_CHUNK_BYTES: pipelining segment
  size_t shmRingBytes;     // PLAIT_SHM_RING_BYTES: capacity of one directed shared-memory ring
  size_t inlineBytes;      // PLAIT_INLINE_BYTES: synchronous calls up to this size run on the caller's thread (0: none)
  int threads;             // PLAIT_THREADS: reduction threads for large buffers (0 = auto)
  std::string hostId;      // PLAIT_HOST_ID: override host identity
  std::string socketAddr;  // PLAIT_SOCKET_ADDR: address advertised for TCP
  int64_t spinUs;          // PLAIT_SPIN_US: busy-poll this long before yielding (when each local rank has a core)
  int64_t yieldUs;         // PLAIT_YIELD_US: then yield until this long before sleeping
  int tcpStreams;          // PLAIT_TCP_STREAMS: TCP connections per peer pair, data striped over them
  int tcpDeadPeerS;        // PLAIT_TCP_DEAD_PEER_S: a silent TCP peer counts as lost after about this long (0: off)
  bool linkProbe;          // PLAIT_LINK_PROBE: measure the inter-host link's alpha/beta at group creation
  double linkGbps;         // PLAIT_LINK_GBPS: inter-host bandwidth for the cost model (0 = probe / default)
  double linkAlphaUs;      // PLAIT_LINK_ALPHA_US: inter-host one-way latency for the cost model (0 = probe)
  int64_t testDialDelayMs; // PLAIT_TEST_DIAL_DELAY_MS: tests only: wait this long before dialing TCP peers
  std::string device;      // PLAIT_DEVICE: auto (CUDA tensors use CUDA) | emulate (tests: CPU tensors run the device engine)
  size_t deviceBufferBytes;  // PLAIT_DEVICE_BUFFER_BYTES: initial staging buffer per rank for device collectives
  std::string hostPath;    // PLAIT_HOST_PATH: off|auto|force: the host path for device tensors on one host
  double hostShare;        // PLAIT_HOST_SHARE: fixed share of an element-wise collective on the host path (-1: plan)
  size_t hostChunkBytes;   // PLAIT_HOST_CHUNK_BYTES: the host path's pipelining chunk
  double emuPcieGBps;      // PLAIT_EMU_PCIE_GBPS: emulated device only: model the host path's link (0: copies at once)
  std::string kernels;     // PLAIT_KERNELS: auto (AVX2/F16C when the CPU has them) | scalar (force the portable kernels)
  std::string compression;  // PLAIT_COMPRESSION: none|auto|int8|int4|fp8|bf16 (all-reduce on the wire)
  size_t compressionBlock;  // PLAIT_COMPRESSION_BLOCK: values per codec block (0: the codec's default)
  int servers;              // PLAIT_SERVERS: summation servers each group waits for and uses (0: none)
  double serverShare;       // PLAIT_SERVER_SHARE: fixed share of an all-reduce through the servers (-1: plan)
  size_t serverSegBytes;    // PLAIT_SERVER_SEGMENT_BYTES: the servers' pipelining segment
  double serverGbps;        // PLAIT_SERVER_GBPS: the servers' link rate in Gbit/s for the planner (0: measure)
  size_t traceBuffer;       // PLAIT_TRACE_BUFFER: collectives each group's flight recorder keeps (0: off)
  std::string traceDir;     // PLAIT_TRACE_DIR: where flight records are written on a failure ("": not written)
  std::string authKeyFile;  // PLAIT_AUTH_KEY_FILE: a key the operator distributes; TCP secrets are derived from it
};
const Knobs& knobs();

void logInfo(const std::string& msg);
void logWarn(const std::string& msg);
inline bool infoEnabled() { return knobs().debug >= 1; }

}  // namespace plait
