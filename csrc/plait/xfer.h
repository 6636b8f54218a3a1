// What the engines move: the wire header every message starts with, and one posted transfer (a send, receive,
// receive-and-reduce or codec transfer of a byte range to one peer). Shared by the host engine (engine.cc), the
// device engine (device.h) and the algorithms (algo/); knows nothing of communicators.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "plait/common.h"

namespace plait {

enum class Coll : uint8_t {
  kAllreduce = 1, kBroadcast, kReduce, kAllgather, kReduceScatter, kAlltoall, kGather, kScatter, kBarrier,
  kSendRecv, kMonitoredBarrier
};
const char* collName(Coll c);

struct WireHeader {
  uint32_t magic;
  uint32_t seq;
  uint8_t coll, dtype, op, flags;
  int32_t root;  // root rank, or the tag of a send/recv
  uint64_t count;
  uint64_t bytes;  // payload bytes of this message
};
static_assert(sizeof(WireHeader) == 32, "wire header is 32 bytes");
inline constexpr uint32_t kWireMagic = 0x504c5431;   // "PLT1"
inline constexpr uint32_t kAbortMagic = 0x504c5458;  // "PLTX": a failing rank's last words to a TCP peer


// Completion callback of a point-to-point transfer: nullptr, or the error message.
using Done = std::function<void(const std::string* error)>;

struct Xfer {
  // kSendEnc / kRecvDec / kRecvDecAcc are codec transfers (postSendEnc and friends): `len`, `done` and a
  // dependency's progress count wire bytes of the encoded stream, which moves in whole codec blocks.
  enum Kind : uint8_t { kSend, kRecv, kRecvReduce, kSendEnc, kRecvDec, kRecvDecAcc } kind;
  int peer;
  char* buf;
  size_t len;
  const Xfer* dep;
  size_t done = 0;
  // Codec transfers: the values buf holds (kSendEnc: `vdt` source values, each divided by `div` before encoding;
  // kRecvDec: `vdt` destination; kRecvDecAcc: float32 accumulator), and the encoded segment a send is writing out.
  size_t values = 0;
  DType vdt = DType::kFloat32;
  float div = 1.0f;
  std::unique_ptr<char[]> seg;
  size_t segLen = 0, segOff = 0;
  struct EncShared* shared = nullptr;  // kSendEnc posted by postSendEncShared: segments come from the shared encoder
  // kSendEnc of float32 values with div 1 (error feedback): residual[i] = value[i] - decoded[i] for every value sent.
  float* residual = nullptr;
  const char* segPtr = nullptr;  // the segment being written (seg, or a slot of the shared encoder)
  size_t hdrDone = 0;
  // Every message is padded to a multiple of 8 bytes on the wire, so the next header and typed payloads always
  // start 8-aligned in a ring (receive-and-reduce reads elements in place).
  uint8_t pad = 0, padDone = 0;
  WireHeader hdr{};  // sent, or expected
  WireHeader got{};  // received
  Done onDone;       // point-to-point only
  Clock::time_point deadline{};
};

// One codec stream encoded once and written to several peers (Comm::postSendEncShared): segment k of the stream
// lives in slot k % kSlots until every reading send has moved past it.
struct EncShared {
  static constexpr size_t kSlots = 8;
  const char* src;
  size_t values;
  DType vdt;
  float div;
  const Xfer* dep;
  size_t len;          // wire bytes of the whole stream
  size_t perSeg;       // codec blocks per segment
  size_t segWire;      // wire bytes of a full segment
  size_t produced = 0;  // segments encoded so far (segment k lives in slot k % kSlots)
  std::unique_ptr<char[]> slots;
  std::vector<const struct Xfer*> readers;
};

}  // namespace plait
