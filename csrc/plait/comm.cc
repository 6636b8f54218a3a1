#include "plait/comm.h"
#include "plait/device.h"

#include <fcntl.h>
#include <sched.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <condition_variable>
#include <cxxabi.h>
#include <map>
#include <random>
#include <thread>

#include "plait/algo/cost_model.h"
#include "plait/transport/auth.h"
#include "plait/transport/shm.h"
#include "plait/transport/tcp.h"

namespace plait {

namespace {
constexpr uint32_t kWireMagic = 0x504c5431;   // "PLT1"
constexpr uint32_t kAbortMagic = 0x504c5458;  // "PLTX": a failing rank's last words to a TCP peer

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

inline void cpuRelax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}
}  // namespace

const char* collName(Coll c) {
  switch (c) {
    case Coll::kAllreduce: return "all_reduce";
    case Coll::kBroadcast: return "broadcast";
    case Coll::kReduce: return "reduce";
    case Coll::kAllgather: return "all_gather";
    case Coll::kReduceScatter: return "reduce_scatter";
    case Coll::kAlltoall: return "all_to_all";
    case Coll::kGather: return "gather";
    case Coll::kScatter: return "scatter";
    case Coll::kBarrier: return "barrier";
    case Coll::kSendRecv: return "send/recv";
    case Coll::kMonitoredBarrier: return "monitored_barrier";
  }
  return "?";
}

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

bool Comm::finished(const Xfer* x) {
  return x->hdrDone == sizeof(WireHeader) && x->done == x->len && x->padDone == x->pad;
}

Comm::Comm(std::shared_ptr<Store> store, int rank, int size, std::chrono::milliseconds timeout, const Options& opts)
    : rank_(rank), size_(size), timeoutMs_(int64_t(timeout.count())) {
  PLAIT_CHECK(size >= 1 && rank >= 0 && rank < size, "plait: invalid rank ", rank, " of world size ", size);
  algo_ = parseAlgo(opts.algo.empty() ? knobs().algo : opts.algo);
  chunkBytes_ = std::max<size_t>(1, opts.chunkBytes ? opts.chunkBytes : knobs().chunkBytes);
  p2pSendSeq_.assign(size, 0);
  p2pRecvSeq_.assign(size, 0);
  sendQ_.resize(size);
  recvQ_.resize(size);
  p2pRecvQ_.resize(size);
  unexpected_.resize(size);
  in_.resize(size);
  wakeFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  PLAIT_CHECK(wakeFd_ >= 0, "plait: rank ", rank, ": eventfd failed: ", std::strerror(errno));
  channels_.resize(size);
  hostOf_.assign(size, 0);
  store_ = store;
  rendezvous(*store, opts);
}

void Comm::setDevice(int device, void* stream) {
  if (!dev_ && !viaHost_) {
    std::unique_ptr<DeviceOps> ops;
    if (knobs().device == "emulate") {
      ops = makeEmulatedDeviceOps(timeout());
    } else {
      std::string why;
      ops = makeCudaDeviceOps(&why);
      PLAIT_CHECK(ops, "plait: rank ", rank_, ": CUDA device collectives are unavailable: ", why);
    }
    ops->bind(device, stream);  // the engine's setup already allocates and maps on this device
    if (deviceSupported())
      dev_ = std::make_unique<DeviceEngine>(*this, *store_, prefix_, std::move(ops), knobs().deviceBufferBytes);
    else
      viaHost_ = std::move(ops);
  }
  hasDev_ = dev_ != nullptr;
  (dev_ ? dev_->ops() : *viaHost_).bind(device, stream);
  devActive_ = true;
  topo_.device = dev_ != nullptr;
}

void Comm::clearDevice() {
  // Leave device mode whatever flush does: a throw must not leave the next host call thinking it is on the device.
  const bool flush = devActive_ && dev_ != nullptr;
  devActive_ = false;
  topo_.device = false;
  if (flush) dev_->flush();
}

void Comm::checkDeviceErrors() {
  // The device flags a transfer whose size disagrees (it cannot throw); the host sees the flag once the device has
  // run that far: at once with the emulation, at a later call on a GPU.
  int bad = dev_ ? dev_->sizeMismatchPeer() : -1;
  if (bad >= 0)
    fail(cat("plait: rank ", rank_, ": a device collective received from peer rank ", bad,
             " a different number of bytes than this rank expected (the ranks called different collectives or "
             "sizes, ", where(), "); that transfer was dropped, so device results since then are invalid"));
}

void Comm::checkDevicePeers() {
  if (shm_) {
    std::string why;
    int by = shm_->abortedBy(&why);
    if (by >= 0)
      fail(cat("plait: rank ", rank_, ": ", where(), " (device) aborted because peer rank ", by, " failed: ", why), true);
  }
  // Liveness locks (transport/shm.h), not process ids: one fcntl per peer, valid across PID namespaces.
  int gone = dev_ ? dev_->gonePeer() : -1;
  for (int p = 0; p < size_ && gone < 0; ++p)
    if (p != rank_ && shm_ && channels_[p] && channels_[p]->kind() == TransportKind::kShm && shm_->peerGone(p))
      gone = p;
  if (gone >= 0) fail(cat("plait: rank ", rank_, ": peer rank ", gone, " (same host) died during ", where(), " (device)"));
}

std::string Comm::deviceEngineName() const {
  return dev_ ? dev_->name() : viaHost_ ? cat(viaHost_->name(), " via host") : "";
}

void Comm::localCopy(void* dst, const void* src, size_t bytes) {
  if (devActive_ && dev_) dev_->copy(dst, src, bytes);
  else if (devActive_) viaHost_->copy(dst, src, bytes);
  else if (bytes && dst != src) std::memmove(dst, src, bytes);
}

void Comm::localReduce(RedOp op, DType dtype, void* dst, const void* a, const void* b, size_t count) {
  if (devActive_ && dev_) dev_->reduce(op, dtype, dst, a, b, count);
  else if (devActive_) viaHost_->reduce(op, dtype, dst, a, b, count);
  else plait::reduce(op, dtype, dst, a, b, count, reduceThreads());
}

Comm::~Comm() {
  if (wakeFd_ >= 0) close(wakeFd_);
  dev_.reset();
  if (viaHost_) {
    try {
      viaHost_->synchronize();
    } catch (...) {
    }
    if (hostStage_) viaHost_->releaseHost(hostStage_);
  }
  if (knobs().debug >= 2)
    logInfo(cat("rank ", rank_, " stats: ", stats_.collectives, " collectives, ", stats_.spinsIdle, " idle spins, ",
                stats_.yields, " yields, ", stats_.sleeps, " sleeps"));
}

void Comm::rendezvous(Store& store, const Options& opts) {
  std::string mode = opts.transport.empty() ? knobs().transport : opts.transport;
  PLAIT_CHECK(mode == "auto" || mode == "shm" || mode == "tcp", "plait: unknown transport '", mode,
              "' (PLAIT_TRANSPORT / Options.transport take auto, shm, tcp)");
  // Every rank adds once per incarnation, so re-initialising over the same store gets fresh keys.
  int64_t epoch = (store.add("plait/epoch", 1) - 1) / size_;
  std::string prefix = cat("plait/", epoch, "/");
  prefix_ = prefix;
  // Rank 0 draws the incarnation's id and the job secret that authenticates every TCP connection (tcp.h).
  std::string uuid, secret;
  if (rank_ == 0) {
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
  size_t ringBytes = opts.shmRingBytes ? opts.shmRingBytes : knobs().shmRingBytes;
  std::string shmName = cat("/plait-", uuid, "-", rank_);
  // The segment itself is made once the local peers are known (its rings are for them only).
  const bool wantShm = mode != "tcp" && size_ > 1;
  if (size_ > 1) tcp_ = std::make_unique<TcpDomain>(rank_, size_, knobs().tcpStreams);
  std::string addr = tcp_ ? tcp_->listenAddress(opts.addressHint) : "-";
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
      {"algo (PLAIT_ALGO / Options.algo)", algoName(algo_)},
      {"transport (PLAIT_TRANSPORT / Options.transport)", mode},
      {"PLAIT_SHM_RING_BYTES / Options.shm_ring_bytes", cat(ringBytes)},
      {"PLAIT_TCP_STREAMS", cat(knobs().tcpStreams)},
      {"PLAIT_LINK_GBPS", cat(knobs().linkGbps)},
      {"PLAIT_LINK_ALPHA_US", cat(knobs().linkAlphaUs)},
      {"PLAIT_LINK_PROBE", cat(knobs().linkProbe)},
      {"PLAIT_DEVICE", knobs().device},
      {"PLAIT_DEVICE_BUFFER_BYTES", cat(knobs().deviceBufferBytes)},
  };
  std::string schedInfo;
  for (const auto& kv : sched) schedInfo += cat(schedInfo.empty() ? "" : "\t", kv.second);
  std::string myInfo = cat(hostId, "\n", getpid(), "\n", wantShm ? shmName : "-", "\n", addr, "\n", cores, "\n",
                           machine, "\n", schedInfo);
  store.set(cat(prefix, "info/", rank_), myInfo);

  std::vector<std::string> hosts(size_), shmNames(size_), addrs(size_);
  std::map<std::string, int> hostIndex;
  std::vector<int> coresOf(size_, 1);
  int onMachine = 0;
  std::map<std::string, std::pair<int, int>> machines;  // machine -> (ranks, cores)
  for (int p = 0; p < size_; ++p) {
    auto f = split(p == rank_ ? myInfo : store.get(cat(prefix, "info/", p)), '\n');
    PLAIT_CHECK(f.size() == 7, "plait: rank ", rank_, ": malformed rendezvous record from rank ", p,
                " (a different plait version?)");
    if (p != rank_) {
      auto theirs = split(f[6], '\t');
      PLAIT_CHECK(theirs.size() == sched.size(), "plait: rank ", rank_, ": rank ", p,
                  " runs a different plait version (its rendezvous record has ", theirs.size(), " knobs, not ",
                  sched.size(), ")");
      for (size_t i = 0; i < sched.size(); ++i)
        PLAIT_CHECK(theirs[i] == sched[i].second, "plait: ranks disagree on ", sched[i].first, ": rank ", p, " has ",
                    theirs[i], ", rank ", rank_, " has ", sched[i].second, " (group '", opts.groupName,
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
    hostOf_[p] = it->second;
  }
  topo_.nranks = size_;
  topo_.nhosts = int(hostIndex.size());
  hostRanks_.assign(hostIndex.size(), {});
  for (int p = 0; p < size_; ++p) hostRanks_[hostOf_[p]].push_back(p);
  for (const auto& h : hostRanks_) topo_.maxLocal = std::max(topo_.maxLocal, int(h.size()));
  int localRanks = 0;
  std::vector<int> shmPeers, tcpPeers;
  for (int p = 0; p < size_; ++p) {
    if (hosts[p] == hostId) ++localRanks;
    if (p == rank_) continue;
    bool local = hosts[p] == hostId;
    if (mode == "shm")
      PLAIT_CHECK(local, "plait: rank ", rank_, ": PLAIT_TRANSPORT=shm but peer rank ", p, " is on another host (",
                  hosts[p], ")");
    if (local && mode != "tcp") shmPeers.push_back(p);
    else tcpPeers.push_back(p);
  }
  if (!shmPeers.empty()) {
    std::vector<int> local = shmPeers;
    local.push_back(rank_);
    std::sort(local.begin(), local.end());
    // A rank that cannot make its segment says so under its key, so its local peers raise with the reason instead
    // of waiting for the segment until the store's timeout.
    try {
      shm_ = std::make_unique<ShmDomain>(shmName, rank_, local, ringBytes);
    } catch (const std::exception& e) {
      store.set(cat(prefix, "shm/", rank_), cat("error: ", e.what()));
      throw;
    }
    store.set(cat(prefix, "shm/", rank_), "ok");
    for (int p : shmPeers) {
      std::string st = store.get(cat(prefix, "shm/", p));
      PLAIT_CHECK(st == "ok", "plait: rank ", rank_, ": local peer rank ", p,
                  " could not set up shared memory: ", st.substr(std::min<size_t>(st.size(), 7)));
    }
  }
  topo_.allShm = tcpPeers.empty() && size_ > 1 && shm_ != nullptr;
  if (mode == "tcp") topo_.allShm = false;
  oversubscribed_ = onMachine > cores;
  for (const auto& m : machines) topo_.cpuLoad = std::max(topo_.cpuLoad, double(m.second.first) / m.second.second);
  // The same on every rank: the cost model must not see different inputs on different ranks.
  std::vector<int> ranksOnHost(hostIndex.size(), 0);
  for (int p = 0; p < size_; ++p) ++ranksOnHost[hostOf_[p]];
  for (int p = 0; p < size_; ++p) topo_.oversubscribed |= ranksOnHost[hostOf_[p]] > coresOf[p];
  reduceThreads_ = knobs().threads > 0 ? knobs().threads : std::max(1, std::min(8, cores / localRanks));

  if (shm_) {
    // Once every local peer has mapped this rank's segment its name can go: nothing is left in /dev/shm. A rank that
    // cannot map a peer's segment says why under its key, so the others raise instead of waiting out the store.
    try {
      for (int p : shmPeers) {
        PLAIT_CHECK(shmNames[p] != "-", "plait: rank ", rank_, ": peer rank ", p, " has no shared memory segment");
        shm_->attach(p, shmNames[p]);
      }
    } catch (const std::exception& e) {
      store.set(cat(prefix, "mapped/", rank_), cat("error: ", e.what()));
      throw;
    }
    store.set(cat(prefix, "mapped/", rank_), "ok");
    for (int p : shmPeers) {
      std::string st = store.get(cat(prefix, "mapped/", p));
      PLAIT_CHECK(st == "ok", "plait: rank ", rank_, ": local peer rank ", p,
                  " could not map shared memory: ", st.substr(std::min<size_t>(st.size(), 7)));
    }
    shm_->unlinkOwn();
  }
  if (tcp_) {
    tcp_->connectAll(tcpPeers, addrs, fromHex(secret), prefix + uuid, timeout().count());
    tcp_->closeListener();
  }
  for (int p : shmPeers) channels_[p] = shm_->channel(p);
  for (int p : tcpPeers) {
    // Errors on this link name the peer's host and every rank on it: losing a host loses all of them.
    std::string onHost;
    for (int q = 0; q < size_; ++q)
      if (hostOf_[q] == hostOf_[p]) onHost += cat(onHost.empty() ? "" : ", ", q);
    std::string where = addrs[p].substr(0, addrs[p].rfind(':'));
    channels_[p] = tcp_->channel(p, cat("peer rank ", p, " on host ", where, " (ranks ", onHost, ")"));
  }
  if (tcpPeers.empty()) tcp_.reset();
  computeLinkLoads(topo_, hostOf_);
  if (topo_.nhosts > 1) probeLink(store);
  if (infoEnabled())
    logInfo(cat("rank ", rank_, "/", size_, " group '", opts.groupName, "': ", topo_.nhosts, " host(s), ",
                shmPeers.size(), " shm peer(s), ", tcpPeers.size(), " tcp peer(s), kernels ", kernelIsa(),
                ", algo ", algoName(algo_), ", chunk ", chunkBytes_, " B",
                topo_.nhosts > 1 ? cat(", inter-host link ", topo_.linkAlphaUs, " us + ",
                                       1e-3 / topo_.linkUsPerByte, " GB/s (", topo_.linkSource, ")")
                                 : std::string()));
}

void Comm::rawIo(int peer, void* buf, size_t n, bool isWrite, Clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  Channel* ch = channels_[peer].get();
  while (n > 0) {
    size_t k = isWrite ? ch->write(p, n) : ch->read(p, n);
    p += k, n -= k;
    if (k == 0) {
      PLAIT_CHECK(Clock::now() < deadline, "plait: rank ", rank_, ": timed out measuring the link to rank ", peer);
      pollfd pfd{ch->pollFd(isWrite), short(isWrite ? POLLOUT : POLLIN), 0};
      poll(&pfd, 1, 1);
    }
  }
}

void Comm::probeLink(Store& store) {
  const std::string key = prefix_ + "link";
  const int nh = int(hostRanks_.size());
  if (knobs().linkGbps > 0 || !knobs().linkProbe) {
    // Set by hand (or probing is off): every rank reads the same environment, no exchange needed.
    topo_.linkAlphaUs = knobs().linkAlphaUs > 0 ? knobs().linkAlphaUs : 30.0;
    topo_.linkUsPerByte = knobs().linkGbps > 0 ? 8e-3 / knobs().linkGbps : 1.0 / 1000.0;
    topo_.linkSource = knobs().linkGbps > 0 ? "PLAIT_LINK_GBPS" : "default, PLAIT_LINK_PROBE=0";
    return;
  }
  int me = -1;  // this rank's index among the host leaders
  for (int h = 0; h < nh; ++h)
    if (hostRanks_[h][0] == rank_) me = h;
  if (me >= 0) {
    const auto deadline = Clock::now() + timeout();
    double alpha = 0;
    if (me <= 1) {
      // Latency: ping-pong of 8 bytes between the leaders of hosts 0 and 1; half the median round trip.
      const int peer = hostRanks_[1 - me][0];
      std::vector<double> rtt;
      uint64_t token = 0;
      for (int i = 0; i < 21; ++i) {
        auto t0 = Clock::now();
        if (me == 0) {
          rawIo(peer, &token, 8, true, deadline);
          rawIo(peer, &token, 8, false, deadline);
        } else {
          rawIo(peer, &token, 8, false, deadline);
          rawIo(peer, &token, 8, true, deadline);
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
    const int next = hostRanks_[(me + 1) % nh][0], prev = hostRanks_[(me + nh - 1) % nh][0];
    size_t size = 1 << 20;
    std::vector<char> out, in;
    double usPerByte = 0;
    int extra = 0;
    for (int round = 0;; ++round) {
      out.resize(size);
      in.resize(size);
      size_t sent = 0, got = 0;
      Clock::time_point quarter{};
      Channel* tx = channels_[next].get();
      Channel* rx = channels_[prev].get();
      while (sent < size || got < size) {
        size_t w = sent < size ? tx->write(out.data() + sent, size - sent) : 0;
        size_t r = got < size ? rx->read(in.data() + got, size - got) : 0;
        sent += w;
        if (got < size / 4 && got + r >= size / 4) quarter = Clock::now();
        got += r;
        if (w == 0 && r == 0) {
          PLAIT_CHECK(Clock::now() < deadline, "plait: rank ", rank_, ": timed out measuring the link to ranks ",
                      prev, " and ", next);
          pollfd pfd[2] = {{tx->pollFd(true), short(sent < size ? POLLOUT : 0), 0},
                           {rx->pollFd(false), short(got < size ? POLLIN : 0), 0}};
          poll(pfd, 2, 1);
        }
      }
      double dt = std::chrono::duration<double, std::micro>(Clock::now() - quarter).count();
      store.set(cat(prefix_, "probe/", round, "/", me), cat(dt));
      double worst = 0;
      for (int h = 0; h < nh; ++h)
        worst = std::max(worst, std::atof(store.get(cat(prefix_, "probe/", round, "/", h)).c_str()));
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
  PLAIT_CHECK(f.size() == 2, "plait: rank ", rank_, ": malformed link measurement in the store");
  topo_.linkAlphaUs = std::atof(f[0].c_str());
  topo_.linkUsPerByte = std::atof(f[1].c_str());
  topo_.linkSource = cat("measured across ", nh, " host leaders");
}

std::string Comm::where() const { return cat("rank ", rank_, ", ", collName(ctx_.coll), " seq ", seq_); }

void Comm::begin(const CollCtx& ctx) {
  checkAbort();
  if (!failure_.empty())
    throw Error(cat("plait: rank ", rank_, ": the process group is unusable after an earlier error: ", failure_));
  PLAIT_CHECK(pendingColl_ == 0, "plait: internal: a collective began with transfers still pending");
  if (dev_) {
    checkDeviceErrors();
    // Device work never makes the host wait, so this is where a dead peer is noticed between the watchdog's checks;
    // at most every 10 ms (a handful of fcntl calls), not on every small collective.
    auto now = Clock::now();
    if (now - lastDevCheck_ > std::chrono::milliseconds(10)) {
      lastDevCheck_ = now;
      checkDevicePeers();
    }
  }
  trimXfers();
  ctx_ = ctx;
  if (ctx.coll != Coll::kSendRecv) ++seq_;
  ++stats_.collectives;
  elemBytes_ = dtypeSize(ctx.dtype);
  reduceFn_ = nullptr;
  if (ctx.coll == Coll::kAllreduce || ctx.coll == Coll::kReduce || ctx.coll == Coll::kReduceScatter)
    reduceFn_ = reduceFn(ctx.op, ctx.dtype);
}

Comm::Xfer* Comm::post(Xfer::Kind kind, int peer, void* buf, size_t bytes, const Xfer* dep) {
  PLAIT_CHECK(peer >= 0 && peer < size_ && peer != rank_ && channels_[peer], "plait: internal: bad peer ", peer);
  if (devActive_ && dev_) {
    PLAIT_CHECK(ctx_.coll != Coll::kSendRecv, "plait: internal: point-to-point in device mode");
    // Device transfers live apart from the host engine's: point-to-point transfers still in flight there (an irecv
    // posted before this collective) must survive the device collective's waitAll.
    devXfers_.push_back(Xfer{kind, peer, static_cast<char*>(buf), bytes, dep});
    dev_->record(&devXfers_.back(), ctx_.op, ctx_.dtype);
    return &devXfers_.back();
  }
  xfers_.push_back(Xfer{kind, peer, static_cast<char*>(buf), bytes, dep});
  Xfer* x = &xfers_.back();
  const bool p2p = ctx_.coll == Coll::kSendRecv;
  uint32_t seq = !p2p ? seq_ : kind == Xfer::kSend ? p2pSendSeq_[peer]++ : p2pRecvSeq_[peer]++;
  x->hdr = WireHeader{kWireMagic, seq, uint8_t(ctx_.coll), uint8_t(ctx_.dtype), uint8_t(ctx_.op),
                      p2p ? uint8_t(0) : ctx_.sched, ctx_.root, ctx_.count, bytes};
  x->pad = uint8_t((8 - bytes % 8) % 8);
  (kind == Xfer::kSend ? sendQ_ : p2p ? p2pRecvQ_ : recvQ_)[peer].push_back(x);
  ++pending_;
  if (!p2p) ++pendingColl_;
  return x;
}

Comm::Xfer* Comm::postSend(int peer, const void* buf, size_t bytes, const Xfer* dep) {
  return post(Xfer::kSend, peer, const_cast<void*>(buf), bytes, dep);
}

Comm::Xfer* Comm::postRecv(int peer, void* buf, size_t bytes, const Xfer* dep) {
  return post(Xfer::kRecv, peer, buf, bytes, dep);
}

Comm::Xfer* Comm::postRecvReduce(int peer, void* buf, size_t bytes, const Xfer* dep) {
  PLAIT_CHECK(reduceFn_ != nullptr, "plait: internal: receive-reduce outside a reducing collective");
  return post(Xfer::kRecvReduce, peer, buf, bytes, dep);
}

char* Comm::scratch(size_t bytes) {
  if (devActive_ && dev_) return dev_->scratch(bytes);
  if (scratch_.size() < bytes) scratch_.resize(bytes);
  return scratch_.data();
}

namespace {
// Failure-bookkeeping threads still talking to a store (see recordFailure): past a few, the store is not answering
// and more threads would only queue behind the same dead connection.
std::atomic<int> gStoreThreads{0};
constexpr int kMaxStoreThreads = 4;
}  // namespace

std::string Comm::recordFailure(const std::string& what, bool wantOrigin) {
  // The store's part of a failure: look up the first failure in the group (one key, written once by the rank that
  // wins an add on "failures"; only when wantOrigin), then record this one. It runs on a thread of its own and the
  // failing thread waits for both at most a second: with the store's host gone silent (no FIN, no RST), a store
  // round trip blocks for the store's own timeout or longer, and the error must reach the caller now. What did not
  // finish in time costs the message its "first failure" detail (and the group its record, if it never gets
  // through); the thread finishes, or stays blocked in the store client, on its own: it holds nothing of this
  // communicator but the store. While it is blocked, other users of the same store client may wait behind it (the
  // store is not answering them either).
  struct Outcome {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::string origin;
  };
  if (gStoreThreads.load() >= kMaxStoreThreads) return "";
  auto out = std::make_shared<Outcome>();
  std::shared_ptr<Store> store = store_;
  const std::string prefix = prefix_, mine = cat("rank ", rank_, ": ", what);
  gStoreThreads.fetch_add(1);
  try {
    std::thread([out, store, prefix, mine, wantOrigin] {
      std::string origin;
      try {
        const std::string key = cat(prefix, "failed/first");
        if (wantOrigin && store->check(key)) {
          std::string v = store->get(key);
          if (!v.empty()) origin = cat(" (first failure in the group: ", v, ")");
        }
        if (store->add(cat(prefix, "failures"), 1) == 1) store->set(cat(prefix, "failed/first"), mine);
      } catch (abi::__forced_unwind&) {
        gStoreThreads.fetch_sub(1);
        throw;  // thread cancellation (pthread_exit while the interpreter finalizes): must not be swallowed
      } catch (...) {
        // the store may be gone with the failed rank: report what this rank saw
      }
      {
        std::lock_guard<std::mutex> g(out->m);
        out->origin = std::move(origin);
        out->done = true;
      }
      out->cv.notify_all();
      gStoreThreads.fetch_sub(1);
    }).detach();
  } catch (...) {
    gStoreThreads.fetch_sub(1);
    return "";  // no thread to be had: the failure goes on without the store
  }
  auto wait = timeout();
  if (wait.count() <= 0 || wait > std::chrono::milliseconds(1000)) wait = std::chrono::milliseconds(1000);
  std::unique_lock<std::mutex> lk(out->m);
  out->cv.wait_for(lk, wait, [&] { return out->done; });
  return out->done ? out->origin : std::string();
}

void Comm::fail(const std::string& what, bool secondHand) {
  // A rank that learns of a failure second-hand (abort flag, a peer hanging up) adds what the first one saw: from
  // the failed peer's control connection if it said anything, else from the store.
  // Peers hear of the failure before any store round trip (shared-memory abort flags, TCP control connections), so a
  // dead store host costs nobody a timeout. What a failed TCP peer said on its control connection (local, at most
  // 50 ms) goes with it, so the original cause travels on; the store's record of the first failure is looked up
  // after the peers were told.
  const bool first = failure_.empty();
  std::string msg = what;
  std::string heard;
  if (first && !secondHand && tcp_) {
    heard = heardFromTcpPeers(std::chrono::milliseconds(50));
    if (!heard.empty()) msg = cat(what, " (", heard, ")");
  }
  if (first) {
    if (shm_) shm_->abortPeers(msg);
    if (tcp_) tellTcpPeers(msg);
  }
  if (first) {
    std::string origin = recordFailure(what, !secondHand && heard.empty());
    if (!secondHand && heard.empty()) msg = what + origin;
    failure_ = msg;
  }
  std::vector<Done> toNotify;
  for (auto* qs : {&sendQ_, &recvQ_, &p2pRecvQ_})
    for (auto& q : *qs) {
      for (Xfer* x : q)
        if (x->onDone) toNotify.push_back(std::move(x->onDone));
      q.clear();
    }
  std::vector<AnyDone> anyNotify;
  for (auto& a : anyQ_) anyNotify.push_back(std::move(a.done));
  anyQ_.clear();
  for (auto& u : unexpected_) u.clear();
  for (auto& i : in_) i = Inbound{};
  pending_ = pendingColl_ = 0;
  if (tcp_) tcp_->abortAll();
  if (dev_) dev_->releaseWaits();
  // Callbacks must not throw (the torch layer's do not); one that does cannot stop the others from being told.
  for (auto& d : toNotify) try {
      d(&msg);
    } catch (...) {
    }
  for (auto& d : anyNotify) try {
      d(&msg, -1);
    } catch (...) {
    }
  throw Error(msg);
}

void Comm::tellTcpPeers(const std::string& msg) {
  // Each TCP peer pair has a control connection beside the data streams, idle until a rank fails: then the
  // failing rank writes its error there (a few hundred bytes, always fits the socket buffer), so the cause
  // travels with the failure even when the data stream stopped mid-message and the rendezvous store died with
  // the failed rank.
  const size_t n = std::min<size_t>(msg.size(), 1024);
  std::vector<char> frame(sizeof(WireHeader) + n);
  WireHeader h{kAbortMagic, 0, 0, 0, 0, 0, rank_, 0, n};
  std::memcpy(frame.data(), &h, sizeof(h));
  std::memcpy(frame.data() + sizeof(h), msg.data(), n);
  for (int p = 0; p < size_; ++p)
    if (channels_[p] && channels_[p]->kind() == TransportKind::kTcp)
      send(tcp_->controlFd(p), frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

std::string Comm::heardFromTcpPeers(std::chrono::milliseconds wait) {
  const auto until = Clock::now() + wait;
  while (true) {
    std::vector<pollfd> fds;
    std::vector<int> who;
    for (int p = 0; p < size_; ++p)
      if (channels_[p] && channels_[p]->kind() == TransportKind::kTcp) {
        fds.push_back(pollfd{tcp_->controlFd(p), POLLIN, 0});
        who.push_back(p);
      }
    if (fds.empty()) return "";
    int ms = int(std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count()));
    if (poll(fds.data(), fds.size(), ms) <= 0) return "";
    for (size_t i = 0; i < fds.size(); ++i) {
      if (!(fds[i].revents & POLLIN)) continue;
      char buf[sizeof(WireHeader) + 1024];
      // The frame was written in one send before the peer closed: it is all there or not at all.
      ssize_t r = recv(fds[i].fd, buf, sizeof(buf), MSG_DONTWAIT);
      WireHeader h{};
      if (r >= ssize_t(sizeof(h))) std::memcpy(&h, buf, sizeof(h));
      if (r >= ssize_t(sizeof(h)) && h.magic == kAbortMagic)
        return cat("peer rank ", who[i], " failed first: ",
                   std::string(buf + sizeof(h), std::min<size_t>(h.bytes, size_t(r) - sizeof(h))));
    }
    if (Clock::now() >= until) return "";
  }
}

static std::string describeSchedule(uint8_t code) {
  if (code == 0) return "";
  const int a = (code & 0x7f) - 1;
  std::string name = a >= 0 && a <= int(Algo::kHierTree) ? algoName(Algo(a)) : "?";
  if (Algo(a) == Algo::kDirect) name += code & 0x80 ? " one-shot" : " two-shot";
  return cat(", schedule ", name);
}

static std::string describeHeader(const WireHeader& h) {
  DType dt = DType(h.dtype);
  return cat(collName(Coll(h.coll)), "(seq ", h.seq, ", dtype ", dt < DType::kCount ? dtypeName(dt) : "?", ", op ",
             RedOp(h.op) < RedOp::kCount ? redOpName(RedOp(h.op)) : "?", ", count ", h.count,
             Coll(h.coll) == Coll::kSendRecv ? ", tag " : ", root ", h.root, describeSchedule(h.flags), ", message ",
             h.bytes, " bytes)");
}

void Comm::checkHeader(const Xfer* x, const WireHeader& got) const {
  const WireHeader& e = x->hdr;
  PLAIT_CHECK(got.magic == kWireMagic, "plait: rank ", rank_, ": garbage on the stream from peer rank ", x->peer,
              " during ", where(), " (bad magic)");
  bool same = got.seq == e.seq && got.coll == e.coll && got.count == e.count && got.bytes == e.bytes &&
              got.root == e.root && got.flags == e.flags;
  bool reducing = Coll(e.coll) == Coll::kAllreduce || Coll(e.coll) == Coll::kReduce ||
                  Coll(e.coll) == Coll::kReduceScatter;
  if (reducing) same = same && got.op == e.op;
  if (Coll(e.coll) != Coll::kBarrier && Coll(e.coll) != Coll::kMonitoredBarrier) same = same && got.dtype == e.dtype;
  if (!same)
    throw Error(cat("plait: ", Coll(e.coll) == Coll::kSendRecv ? "point-to-point" : "collective",
                    " mismatch between rank ", rank_, " and rank ", x->peer, ": rank ", x->peer,
                    " sent ", describeHeader(got), " but rank ", rank_, " expected ", describeHeader(e)));
}

bool Comm::advanceSend(Xfer* x) {
  Channel* ch = channels_[x->peer].get();
  bool moved = false;
  constexpr size_t kSmall = 224;  // header and a small payload go out as one write
  static const char kZeros[8] = {};
  if (x->hdrDone == 0 && x->len <= kSmall && (!x->dep || x->dep->done >= x->len)) {
    alignas(16) char msg[sizeof(WireHeader) + kSmall + 8];
    std::memcpy(msg, &x->hdr, sizeof(WireHeader));
    if (x->len) std::memcpy(msg + sizeof(WireHeader), x->buf, x->len);
    std::memset(msg + sizeof(WireHeader) + x->len, 0, x->pad);
    size_t w = ch->write(msg, sizeof(WireHeader) + x->len + x->pad);
    x->hdrDone = std::min(w, sizeof(WireHeader));
    x->done = std::min(w - x->hdrDone, x->len);
    x->padDone = uint8_t(w - x->hdrDone - x->done);
    return w > 0;
  }
  if (x->hdrDone < sizeof(WireHeader)) {
    size_t w = ch->write(reinterpret_cast<char*>(&x->hdr) + x->hdrDone, sizeof(WireHeader) - x->hdrDone);
    x->hdrDone += w;
    if (x->hdrDone < sizeof(WireHeader)) return w > 0;
    moved = true;
  }
  size_t limit = x->dep ? std::min(x->len, x->dep->done) : x->len;
  if (x->done < limit) {
    size_t w = ch->write(x->buf + x->done, std::min(limit - x->done, chunkBytes_));
    x->done += w;
    moved |= w > 0;
  }
  if (x->done == x->len && x->padDone < x->pad) {
    size_t w = ch->write(kZeros, size_t(x->pad - x->padDone));
    x->padDone = uint8_t(x->padDone + w);
    moved |= w > 0;
  }
  return moved;
}

bool Comm::advanceRecv(Xfer* x) {
  Channel* ch = channels_[x->peer].get();
  bool moved = false;
  size_t limit = x->dep ? std::min(x->len, x->dep->done) : x->len;
  if (x->done < limit) {
    if (x->kind == Xfer::kRecv) {
      size_t r = ch->read(x->buf + x->done, std::min(limit - x->done, chunkBytes_));
      x->done += r;
      moved = r > 0;
    } else {
      const size_t es = elemBytes_;
      size_t want = std::min(limit - x->done, std::max(chunkBytes_, es));
      const void* p = nullptr;
      size_t n = std::min(ch->peek(&p), want);
      n -= n % es;
      if (n > 0) {
        reduceFn_(x->buf + x->done, x->buf + x->done, p, n / es);
        ch->consume(n);
        x->done += n;
        moved = true;
      } else if (want >= es && ch->available() >= es) {  // an element split where a TCP receive buffer ends
        alignas(16) char tmp[16];
        ch->read(tmp, es);
        reduceFn_(x->buf + x->done, x->buf + x->done, tmp, 1);
        x->done += es;
        moved = true;
      }
    }
  }
  if (x->done == x->len && x->padDone < x->pad) {
    char tmp[8];
    size_t r = ch->read(tmp, size_t(x->pad - x->padDone));
    x->padDone = uint8_t(x->padDone + r);
    moved |= r > 0;
  }
  return moved;
}

bool Comm::wantRead(int p) const {
  const Inbound& in = in_[p];
  return !recvQ_[p].empty() || !p2pRecvQ_[p].empty() || (!anyQ_.empty() && !in.quiet) || in.x || in.unx ||
         in.hdrDone > 0;
}

Comm::Xfer* Comm::bindAny(size_t k, int peer) {
  AnyRecv a = std::move(anyQ_[k]);
  anyQ_.erase(anyQ_.begin() + long(k));
  --pending_;  // the bound transfer below counts instead
  xfers_.push_back(Xfer{Xfer::kRecv, peer, a.buf, a.len, nullptr});
  Xfer* x = &xfers_.back();
  x->hdr = WireHeader{kWireMagic, p2pRecvSeq_[peer]++, uint8_t(Coll::kSendRecv), uint8_t(DType::kUInt8),
                      uint8_t(RedOp::kSum), 0, a.tag, a.len, a.len};
  x->pad = uint8_t((8 - a.len % 8) % 8);
  x->deadline = a.deadline;
  AnyDone done = std::move(a.done);
  x->onDone = [done = std::move(done), peer](const std::string* err) { done(err, err ? -1 : peer); };
  p2pRecvQ_[peer].push_back(x);
  ++pending_;
  return x;
}

bool Comm::bindP2P(int peer, const WireHeader& h) {
  if (!unexpected_[peer].empty()) return false;  // older messages from this peer are still unclaimed: keep order
  if (p2pRecvQ_[peer].empty()) {
    size_t k = 0;
    while (k < anyQ_.size() && anyQ_[k].tag != h.root) ++k;
    if (k == anyQ_.size()) return false;
    bindAny(k, peer);
  }
  Xfer* x = p2pRecvQ_[peer].front();
  x->got = h;
  x->hdrDone = sizeof(WireHeader);
  checkHeader(x, h);
  in_[peer].x = x;
  return true;
}

void Comm::matchUnexpected(int peer) {
  auto& uq = unexpected_[peer];
  while (!uq.empty() && uq.front().complete()) {
    Unexpected& u = uq.front();
    if (p2pRecvQ_[peer].empty()) {
      size_t k = 0;
      while (k < anyQ_.size() && anyQ_[k].tag != u.hdr.root) ++k;
      if (k == anyQ_.size()) return;
      bindAny(k, peer);
    }
    Xfer* x = p2pRecvQ_[peer].front();
    x->got = u.hdr;
    x->hdrDone = sizeof(WireHeader);
    checkHeader(x, u.hdr);
    if (x->len) std::memcpy(x->buf, u.data.data(), x->len);
    x->done = x->len;
    x->padDone = x->pad;
    uq.pop_front();
    p2pRecvQ_[peer].pop_front();
    retire(x);
  }
}

void Comm::matchUnexpectedOrFail(int peer) {
  try {
    matchUnexpected(peer);
  } catch (const std::exception& e) {
    fail(e.what());
  }
}

bool Comm::progressRecv(int p) {
  Channel* ch = channels_[p].get();
  Inbound& in = in_[p];
  bool moved = false;
  while (true) {
    if (!in.x && !in.unx) {
      if (in.hdrDone < sizeof(WireHeader)) {
        // A new message is read only for a receive posted from this peer (or one from any source): a peer that
        // finished and closed its connection has nothing more to say, and reading on would find the end of stream.
        const bool directed = !recvQ_[p].empty() || !p2pRecvQ_[p].empty();
        if (!directed && (anyQ_.empty() || in.quiet)) return moved;
        size_t r = 0;
        try {
          r = ch->read(reinterpret_cast<char*>(&in.hdr) + in.hdrDone, sizeof(WireHeader) - in.hdrDone);
        } catch (const Error&) {
          if (directed || in.hdrDone > 0) throw;
          in.quiet = true;  // only a receive from any source was listening: this peer is done, not failed
          return moved;
        }
        in.hdrDone += r;
        moved |= r > 0;
        if (in.hdrDone < sizeof(WireHeader)) return moved;
        PLAIT_CHECK(in.hdr.magic == kWireMagic, "plait: rank ", rank_, ": garbage on the stream from peer rank ", p,
                    " during ", where(), " (bad magic)");
      }
      if (Coll(in.hdr.coll) == Coll::kSendRecv) {
        if (!bindP2P(p, in.hdr)) {
          // Nobody asked for it yet: buffer it, so that a collective behind it on the stream is not held up.
          uint64_t n = in.hdr.bytes;
          PLAIT_CHECK(n <= (uint64_t(1) << 40), "plait: rank ", rank_, ": peer rank ", p,
                      " announced a point-to-point message of ", n, " bytes (corrupt stream?)");
          unexpected_[p].push_back(Unexpected{in.hdr, std::vector<char>(size_t(n)), 0});
          in.unx = &unexpected_[p].back();
        }
      } else {
        if (recvQ_[p].empty()) return moved;  // parked until this rank's collective posts its receive
        Xfer* x = recvQ_[p].front();
        x->got = in.hdr;
        x->hdrDone = sizeof(WireHeader);
        checkHeader(x, in.hdr);
        in.x = x;
      }
      in.hdrDone = 0;
      moved = true;
    }
    if (in.unx) {
      Unexpected& u = *in.unx;
      const size_t total = u.data.size() + (8 - u.hdr.bytes % 8) % 8;
      char pad[8];
      while (u.got < total) {
        size_t r = u.got < u.data.size() ? ch->read(u.data.data() + u.got, u.data.size() - u.got)
                                         : ch->read(pad, total - u.got);
        if (r == 0) return moved;
        u.got += r;
        moved = true;
      }
      in.unx = nullptr;
      matchUnexpected(p);
      continue;
    }
    Xfer* x = in.x;
    moved |= advanceRecv(x);
    if (!finished(x)) return moved;
    in.x = nullptr;
    auto& q = x->onDone ? p2pRecvQ_[p] : recvQ_[p];
    PLAIT_CHECK(!q.empty() && q.front() == x, "plait: internal: rank ", rank_, ": receive queue out of order");
    q.pop_front();
    retire(x);
  }
}

void Comm::trimXfers() {
  // Transfers finish roughly in posting order; dependencies only point within one collective, which is over.
  if (pending_ == 0) xfers_.clear();
  while (!xfers_.empty() && finished(&xfers_.front())) xfers_.pop_front();
}

void Comm::retire(Xfer* x) {
  --pending_;
  if (x->onDone) {
    Done d = std::move(x->onDone);
    x->onDone = nullptr;
    try {
      d(nullptr);
    } catch (const std::exception& e) {
      // The completion itself failed (the torch layer's copy into a non-contiguous destination raised): its owner
      // hears the error through the same callback, and the communicator fails (drive), so no transfer that may
      // point at memory its owner is about to free stays queued.
      std::string m = cat("plait: rank ", rank_, ": completing a ", x->kind == Xfer::kSend ? "send to" : "recv from",
                          " rank ", x->peer, " failed: ", e.what());
      try {
        d(&m);
      } catch (...) {
      }
      throw Error(m);
    }
  } else {
    --pendingColl_;
  }
}

bool Comm::progressPass() {
  bool moved = false;
  for (int p = 0; p < size_; ++p) {
    auto& sq = sendQ_[p];
    while (!sq.empty()) {
      Xfer* x = sq.front();
      moved |= advanceSend(x);
      if (!finished(x)) break;
      sq.pop_front();
      retire(x);
    }
    if (channels_[p] && wantRead(p)) moved |= progressRecv(p);
  }
  return moved;
}

std::string Comm::describePending() const {
  std::string s;
  for (int p = 0; p < size_; ++p) {
    if (!sendQ_[p].empty()) {
      const Xfer* x = sendQ_[p].front();
      s += cat(s.empty() ? "" : "; ", "send to rank ", p, " (", x->done, "/", x->len, " bytes)");
    }
    for (const auto* q : {&recvQ_[p], &p2pRecvQ_[p]}) {
      if (q->empty()) continue;
      const Xfer* x = q->front();
      s += cat(s.empty() ? "" : "; ", x->onDone ? "point-to-point " : "", "receive from rank ", p, " (", x->done, "/",
               x->len, " bytes", x->hdrDone < sizeof(WireHeader) ? ", nothing arrived" : "", ")");
    }
  }
  if (!anyQ_.empty()) s += cat(s.empty() ? "" : "; ", anyQ_.size(), " receive(s) from any source");
  return s;
}

void Comm::checkPeersAlive() {
  // A local peer that failed leaves its error in this rank's segment before it exits: check that first, so the
  // error names the original failure even when the rendezvous store went away with the failed rank.
  if (shm_) {
    std::string why;
    int by = shm_->abortedBy(&why);
    if (by >= 0)
      throw PeerFailed(cat("plait: rank ", rank_, ": ", where(), " aborted because peer rank ", by, " failed: ", why));
  }
  for (int p = 0; p < size_; ++p) {
    // Only peers something is waiting for: a peer that exits after its last send is not a failure for a receive
    // from any source that another peer may still satisfy (that one ends at its timeout if nobody does).
    // A collective's header parked with nothing posted is not a wait either (its payload is in the ring).
    const Inbound& in = in_[p];
    if (p == rank_ || (sendQ_[p].empty() && recvQ_[p].empty() && p2pRecvQ_[p].empty() && !in.x && !in.unx))
      continue;
    if (!channels_[p] || channels_[p]->kind() != TransportKind::kShm) continue;
    if (shm_->peerGone(p)) {
      // A peer that wrote its last message and then exited is gone, but what it wrote is in the ring: it died
      // only if nothing more can be moved (the caller checks again once the engine is idle).
      if (progressPass()) return;
      throw Error(cat("plait: rank ", rank_, ": peer rank ", p, " (same host) died during ", where()));
    }
  }
}

void Comm::addTcpPollFds(std::vector<pollfd>& fds) const {
  fds.push_back(pollfd{wakeFd_, POLLIN, 0});
  for (int p = 0; p < size_; ++p) {
    if (!channels_[p] || channels_[p]->kind() != TransportKind::kTcp) continue;
    if (wantRead(p)) {
      // Not when the bound receive can take nothing now (it waits on a dependency), nor for a collective's header
      // parked until the collective is posted: the socket would stay readable and poll would return at once.
      const Inbound& in = in_[p];
      bool blocked = in.x && (in.x->dep ? std::min(in.x->len, in.x->dep->done) : in.x->len) <= in.x->done &&
                     in.x->done < in.x->len;
      bool parked = !in.x && !in.unx && in.hdrDone == sizeof(WireHeader);
      if (!blocked && !parked) fds.push_back(pollfd{channels_[p]->pollFd(false), POLLIN, 0});
    }
    if (sendQ_[p].empty()) continue;
    const Xfer* x = sendQ_[p].front();
    size_t limit = x->dep ? std::min(x->len, x->dep->done) : x->len;
    if (x->hdrDone < sizeof(WireHeader) || x->done < limit || (x->done == x->len && x->padDone < x->pad))
      fds.push_back(pollfd{channels_[p]->pollFd(true), POLLOUT, 0});
  }
}

bool Comm::slowWait(bool anyShm, bool anyTcp) {
  if (anyShm && anyTcp && shm_->bellFd() >= 0) {
    // Both at once (a host leader in a hierarchical collective): one poll(2) on the TCP sockets and the shared-memory
    // doorbell socket, so data from either side wakes this rank at once.
    shm_->announcePoll();
    if (progressPass()) {
      shm_->retractPoll();
      return true;
    }
    std::vector<pollfd> fds{pollfd{shm_->bellFd(), POLLIN, 0}};
    addTcpPollFds(fds);
    poll(fds.data(), fds.size(), 2);
    shm_->retractPoll();
    drainWake();
    return false;
  }
  if (anyTcp) {
    std::vector<pollfd> fds;
    addTcpPollFds(fds);
    poll(fds.data(), fds.size(), anyShm ? 0 : 2);
    drainWake();
  }
  if (anyShm) {
    uint32_t ticket = shm_->announce();
    if (progressPass()) {  // something arrived while announcing: no sleep
      shm_->retract();
      return true;
    }
    shm_->sleep(ticket, anyTcp ? 200 : 2000);
  } else if (!anyTcp) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return false;
}

void Comm::drainWake() {
  uint64_t v;
  while (read(wakeFd_, &v, sizeof(v)) > 0) {
  }
}

void Comm::checkP2PDeadlines(Clock::time_point now) {
  for (auto* qs : {&sendQ_, &p2pRecvQ_})
    for (int p = 0; p < size_; ++p) {
      auto& q = (*qs)[p];
      if (q.empty() || !q.front()->onDone || now < q.front()->deadline) continue;
      const Xfer* x = q.front();
      throw Error(cat("plait: rank ", rank_, ": Timed out after ", timeout().count(), " ms in ",
                      x->kind == Xfer::kSend ? "send to" : "recv from", " rank ", p, " (tag ", x->hdr.root, ", ",
                      x->done, "/", x->len, " bytes done)"));
    }
  for (const AnyRecv& a : anyQ_)
    if (now >= a.deadline)
      throw Error(cat("plait: rank ", rank_, ": Timed out after ", timeout().count(),
                      " ms in recv from any source (tag ", a.tag, ", ", a.len, " bytes): no peer sent it"));
}

bool Comm::waitAll(std::chrono::milliseconds timeout, bool throwOnTimeout) {
  if (devActive_ && dev_) {  // enqueue: the device does the waiting
    try {
      dev_->flush();
    } catch (const PeerFailed& e) {
      devXfers_.clear();
      fail(e.what(), true);
    } catch (const std::exception& e) {
      // The stream may hold half a schedule: the group cannot be trusted any more, and peers must hear of it.
      devXfers_.clear();
      fail(cat(e.what(), " (", where(), ", device)"));
    }
    devXfers_.clear();
    checkDeviceErrors();
    return true;
  }
  bool ok = pendingColl_ == 0 || drive(Clock::now() + timeout, false, throwOnTimeout, timeout);
  if (ok) trimXfers();
  return ok;
}

void Comm::requestAbort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(abortMu_);
    if (abortWhy_.empty()) abortWhy_ = why.empty() ? std::string("plait: the process group was aborted") : why;
  }
  abortRequested_.store(true, std::memory_order_release);
  interrupt();
}

void Comm::abortNow(const std::string& why) noexcept {
  requestAbort(why);
  try {
    checkAbort();
  } catch (...) {
  }
}

void Comm::checkAbort() {
  if (!abortRequested_.load(std::memory_order_acquire) || !failure_.empty()) return;
  std::string why;
  {
    std::lock_guard<std::mutex> lk(abortMu_);
    why = abortWhy_;
  }
  fail(cat("plait: rank ", rank_, ": ", why), true);
}

void Comm::interrupt() {
  interrupt_.store(true, std::memory_order_release);
  uint64_t one = 1;
  if (wakeFd_ >= 0) (void)!write(wakeFd_, &one, sizeof(one));
  if (shm_) shm_->poke();
}

bool Comm::progressP2P(std::chrono::microseconds budget) {
  if (pending_ > pendingColl_) drive(Clock::now() + budget, true, false, timeout());
  trimXfers();
  return pending_ > 0;
}

bool Comm::drive(Clock::time_point deadline, bool p2pOnly, bool throwOnTimeout, std::chrono::milliseconds timeout) {
  const auto start = Clock::now();
  auto idleSince = start;
  bool idle = false;
  // Spin while the ranks have a core each; yield, then sleep on the doorbell. Never spin forever.
  const auto spinFor = std::chrono::microseconds(oversubscribed_ ? 0 : knobs().spinUs);
  const auto yieldFor = std::chrono::microseconds(oversubscribed_ ? 100 : std::max(knobs().yieldUs, knobs().spinUs));
  // Nothing is posted while the engine is driven, so which transports are involved is fixed for this call.
  bool anyShm = false, anyTcp = false;
  for (int p = 0; p < size_; ++p) {
    if (!channels_[p] || (sendQ_[p].empty() && !wantRead(p))) continue;
    (channels_[p]->kind() == TransportKind::kShm ? anyShm : anyTcp) = true;
  }
  try {
    while (p2pOnly ? pending_ > pendingColl_ : pendingColl_ > 0) {
      if (abortRequested_.load(std::memory_order_relaxed)) checkAbort();
      if (p2pOnly && interrupt_.exchange(false, std::memory_order_acq_rel)) return false;
      if (progressPass()) {
        idle = false;
        continue;
      }
      auto now = Clock::now();
      if (!idle) {
        idle = true;
        idleSince = now;
      }
      auto idleFor = now - idleSince;
      if (idleFor < spinFor) {
        ++stats_.spinsIdle;
        cpuRelax();
        continue;
      }
      if (idleFor < yieldFor) {
        ++stats_.yields;
        sched_yield();
        continue;
      }
      if (pending_ > pendingColl_) checkP2PDeadlines(now);
      if (now >= deadline) {
        if (!throwOnTimeout) return false;
        throw Error(cat("plait: rank ", rank_, ": Timed out after ", timeout.count(), " ms in ", where(),
                        " waiting for: ", describePending()));
      }
      // The check interval spans calls: point-to-point progress runs in short drives (20 ms), and a local check
      // that restarted with every drive would never fire.
      if (now - lastPeerCheck_ > std::chrono::milliseconds(50)) {
        lastPeerCheck_ = now;
        checkPeersAlive();
      }
      ++stats_.sleeps;
      if (slowWait(anyShm, anyTcp)) idle = false;
    }
  } catch (const PeerFailed& e) {
    fail(e.what(), true);
  } catch (const Error& e) {
    fail(e.what());
  } catch (const std::exception& e) {
    // Anything else (a completion callback's copy raising c10::Error, bad_alloc): the transfers still queued point
    // at buffers their owners may free once this error reaches them, so the communicator must fail and drop them.
    fail(cat("plait: rank ", rank_, ": ", where(), ": unexpected error while driving transfers: ", e.what()));
  } catch (...) {
    fail(cat("plait: rank ", rank_, ": ", where(), ": unknown exception while driving transfers"));
  }
  return true;
}

}  // namespace plait
