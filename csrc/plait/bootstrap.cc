// Bootstrap: from the rendezvous store to connected peers (see bootstrap.h).
#include "plait/bootstrap.h"

#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <map>
#include <thread>

#include "plait/algo/cost_model.h"
#include "plait/transport/auth.h"
#include "plait/transport/shm.h"
#include "plait/transport/tcp.h"

namespace plait {

namespace {
std::string readFirstLine(const char* path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

// Ranks in different network namespaces are different hosts even though they share hostname and boot id.
std::string detectHostId() {
  if (!knobs().hostId.empty()) return knobs().hostId;
  char hn[256] = {0};
  gethostname(hn, sizeof(hn) - 1);
  struct stat st{};
  std::string netns = stat("/proc/self/ns/net", &st) == 0 ? std::to_string(st.st_ino) : "?";
  return cat(hn, "/", readFirstLine("/proc/sys/kernel/random/boot_id"), "/", netns);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t b = 0;
  while (true) {
    size_t e = s.find(sep, b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

// Blocking I/O on a freshly connected channel (the link probe runs before any engine exists).
void rawIo(Bootstrap& b, int rank, int peer, void* buf, size_t n, bool isWrite, Clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  Channel* ch = b.channels[peer].get();
  while (n > 0) {
    size_t k = isWrite ? ch->write(p, n) : ch->read(p, n);
    p += k, n -= k;
    if (k == 0) {
      PLAIT_CHECK(Clock::now() < deadline, "plait: rank ", rank, ": timed out measuring the link to rank ", peer);
      pollfd pfd{ch->pollFd(isWrite), short(isWrite ? POLLOUT : POLLIN), 0};
      poll(&pfd, 1, 1);
    }
  }
}

// Measures the inter-host link (latency by ping-pong, bandwidth by a stream long enough to drain any token
// bucket) between the leaders of hosts 0 and 1 and shares the result through the store.
void probeLink(Bootstrap& b, Store& store, int rank, std::chrono::milliseconds timeout) {
  const std::string key = b.prefix + "link";
  const int nh = int(b.hostRanks.size());
  if (knobs().linkGbps > 0 || !knobs().linkProbe) {
    // Set by hand (or probing is off): every rank reads the same environment, no exchange needed.
    b.topo.linkAlphaUs = knobs().linkAlphaUs > 0 ? knobs().linkAlphaUs : 30.0;
    b.topo.linkUsPerByte = knobs().linkGbps > 0 ? 8e-3 / knobs().linkGbps : 1.0 / 1000.0;
    b.topo.linkSource = knobs().linkGbps > 0 ? "PLAIT_LINK_GBPS" : "default, PLAIT_LINK_PROBE=0";
    return;
  }
  int me = -1;  // this rank's index among the host leaders
  for (int h = 0; h < nh; ++h)
    if (b.hostRanks[h][0] == rank) me = h;
  if (me >= 0) {
    const auto deadline = Clock::now() + timeout;
    double alpha = 0;
    if (me <= 1) {
      // Latency: ping-pong of 8 bytes between the leaders of hosts 0 and 1; half the median round trip.
      const int peer = b.hostRanks[1 - me][0];
      std::vector<double> rtt;
      uint64_t token = 0;
      for (int i = 0; i < 21; ++i) {
        auto t0 = Clock::now();
        if (me == 0) {
          rawIo(b, rank, peer, &token, 8, true, deadline);
          rawIo(b, rank, peer, &token, 8, false, deadline);
        } else {
          rawIo(b, rank, peer, &token, 8, false, deadline);
          rawIo(b, rank, peer, &token, 8, true, deadline);
        }
        rtt.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
      std::sort(rtt.begin(), rtt.end());
      alpha = rtt[rtt.size() / 2] / 2;
    }
    // Bandwidth, under the load a collective puts on the hosts: every leader streams `size` bytes to the next
    // leader while receiving as much from the previous one, and times the last three quarters of what it receives
    // (a token-bucket shaper lets the first bytes through at line rate). The slowest leader's rate counts; the size
    // doubles until that takes at least 30 ms. Leaders agree on each round's result through the store.
    const int next = b.hostRanks[(me + 1) % nh][0], prev = b.hostRanks[(me + nh - 1) % nh][0];
    size_t size = 1 << 20;
    std::vector<char> out, in;
    double usPerByte = 0;
    int extra = 0;
    for (int round = 0;; ++round) {
      out.resize(size);
      in.resize(size);
      size_t sent = 0, got = 0;
      Clock::time_point quarter{};
      Channel* tx = b.channels[next].get();
      Channel* rx = b.channels[prev].get();
      while (sent < size || got < size) {
        size_t w = sent < size ? tx->write(out.data() + sent, size - sent) : 0;
        size_t r = got < size ? rx->read(in.data() + got, size - got) : 0;
        sent += w;
        if (got < size / 4 && got + r >= size / 4) quarter = Clock::now();
        got += r;
        if (w == 0 && r == 0) {
          PLAIT_CHECK(Clock::now() < deadline, "plait: rank ", rank, ": timed out measuring the link to ranks ",
                      prev, " and ", next);
          pollfd pfd[2] = {{tx->pollFd(true), short(sent < size ? POLLOUT : 0), 0},
                           {rx->pollFd(false), short(got < size ? POLLIN : 0), 0}};
          poll(pfd, 2, 1);
        }
      }
      double dt = std::chrono::duration<double, std::micro>(Clock::now() - quarter).count();
      store.set(cat(b.prefix, "probe/", round, "/", me), cat(dt));
      double worst = 0;
      for (int h = 0; h < nh; ++h)
        worst = std::max(worst, std::atof(store.get(cat(b.prefix, "probe/", round, "/", h)).c_str()));
      const double rate = worst / double(size - size / 4);
      // Once a round is long enough, two more at the same size; the best of the three counts (a single round is
      // at the mercy of whatever else the machine did at that moment, and noise only ever slows a round down).
      if (usPerByte > 0) {
        usPerByte = std::min(usPerByte, rate);
        if (++extra == 2) break;
        continue;
      }
      if (worst >= 30000 || size >= (size_t(256) << 20)) {
        usPerByte = rate;
        continue;
      }
      size *= 2;
    }
    if (knobs().linkAlphaUs > 0) alpha = knobs().linkAlphaUs;
    if (me == 0) {
      // The latency was measured on the other side of the pair too; host 0's leader publishes both numbers.
      store.set(key, cat(alpha, " ", usPerByte));
    }
  }
  auto f = split(store.get(key), ' ');
  PLAIT_CHECK(f.size() == 2, "plait: rank ", rank, ": malformed link measurement in the store");
  b.topo.linkAlphaUs = std::atof(f[0].c_str());
  b.topo.linkUsPerByte = std::atof(f[1].c_str());
  b.topo.linkSource = cat("measured across ", nh, " host leaders");
}
}  // namespace

const char* algoName(Algo a) {
  switch (a) {
    case Algo::kAuto: return "auto";
    case Algo::kRing: return "ring";
    case Algo::kTree: return "tree";
    case Algo::kDirect: return "direct";
    case Algo::kHier: return "hier";
    case Algo::kHierRing: return "hier_ring";
    case Algo::kHierTree: return "hier_tree";
  }
  return "?";
}

Algo parseAlgo(const std::string& s) {
  if (s.empty() || s == "auto") return Algo::kAuto;
  if (s == "ring") return Algo::kRing;
  if (s == "tree") return Algo::kTree;
  if (s == "direct") return Algo::kDirect;
  if (s == "hier" || s == "hierarchical") return Algo::kHier;
  if (s == "hier_ring" || s == "hier-ring") return Algo::kHierRing;
  if (s == "hier_tree" || s == "hier-tree") return Algo::kHierTree;
  throw Error(cat("plait: unknown algorithm '", s,
                  "' (PLAIT_ALGO / Options.algo take auto, ring, tree, direct, hier, hier_ring, hier_tree)"));
}

namespace {
// The operator's key (PLAIT_AUTH_KEY_FILE), read once per process.
const std::string& authKey() {
  static const std::string key = [] {
    const std::string& path = knobs().authKeyFile;
    if (path.empty()) return std::string();
    struct stat st {};
    PLAIT_CHECK(stat(path.c_str(), &st) == 0, "plait: PLAIT_AUTH_KEY_FILE=", path, " cannot be read: ",
                std::strerror(errno));
    PLAIT_CHECK(S_ISREG(st.st_mode), "plait: PLAIT_AUTH_KEY_FILE=", path, " is not a regular file");
    PLAIT_CHECK(st.st_size <= (1 << 16), "plait: PLAIT_AUTH_KEY_FILE=", path, " is ", st.st_size,
                " bytes; a key file holds at most 65536");
    std::ifstream f(path, std::ios::binary);
    PLAIT_CHECK(f.good(), "plait: PLAIT_AUTH_KEY_FILE=", path, " cannot be opened: ", std::strerror(errno));
    std::string k((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    while (!k.empty() && (k.back() == '\n' || k.back() == '\r' || k.back() == ' ' || k.back() == '\t')) k.pop_back();
    PLAIT_CHECK(k.size() >= 16, "plait: PLAIT_AUTH_KEY_FILE=", path, " holds ", k.size(),
                " bytes; a key needs at least 16 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)");
    if (st.st_mode & 077)
    {
      char mode[8];
      std::snprintf(mode, sizeof(mode), "%03o", unsigned(st.st_mode & 0777));
      logWarn(cat("PLAIT_AUTH_KEY_FILE=", path, " can be read by other users (mode ", mode, "); chmod 600 it"));
    }
    return k;
  }();
  return key;
}
}  // namespace

std::string applyAuthKey(const std::string& storeSecret) {
  const std::string& key = authKey();
  if (key.empty()) return storeSecret;
  const std::string msg = std::string("plait auth key v1") + '\0' + storeSecret;
  Digest d = hmacSha256(key, msg.data(), msg.size());
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

std::string authKeyFingerprint() {
  const std::string& key = authKey();
  if (key.empty()) return "none";
  static const char kMsg[] = "plait auth key fingerprint v1";
  Digest d = hmacSha256(key, kMsg, sizeof(kMsg) - 1);
  return toHex(d.data(), 8);
}

Bootstrap::Bootstrap() = default;
Bootstrap::~Bootstrap() = default;
Bootstrap::Bootstrap(Bootstrap&&) noexcept = default;

Bootstrap bootstrap(Store& store, int rank, int size, std::chrono::milliseconds timeout, const Options& opts, Algo algo,
                    size_t chunkBytes) {
  Bootstrap b;
  b.channels.resize(size);
  b.hostOf.assign(size, 0);
  std::string mode = opts.transport.empty() ? knobs().transport : opts.transport;
  PLAIT_CHECK(mode == "auto" || mode == "shm" || mode == "tcp", "plait: unknown transport '", mode,
              "' (PLAIT_TRANSPORT / Options.transport take auto, shm, tcp)");
  // Every rank adds once per incarnation, so re-initialising over the same store gets fresh keys.
  int64_t epoch = (store.add("plait/epoch", 1) - 1) / size;
  std::string prefix = cat("plait/", epoch, "/");
  b.prefix = prefix;
  // Rank 0 draws the incarnation's id and the job secret that authenticates every TCP connection (tcp.h).
  std::string uuid, secret;
  if (rank == 0) {
    uint8_t r[8 + 32];
    randomBytes(r, sizeof(r));
    uuid = toHex(r, 8);
    secret = toHex(r + 8, 32);
    store.set(prefix + "secret", secret);
    store.set(prefix + "uuid", uuid);
  } else {
    uuid = store.get(prefix + "uuid");
    secret = store.get(prefix + "secret");
  }
  std::string hostId = detectHostId();
  b.uuid = uuid;
  b.hostId = hostId;
  size_t ringBytes = opts.shmRingBytes ? opts.shmRingBytes : knobs().shmRingBytes;
  std::string shmName = cat("/plait-", uuid, "-", rank);
  // The segment itself is made once the local peers are known (its rings are for them only).
  const bool wantShm = mode != "tcp" && size > 1;
  if (size > 1) b.tcp = std::make_unique<TcpDomain>(rank, size, knobs().tcpStreams);
  std::string addr = b.tcp ? b.tcp->listenAddress(opts.addressHint) : "-";
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  // The machine (hostname + boot id, without the network namespace): ranks on one machine share its cores even
  // when they are different hosts for the transports (emulated hosts, containers), which decides whether spinning
  // while waiting is affordable.
  char hn[256] = {0};
  gethostname(hn, sizeof(hn) - 1);
  std::string machine = cat(hn, "/", readFirstLine("/proc/sys/kernel/random/boot_id"));
  // Every knob that decides a schedule or a wire format, as this rank sees it: ranks that disagree would run different
  // schedules for the same collective (wrong results) or wait for each other forever, so a mismatch raises here, on
  // every rank, naming the knob and both values.
  const std::vector<std::pair<std::string, std::string>> sched = {
      {"algo (PLAIT_ALGO / Options.algo)", algoName(algo)},
      {"transport (PLAIT_TRANSPORT / Options.transport)", mode},
      {"PLAIT_SHM_RING_BYTES / Options.shm_ring_bytes", cat(ringBytes)},
      {"PLAIT_TCP_STREAMS", cat(knobs().tcpStreams)},
      {"PLAIT_LINK_GBPS", cat(knobs().linkGbps)},
      {"PLAIT_LINK_ALPHA_US", cat(knobs().linkAlphaUs)},
      {"PLAIT_LINK_PROBE", cat(knobs().linkProbe)},
      {"PLAIT_DEVICE", knobs().device},
      {"compression (PLAIT_COMPRESSION / Options.compression)",
       opts.compression.empty() ? knobs().compression : opts.compression},
      {"compression block (PLAIT_COMPRESSION_BLOCK / Options.compression_block)",
       cat(opts.compressionBlock ? size_t(opts.compressionBlock) : knobs().compressionBlock)},
      {"PLAIT_DEVICE_BUFFER_BYTES", cat(knobs().deviceBufferBytes)},
      {"PLAIT_HOST_PATH", knobs().hostPath},
      {"PLAIT_HOST_SHARE", cat(knobs().hostShare)},
      {"PLAIT_HOST_CHUNK_BYTES", cat(knobs().hostChunkBytes)},
      {"servers (PLAIT_SERVERS / Options.servers)", cat(opts.servers >= 0 ? opts.servers : knobs().servers)},
      {"PLAIT_SERVER_SHARE", cat(knobs().serverShare)},
      {"PLAIT_SERVER_SEGMENT_BYTES", cat(knobs().serverSegBytes)},
      {"PLAIT_SERVER_GBPS", cat(knobs().serverGbps)},
      {"PLAIT_AUTH_KEY_FILE (key fingerprint)", authKeyFingerprint()},
  };
  std::string schedInfo;
  for (const auto& kv : sched) schedInfo += cat(schedInfo.empty() ? "" : "\t", kv.second);
  std::string myInfo = cat(hostId, "\n", getpid(), "\n", wantShm ? shmName : "-", "\n", addr, "\n", cores, "\n",
                           machine, "\n", schedInfo);
  store.set(cat(prefix, "info/", rank), myInfo);

  std::vector<std::string> hosts(size), shmNames(size), addrs(size);
  std::map<std::string, int> hostIndex;
  std::vector<int> coresOf(size, 1);
  int onMachine = 0;
  std::map<std::string, std::pair<int, int>> machines;  // machine -> (ranks, cores)
  for (int p = 0; p < size; ++p) {
    auto f = split(p == rank ? myInfo : store.get(cat(prefix, "info/", p)), '\n');
    PLAIT_CHECK(f.size() == 7, "plait: rank ", rank, ": malformed rendezvous record from rank ", p,
                " (a different plait version?)");
    if (p != rank) {
      auto theirs = split(f[6], '\t');
      PLAIT_CHECK(theirs.size() == sched.size(), "plait: rank ", rank, ": rank ", p,
                  " runs a different plait version (its rendezvous record has ", theirs.size(), " knobs, not ",
                  sched.size(), ")");
      for (size_t i = 0; i < sched.size(); ++i)
        PLAIT_CHECK(theirs[i] == sched[i].second, "plait: ranks disagree on ", sched[i].first, ": rank ", p, " has ",
                    theirs[i], ", rank ", rank, " has ", sched[i].second, " (group '", opts.groupName,
                    "'; every rank of a group must run the same schedules: set it the same everywhere)");
    }
    coresOf[p] = std::atoi(f[4].c_str());
    if (f[5] == machine) ++onMachine;
    machines[f[5]].first += 1;
    machines[f[5]].second = std::max(1, coresOf[p]);
    hosts[p] = f[0];
    shmNames[p] = f[2];
    addrs[p] = f[3];
    auto it = hostIndex.emplace(f[0], int(hostIndex.size())).first;
    b.hostOf[p] = it->second;
  }
  b.topo.nranks = size;
  b.topo.nhosts = int(hostIndex.size());
  b.hostRanks.assign(hostIndex.size(), {});
  for (int p = 0; p < size; ++p) b.hostRanks[b.hostOf[p]].push_back(p);
  for (const auto& h : b.hostRanks) b.topo.maxLocal = std::max(b.topo.maxLocal, int(h.size()));
  int localRanks = 0;
  std::vector<int> shmPeers, tcpPeers;
  for (int p = 0; p < size; ++p) {
    if (hosts[p] == hostId) ++localRanks;
    if (p == rank) continue;
    bool local = hosts[p] == hostId;
    if (mode == "shm")
      PLAIT_CHECK(local, "plait: rank ", rank, ": PLAIT_TRANSPORT=shm but peer rank ", p, " is on another host (",
                  hosts[p], ")");
    if (local && mode != "tcp") shmPeers.push_back(p);
    else tcpPeers.push_back(p);
  }
  if (!shmPeers.empty()) {
    std::vector<int> local = shmPeers;
    local.push_back(rank);
    std::sort(local.begin(), local.end());
    // A rank that cannot make its segment says so under its key, so its local peers raise with the reason instead
    // of waiting for the segment until the store's timeout.
    try {
      b.shm = std::make_unique<ShmDomain>(shmName, rank, local, ringBytes);
    } catch (const std::exception& e) {
      store.set(cat(prefix, "shm/", rank), cat("error: ", e.what()));
      throw;
    }
    store.set(cat(prefix, "shm/", rank), "ok");
    for (int p : shmPeers) {
      std::string st = store.get(cat(prefix, "shm/", p));
      PLAIT_CHECK(st == "ok", "plait: rank ", rank, ": local peer rank ", p,
                  " could not set up shared memory: ", st.substr(std::min<size_t>(st.size(), 7)));
    }
  }
  b.topo.allShm = tcpPeers.empty() && size > 1 && b.shm != nullptr;
  if (mode == "tcp") b.topo.allShm = false;
  b.oversubscribed = onMachine > cores;
  for (const auto& m : machines) b.topo.cpuLoad = std::max(b.topo.cpuLoad, double(m.second.first) / m.second.second);
  // The same on every rank: the cost model must not see different inputs on different ranks.
  std::vector<int> ranksOnHost(hostIndex.size(), 0);
  for (int p = 0; p < size; ++p) ++ranksOnHost[b.hostOf[p]];
  for (int p = 0; p < size; ++p) b.topo.oversubscribed |= ranksOnHost[b.hostOf[p]] > coresOf[p];
  b.reduceThreads = knobs().threads > 0 ? knobs().threads : std::max(1, std::min(8, cores / localRanks));

  if (b.shm) {
    // Once every local peer has mapped this rank's segment its name can go: nothing is left in /dev/shm. A rank that
    // cannot map a peer's segment says why under its key, so the others raise instead of waiting out the store.
    try {
      for (int p : shmPeers) {
        PLAIT_CHECK(shmNames[p] != "-", "plait: rank ", rank, ": peer rank ", p, " has no shared memory segment");
        b.shm->attach(p, shmNames[p]);
      }
    } catch (const std::exception& e) {
      store.set(cat(prefix, "mapped/", rank), cat("error: ", e.what()));
      throw;
    }
    store.set(cat(prefix, "mapped/", rank), "ok");
    for (int p : shmPeers) {
      std::string st = store.get(cat(prefix, "mapped/", p));
      PLAIT_CHECK(st == "ok", "plait: rank ", rank, ": local peer rank ", p,
                  " could not map shared memory: ", st.substr(std::min<size_t>(st.size(), 7)));
    }
    b.shm->unlinkOwn();
  }
  if (b.tcp) {
    b.tcp->connectAll(tcpPeers, addrs, applyAuthKey(fromHex(secret)), prefix + uuid, timeout.count());
    b.tcp->closeListener();
  }
  for (int p : shmPeers) b.channels[p] = b.shm->channel(p);
  for (int p : tcpPeers) {
    // Errors on this link name the peer's host and every rank on it: losing a host loses all of them.
    std::string onHost;
    for (int q = 0; q < size; ++q)
      if (b.hostOf[q] == b.hostOf[p]) onHost += cat(onHost.empty() ? "" : ", ", q);
    std::string where = addrs[p].substr(0, addrs[p].rfind(':'));
    b.channels[p] = b.tcp->channel(p, cat("peer rank ", p, " on host ", where, " (ranks ", onHost, ")"));
  }
  if (tcpPeers.empty()) b.tcp.reset();
  computeLinkLoads(b.topo, b.hostOf);
  if (b.topo.nhosts > 1) probeLink(b, store, rank, timeout);
  const int nServers = opts.servers >= 0 ? opts.servers : knobs().servers;
  // Only groups across hosts: inside one host nothing crosses a link, so servers could only slow it down.
  if (nServers > 0 && size > 1 && b.topo.nhosts > 1)
    b.serverLinks = attachServers(store, opts.rootStore.get(), prefix, uuid, secret, rank, b.hostRanks, b.hostOf,
                                  nServers, timeout, opts.storeDesc, &b.servers);
  if (infoEnabled())
    logInfo(cat("rank ", rank, "/", size, " group '", opts.groupName, "': ", b.topo.nhosts, " host(s), ",
                shmPeers.size(), " shm peer(s), ", tcpPeers.size(), " tcp peer(s), kernels ", kernelIsa(),
                ", algo ", algoName(algo), ", chunk ", chunkBytes, " B",
                b.topo.nhosts > 1 ? cat(", inter-host link ", b.topo.linkAlphaUs, " us + ",
                                       1e-3 / b.topo.linkUsPerByte, " GB/s (", b.topo.linkSource, ")")
                                 : std::string()) +
                (b.servers.k > 0 ? cat(", ", b.servers.k, " summation server(s) at ", b.servers.gbps * 8,
                                       " Gbit/s each (", b.servers.source, ")")
                                 : std::string()));
  return b;
}

}  // namespace plait
