// Bootstrap: everything a process group needs before its first collective, done once at creation. From the
// rendezvous store to connected peers: the incarnation's keys and job secret, where every rank lives (host, machine,
// cores), agreement on every knob that decides a schedule or a wire format, the transports (shared memory between
// ranks of a host, TCP otherwise: one Channel per peer), the topology the cost model reads, and the inter-host link
// measurement. Knows nothing of collectives or of the engine that later drives the channels.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "plait/common.h"
#include "plait/server/link.h"
#include "plait/store.h"
#include "plait/transport/channel.h"

namespace plait {

class ShmDomain;
class TcpDomain;
class ServerLinks;

// kHier: hierarchical, the cost model picks ring or tree across hosts; kHierRing / kHierTree force that choice.
enum class Algo : uint8_t { kAuto, kRing, kTree, kDirect, kHier, kHierRing, kHierTree };
const char* algoName(Algo a);
Algo parseAlgo(const std::string& s);

struct Options {
  std::string algo = "";       // empty: PLAIT_ALGO
  std::string transport = "";  // empty: PLAIT_TRANSPORT
  size_t chunkBytes = 0;       // 0: PLAIT_CHUNK_BYTES
  size_t shmRingBytes = 0;     // 0: PLAIT_SHM_RING_BYTES
  std::string compression = "";  // empty: PLAIT_COMPRESSION; none|auto|int8|int4|fp8|bf16
  uint32_t compressionBlock = 0;   // 0: PLAIT_COMPRESSION_BLOCK, else the codec's default
  std::string addressHint;     // host of the rendezvous store, to pick the interface to advertise
  std::string groupName;
  std::vector<int> globalRanks;  // the group's ranks in the default group (torch's global ranks), for the record
  int servers = -1;            // summation servers (-1: PLAIT_SERVERS)
  // The rendezvous store's root (not the group's prefixed view): where summation servers register and read job
  // secrets. Needed only with servers; storeDesc ("host:port") names it in errors.
  std::shared_ptr<Store> rootStore;
  std::string storeDesc;
};

// Where ranks live: the cost model's input, identical on every rank.
struct Topology {
  int nranks = 1;
  int nhosts = 1;
  bool allShm = true;           // every peer pair uses shared memory
  bool oversubscribed = false;  // some host runs more ranks of this group than it has cores
  int maxLocal = 1;             // the most ranks of this group on one host
  double cpuLoad = 1;           // the most ranks of this group per core on one machine (emulated hosts share one)
  // The link between hosts (nhosts > 1): one-way latency and inverse bandwidth, measured once at group creation
  // between the leaders of hosts 0 and 1 (or set by PLAIT_LINK_ALPHA_US / PLAIT_LINK_GBPS), the same on every rank.
  double linkAlphaUs = 0, linkUsPerByte = 0;
  std::string linkSource;
  // Bytes each all-reduce schedule moves through the busiest host's link (in or out), per byte of the buffer.
  double crossRing = 0, crossTree = 0, crossOneShot = 0, crossTwoShot = 0, crossHierRing = 0, crossHierTree = 0;
  // The collective runs on device memory through the device engine (set only while one does).
  bool device = false;
};

// What bootstrap() hands to the communicator.
struct Bootstrap {
  std::string prefix;  // this incarnation's store keys
  std::string uuid;    // this incarnation's id (the same on every rank)
  std::string hostId;  // this rank's host
  std::unique_ptr<ShmDomain> shm;
  std::unique_ptr<TcpDomain> tcp;
  std::vector<std::unique_ptr<Channel>> channels;  // per peer (nullptr for this rank)
  std::vector<int> hostOf;                         // rank -> host index
  std::vector<std::vector<int>> hostRanks;         // host index -> its ranks, increasing; the leader is the first
  Topology topo;
  bool oversubscribed = false;  // this machine runs more ranks than it has cores
  int reduceThreads = 1;        // PLAIT_THREADS, else the cores this host has per local rank
  std::unique_ptr<ServerLinks> serverLinks;  // summation servers (host leaders only)
  ServerInfo servers;                        // the same on every rank (k = 0: none)
  Bootstrap();
  ~Bootstrap();
  Bootstrap(Bootstrap&&) noexcept;
};

// Collective over the group's ranks (every rank calls it once per incarnation). Raises, on every rank, when ranks
// disagree on a knob that decides schedules or wire formats (naming the knob and both values), or when a peer cannot
// be reached within `timeout`.
// PLAIT_AUTH_KEY_FILE: with a key file, the secret that authenticates TCP connections (and summation-server
// connections) is HMAC-SHA256(key, the store's per-incarnation secret), so reading the store is not enough to join;
// without one it is the store's secret itself. Raises naming the file if it cannot be read or is shorter than 16 bytes.
std::string applyAuthKey(const std::string& storeSecret);
// A short fingerprint of the key ("none" without a key file) that ranks compare at rendezvous; it reveals nothing
// usable about the key.
std::string authKeyFingerprint();

Bootstrap bootstrap(Store& store, int rank, int size, std::chrono::milliseconds timeout, const Options& opts,
                    Algo algo, size_t chunkBytes);

}  // namespace plait
