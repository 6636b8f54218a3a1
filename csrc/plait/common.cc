#include "plait/common.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>

namespace plait {

size_t dtypeSize(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt8: return 1;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kBool: return 1;
    default: throw Error(cat("plait: unknown dtype code ", int(t)));
  }
}

const char* dtypeName(DType t) {
  static const char* names[] = {"float32", "float64", "float16", "bfloat16", "int8",
                                "uint8",   "int32",   "int64",   "bool"};
  return t < DType::kCount ? names[int(t)] : "?";
}

const char* redOpName(RedOp op) {
  static const char* names[] = {"sum", "prod", "min", "max", "band", "bor", "bxor"};
  return op < RedOp::kCount ? names[int(op)] : "?";
}

static std::string envStr(const char* name, const char* def) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::string(v) : std::string(def);
}

static size_t envSize(const char* name, size_t def) {
  const char* v = std::getenv(name);
  if (!v || !*v) return def;
  char* end = nullptr;
  double x = std::strtod(v, &end);
  std::string suf(end ? end : "");
  size_t mul = 1;
  if (suf == "K" || suf == "k" || suf == "KiB") mul = 1024;
  else if (suf == "M" || suf == "m" || suf == "MiB") mul = 1024 * 1024;
  else if (suf == "G" || suf == "g" || suf == "GiB") mul = size_t(1) << 30;
  else if (!suf.empty()) throw Error(cat("plait: cannot parse ", name, "=", v));
  return size_t(x * mul);
}

const Knobs& knobs() {
  static const Knobs k = [] {
    Knobs k;
    k.algo = envStr("PLAIT_ALGO", "auto");
    k.transport = envStr("PLAIT_TRANSPORT", "auto");
    std::string d = envStr("PLAIT_DEBUG", "WARN");
    k.debug = (d == "INFO" || d == "info" || d == "1") ? 1 : (d == "TRACE" || d == "trace" || d == "2") ? 2 : 0;
    k.chunkBytes = envSize("PLAIT_CHUNK_BYTES", 256 * 1024);
    k.shmRingBytes = envSize("PLAIT_SHM_RING_BYTES", 1024 * 1024);
    k.inlineBytes = envSize("PLAIT_INLINE_BYTES", SIZE_MAX);
    k.threads = int(envSize("PLAIT_THREADS", 0));
    k.hostId = envStr("PLAIT_HOST_ID", "");
    k.socketAddr = envStr("PLAIT_SOCKET_ADDR", "");
    k.spinUs = int64_t(envSize("PLAIT_SPIN_US", 200));
    k.yieldUs = int64_t(envSize("PLAIT_YIELD_US", 1000));
    k.tcpStreams = std::max(1, std::min(16, int(envSize("PLAIT_TCP_STREAMS", 1))));
    k.tcpDeadPeerS = int(envSize("PLAIT_TCP_DEAD_PEER_S", 15));
    k.linkProbe = envSize("PLAIT_LINK_PROBE", 1) != 0;
    k.linkGbps = std::strtod(envStr("PLAIT_LINK_GBPS", "0").c_str(), nullptr);
    k.testDialDelayMs = int64_t(envSize("PLAIT_TEST_DIAL_DELAY_MS", 0));
    k.linkAlphaUs = std::strtod(envStr("PLAIT_LINK_ALPHA_US", "0").c_str(), nullptr);
    k.device = envStr("PLAIT_DEVICE", "auto");
    if (k.device != "auto" && k.device != "emulate")
      throw Error(cat("plait: PLAIT_DEVICE=", k.device, " is not one of auto, emulate"));
    k.deviceBufferBytes = envSize("PLAIT_DEVICE_BUFFER_BYTES", size_t(64) << 20);
    k.compression = envStr("PLAIT_COMPRESSION", "none");
    k.compressionBlock = envSize("PLAIT_COMPRESSION_BLOCK", 0);
    k.hostPath = envStr("PLAIT_HOST_PATH", "auto");
    if (k.hostPath != "auto" && k.hostPath != "off" && k.hostPath != "force")
      throw Error(cat("plait: PLAIT_HOST_PATH=", k.hostPath, " is not one of off, auto, force"));
    {
      std::string v = envStr("PLAIT_HOST_SHARE", "");
      char* end = nullptr;
      k.hostShare = v.empty() ? -1 : std::strtod(v.c_str(), &end);
      if (!v.empty() && (end == v.c_str() || *end || !(k.hostShare >= 0 && k.hostShare <= 1)))
        throw Error(cat("plait: PLAIT_HOST_SHARE=", v, " is not a number from 0 to 1"));
    }
    k.hostChunkBytes = std::max<size_t>(4096, envSize("PLAIT_HOST_CHUNK_BYTES", size_t(1) << 20));
    {
      std::string v = envStr("PLAIT_EMU_PCIE_GBPS", "0");
      char* end = nullptr;
      k.emuPcieGBps = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end || !(k.emuPcieGBps >= 0 && k.emuPcieGBps < 1e6))
        throw Error(cat("plait: PLAIT_EMU_PCIE_GBPS=", v, " is not a rate in GB/s (0 for copies at once)"));
    }
    {
      std::string v = envStr("PLAIT_SERVERS", "0");
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (end == v.c_str() || *end || n < 0 || n > 1024)
        throw Error(cat("plait: PLAIT_SERVERS=", v, " is not a number of servers from 0 to 1024"));
      k.servers = int(n);
      v = envStr("PLAIT_SERVER_SHARE", "");
      k.serverShare = v.empty() ? -1 : std::strtod(v.c_str(), &end);
      if (!v.empty() && (end == v.c_str() || *end || !(k.serverShare >= 0 && k.serverShare <= 1)))
        throw Error(cat("plait: PLAIT_SERVER_SHARE=", v, " is not a number from 0 to 1"));
      v = envStr("PLAIT_SERVER_GBPS", "0");
      k.serverGbps = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end || !(k.serverGbps >= 0 && k.serverGbps < 1e7))
        throw Error(cat("plait: PLAIT_SERVER_GBPS=", v, " is not a rate in Gbit/s (0: measure)"));
      k.serverSegBytes = std::min<size_t>(size_t(64) << 20,
                                          std::max<size_t>(4096, envSize("PLAIT_SERVER_SEGMENT_BYTES", size_t(512) << 10)));
    }
    {
      std::string v = envStr("PLAIT_TRACE_BUFFER", "2048");
      char* end = nullptr;
      long long n = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end || n < 0 || n > (1LL << 20))
        throw Error(cat("plait: PLAIT_TRACE_BUFFER=", v, " is not a number of collectives from 0 (off) to 1048576"));
      k.traceBuffer = size_t(n);
      k.traceDir = envStr("PLAIT_TRACE_DIR", "");
      k.authKeyFile = envStr("PLAIT_AUTH_KEY_FILE", "");
    }
    k.kernels = envStr("PLAIT_KERNELS", "auto");
    if (k.kernels != "auto" && k.kernels != "scalar")
      throw Error(cat("plait: PLAIT_KERNELS=", k.kernels, " is not one of auto, scalar"));
    return k;
  }();
  return k;
}

void logInfo(const std::string& msg) {
  if (knobs().debug >= 1) std::fprintf(stderr, "[plait INFO pid %d] %s\n", int(getpid()), msg.c_str());
}

void logWarn(const std::string& msg) { std::fprintf(stderr, "[plait WARN pid %d] %s\n", int(getpid()), msg.c_str()); }

}  // namespace plait
