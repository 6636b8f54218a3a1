// The summation servers' wire protocol (BytePS-style summation service; README "Summation servers").
//
// A worker (a host leader of a process group with PLAIT_SERVERS=k) dials each of the group's k servers once, at
// group creation. The connection is authenticated like the TCP transport's (transport/tcp.h): a mutual
// HMAC-SHA256 challenge-response over the job's secret, which the server reads from the job's rendezvous store
// (jobSecretKey), bound to the job id, the worker's index and a fresh nonce from each side. Then, per all-reduce,
// each worker sends the server's part of its buffer as *segments* (SegHeader + payload, kSeg), in order; once the
// server holds segment i of every worker it sums them in worker order and sends the sum back to every worker
// (SegHeader + payload). Compressed all-reduces send encoded segments (kernels/codec.h): the server decodes each
// worker's segment into a float32 sum in worker order and encodes the sum once (two quantizations per element). A server that gives up on the job (a worker left, headers that disagree) sends kAbort with
// its reason to every worker still connected, then closes.
#pragma once

#include <cstdint>
#include <string>

#include "plait/transport/auth.h"

namespace plait {
namespace srv {

constexpr uint32_t kHelloMagic = 0x504c5348;   // "PLSH": a worker introduces itself (or pings)
constexpr uint32_t kChallMagic = 0x504c5343;   // "PLSC": the server's challenge and proof
constexpr uint32_t kAcceptMagic = 0x504c534b;  // "PLSK": accepted (then a 32-bit reason length: 0)
constexpr uint32_t kRefuseMagic = 0x504c5352;  // "PLSR": refused (then a 32-bit length and the reason)
constexpr uint32_t kPongMagic = 0x504c5350;    // "PLSP": answer to a ping
constexpr uint32_t kSegMagic = 0x504c5353;     // "PLSS": a data / control message
constexpr uint16_t kVersion = 1;
constexpr size_t kJobIdLen = 16;                   // hex characters of the incarnation's id
constexpr uint64_t kMaxSegBytes = uint64_t(64) << 20;  // a segment larger than this is a protocol error
constexpr uint64_t kMaxAbortBytes = 4096;

enum HelloKind : uint16_t { kJoin = 1, kPing = 2 };
enum MsgKind : uint32_t { kSeg = 1, kAbort = 2, kBye = 3 };

struct Hello {
  uint32_t magic;
  uint16_t version, kind;
  int32_t worker, nworkers;  // this worker's index among the job's workers (host leaders), and their number
  int32_t server, reserved;  // which of the job's servers the worker believes it dials
  int64_t timeoutMs;         // the group's timeout: how long the server waits for the other workers to join
  char job[kJobIdLen];
  uint8_t nonce[16];
};
struct Challenge {
  uint32_t magic, reserved;
  uint8_t nonce[16];
  uint8_t mac[32];  // the server proves it holds the job's secret, bound to the worker's nonce
};
struct Proof {
  uint8_t mac[32];  // the worker proves it holds the secret, bound to the server's nonce
};
struct SegHeader {
  uint32_t magic, kind;
  uint32_t seq;    // the group's collective sequence number
  uint32_t index;  // segment index within the collective (per server)
  uint8_t dtype, op;
  uint8_t codec;    // codec::Codec: kNone, raw values of dtype; else the payload is encoded with (codec, block)
  uint8_t reserved;
  uint32_t block;   // the codec's block (0 for raw values)
  uint64_t values;  // values in the segment
  uint64_t bytes;   // payload bytes that follow
};
static_assert(sizeof(Hello) == 64 && sizeof(Challenge) == 56 && sizeof(Proof) == 32 && sizeof(SegHeader) == 40,
              "summation server protocol layout");

// The proofs of the handshake: who is 'S' (the server's) or 'W' (the worker's); bound to the whole Hello (job id,
// worker index, the worker's nonce) and the server's nonce.
inline Digest proofOf(const std::string& secret, char who, const Hello& h, const uint8_t* serverNonce) {
  std::string m(1, who);
  m.append(reinterpret_cast<const char*>(&h), sizeof(h));
  m.append(reinterpret_cast<const char*>(serverNonce), 16);
  return hmacSha256(secret, m.data(), m.size());
}

// Where a job's secret lives in the rendezvous store's root (the key the workers' rank 0 writes).
inline std::string jobSecretKey(const std::string& job) { return "plait/jobs/" + job + "/secret"; }
// The servers' registry in the store's root: kRegistryCount counts registrations; entry i is
// "addr:port\thostname\tpid" (empty once server i stopped); kStopKey tells every server of the store to stop.
inline constexpr const char* kRegistryCount = "plait/servers/count";
inline std::string registryKey(int64_t i) { return "plait/servers/" + std::to_string(i); }
inline constexpr const char* kStopKey = "plait/servers/stop";

}  // namespace srv
}  // namespace plait
