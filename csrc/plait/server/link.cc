// The workers' side of the summation servers (link.h).
#include "plait/server/link.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "plait/bootstrap.h"
#include "plait/kernels/reduce.h"
#include "plait/server/protocol.h"
#include "plait/transport/auth.h"
#include "plait/transport/sock.h"

namespace plait {

using namespace srv;

namespace {
// Reads a refusal's reason (after its magic) with a short deadline.
std::string readReason(int fd, Clock::time_point until) {
  uint32_t len = 0;
  if (!sock::ioAll(fd, &len, sizeof(len), false, until)) return "(no reason given)";
  std::string why(std::min<uint32_t>(len, 1024), '\0');
  if (!sock::ioAll(fd, why.data(), why.size(), false, until)) return "(reason cut short)";
  return why;
}

std::vector<std::string> splitOn(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    size_t e = s.find(sep, b);
    if (e == std::string::npos) e = s.size();
    out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}
}  // namespace

ServerLinks::ServerLinks(int rank, int worker, int nworkers, const std::vector<std::string>& addrs,
                         const std::string& job, const std::string& secret, std::chrono::milliseconds timeout)
    : rank_(rank), addrs_(addrs), fds_(addrs.size(), -1) {
  PLAIT_CHECK(job.size() == kJobIdLen, "plait: internal: job id of ", job.size(), " characters");
  const auto deadline = Clock::now() + timeout;
  try {
    for (size_t j = 0; j < addrs.size(); ++j) {
      const std::string what = cat("plait: rank ", rank, ": summation server ", j, " at ", addrs[j]);
      int fd = sock::dial(addrs[j], deadline, what);
      fds_[j] = fd;
      auto fail = [&](const std::string& why) { throw Error(cat(what, ": handshake failed: ", why)); };
      Hello h{};
      h.magic = kHelloMagic;
      h.version = kVersion;
      h.kind = kJoin;
      h.worker = worker;
      h.nworkers = nworkers;
      h.server = int32_t(j);
      h.timeoutMs = timeout.count();
      std::memcpy(h.job, job.data(), kJobIdLen);
      randomBytes(h.nonce, sizeof(h.nonce));
      Challenge c{};
      if (!sock::ioAll(fd, &h, sizeof(h), true, deadline) || !sock::ioAll(fd, &c.magic, 4, false, deadline))
        fail("no answer (is a plait-server of this plait version listening there?)");
      if (c.magic == kRefuseMagic) fail(cat("refused: ", readReason(fd, deadline)));
      if (c.magic != kChallMagic || !sock::ioAll(fd, reinterpret_cast<char*>(&c) + 4, sizeof(c) - 4, false, deadline))
        fail("the answer is not a plait-server challenge");
      Digest want = proofOf(secret, 'S', h, c.nonce);
      if (!digestEqual(want.data(), c.mac)) fail("the server could not prove it holds this job's secret");
      Digest mine = proofOf(secret, 'W', h, c.nonce);
      Proof pr;
      std::memcpy(pr.mac, mine.data(), sizeof(pr.mac));
      uint32_t ack = 0;
      if (!sock::ioAll(fd, &pr, sizeof(pr), true, deadline) || !sock::ioAll(fd, &ack, sizeof(ack), false, deadline))
        fail("no acceptance came back");
      if (ack == kRefuseMagic) fail(cat("refused: ", readReason(fd, deadline)));
      uint32_t zero = 1;
      if (ack != kAcceptMagic || !sock::ioAll(fd, &zero, sizeof(zero), false, deadline) || zero != 0)
        fail("malformed acceptance");
      sock::setNonBlocking(fd, true);
    }
  } catch (...) {
    for (int& fd : fds_)
      if (fd >= 0) close(fd), fd = -1;
    throw;
  }
}

ServerLinks::~ServerLinks() {
  for (int fd : fds_) {
    if (fd < 0) continue;
    SegHeader bye{kSegMagic, kBye, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    send(fd, &bye, sizeof(bye), MSG_NOSIGNAL | MSG_DONTWAIT);
    close(fd);
  }
}

void ServerLinks::shutdownAll() {
  for (int fd : fds_)
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

void ServerLinks::exchange(char* buf, const std::vector<Part>& parts, DType dt, RedOp op, uint32_t seq,
                           size_t segBytes, std::chrono::milliseconds timeout, const std::function<bool()>& stopped,
                           const std::string& what, const codec::Spec* spec, float div, float* residual) {
  PLAIT_CHECK(parts.size() == fds_.size(), "plait: internal: ", parts.size(), " parts for ", fds_.size(), " servers");
  const size_t es = dtypeSize(dt);
  const bool coded = spec && spec->codec != codec::Codec::kNone;
  // Values per segment: whole elements, and whole codec blocks when encoding.
  size_t segVals = std::max<size_t>(1, segBytes / es);
  if (coded) {
    segVals = std::max<size_t>(1, segBytes / codec::blockBytes(*spec)) * spec->block;
    PLAIT_CHECK(!residual || (dt == DType::kFloat32 && div == 1.0f), "plait: internal: residuals need float32, div 1");
  }
  struct State {
    size_t nseg = 0;
    size_t sIdx = 0, sOff = 0;  // segment being sent, and bytes of its frame (header + payload) sent
    SegHeader sh{};
    size_t rIdx = 0, rGot = 0;  // segment being received, and bytes of its frame received
    SegHeader rh{};
    std::vector<char> enc, dec;  // compressed: the segment being sent / received, encoded
    size_t encoded = ~size_t(0);  // which segment enc holds
  };
  std::vector<State> st(fds_.size());
  std::vector<float> scratch;
  size_t left = 0;
  for (size_t j = 0; j < parts.size(); ++j) {
    PLAIT_CHECK(parts[j].bytes % es == 0 && parts[j].off % es == 0, "plait: internal: a server part that is not whole elements");
    const size_t vals = parts[j].bytes / es;
    st[j].nseg = (vals + segVals - 1) / segVals;
    left += st[j].nseg;
  }
  auto valsOf = [&](size_t j, size_t i) { return std::min(segVals, parts[j].bytes / es - i * segVals); };
  auto firstVal = [&](size_t j, size_t i) { return parts[j].off / es + i * segVals; };
  auto wireLen = [&](size_t j, size_t i) {
    return coded ? codec::encodedBytes(*spec, valsOf(j, i)) : valsOf(j, i) * es;
  };
  auto name = [&](size_t j) { return cat("summation server ", j, " at ", addrs_[j]); };
  auto deadline = Clock::now() + timeout;
  while (left > 0) {
    if (stopped && stopped()) throw Error("stopped");
    bool moved = false;
    for (size_t j = 0; j < fds_.size(); ++j) {
      State& s = st[j];
      const int fd = fds_[j];
      // Send: header then payload, segment after segment.
      while (s.sIdx < s.nseg) {
        const size_t nv = valsOf(j, s.sIdx), len = wireLen(j, s.sIdx);
        const char* src = buf + firstVal(j, s.sIdx) * es;
        if (s.sOff == 0) {
          s.sh = SegHeader{kSegMagic, kSeg, seq, uint32_t(s.sIdx), uint8_t(dt), uint8_t(op),
                           uint8_t(coded ? spec->codec : codec::Codec::kNone), 0, coded ? spec->block : 0,
                           uint64_t(nv), uint64_t(len)};
          if (coded && s.encoded != s.sIdx) {  // once per segment, not at every retry of its first write
            s.encoded = s.sIdx;
            s.enc.resize(len);
            codec::encode(*spec, dt, src, nv, div, s.enc.data());
            if (residual) {  // what this worker's quantization dropped, for error feedback
              scratch.resize(nv);
              codec::decode(*spec, s.enc.data(), nv, DType::kFloat32, scratch.data());
              const float* v = reinterpret_cast<const float*>(src);
              float* r = residual + firstVal(j, s.sIdx);
              IeeeFpScope fp;
              for (size_t i = 0; i < nv; ++i) r[i] = v[i] - scratch[i];
            }
          }
        }
        const char* payload = coded ? s.enc.data() : src;
        iovec iov[2];
        int cnt = 0;
        if (s.sOff < sizeof(SegHeader)) iov[cnt++] = {reinterpret_cast<char*>(&s.sh) + s.sOff, sizeof(SegHeader) - s.sOff};
        const size_t dOff = s.sOff > sizeof(SegHeader) ? s.sOff - sizeof(SegHeader) : 0;
        iov[cnt++] = {const_cast<char*>(payload) + dOff, len - dOff};
        msghdr m{};
        m.msg_iov = iov;
        m.msg_iovlen = size_t(cnt);
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
        if (r < 0)
          throw ServerError(cat("plait: rank ", rank_, ": lost the connection to ", name(j), " while sending (",
                                std::strerror(errno), ") during ", what, ": the server died or is unreachable"),
                            true);
        moved = true;
        s.sOff += size_t(r);
        if (s.sOff < sizeof(SegHeader) + len) break;
        s.sOff = 0;
        ++s.sIdx;
      }
      // Receive: the sums, in order, straight into the buffer (compressed: into a segment buffer, then decoded).
      while (s.rIdx < s.nseg) {
        const size_t nv = valsOf(j, s.rIdx), len = wireLen(j, s.rIdx);
        char* dst;
        size_t want;
        if (s.rGot < sizeof(SegHeader)) {
          dst = reinterpret_cast<char*>(&s.rh) + s.rGot;
          want = sizeof(SegHeader) - s.rGot;
        } else {
          if (coded) s.dec.resize(len);
          char* base = coded ? s.dec.data() : buf + firstVal(j, s.rIdx) * es;
          dst = base + (s.rGot - sizeof(SegHeader));
          want = sizeof(SegHeader) + len - s.rGot;
        }
        ssize_t r = recv(fd, dst, want, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
        if (r <= 0)
          throw ServerError(cat("plait: rank ", rank_, ": ", name(j),
                                r == 0 ? " closed the connection" : cat(" connection lost (", std::strerror(errno), ")"),
                                " during ", what, ": the server died, was stopped or is unreachable"),
                            true);
        moved = true;
        const bool hadHeader = s.rGot >= sizeof(SegHeader);
        s.rGot += size_t(r);
        if (!hadHeader && s.rGot >= sizeof(SegHeader)) {
          if (s.rh.magic == kSegMagic && s.rh.kind == kAbort) {
            std::string why(std::min<uint64_t>(s.rh.bytes, kMaxAbortBytes), '\0');
            sock::setNonBlocking(fd, false);
            sock::ioAll(fd, why.data(), why.size(), false, Clock::now() + std::chrono::seconds(1));
            throw ServerError(cat("plait: rank ", rank_, ": ", why, " (seen during ", what, ")"), false);
          }
          if (s.rh.magic != kSegMagic || s.rh.kind != kSeg || s.rh.seq != seq || s.rh.index != s.rIdx ||
              s.rh.bytes != len || s.rh.values != nv)
            throw ServerError(cat("plait: rank ", rank_, ": ", name(j), " answered segment ", s.rIdx, " of ", what,
                                  " with a malformed header (seq ", s.rh.seq, ", segment ", s.rh.index, ", ",
                                  s.rh.bytes, " bytes; expected seq ", seq, ", ", len, " bytes)"),
                              true);
        }
        if (s.rGot == sizeof(SegHeader) + len) {
          if (coded) codec::decode(*spec, s.dec.data(), nv, dt, buf + firstVal(j, s.rIdx) * es);
          s.rGot = 0;
          ++s.rIdx;
          --left;
        }
      }
    }
    if (left == 0) break;
    if (moved) {
      deadline = Clock::now() + timeout;  // the deadline is for a silence, not for the whole transfer
      continue;
    }
    if (Clock::now() >= deadline) {
      std::string pending;
      for (size_t j = 0; j < st.size(); ++j)
        if (st[j].rIdx < st[j].nseg)
          pending += cat(pending.empty() ? "" : "; ", name(j), " (", st[j].rIdx, " of ", st[j].nseg,
                         " segments back)");
      throw ServerError(cat("plait: rank ", rank_, ": timed out after ", timeout.count(), " ms during ", what,
                            " waiting for ", pending,
                            " (a server stopped answering, or another worker never sent its part)"),
                        true);
    }
    std::vector<pollfd> pf;
    for (size_t j = 0; j < fds_.size(); ++j) {
      if (st[j].rIdx >= st[j].nseg) continue;
      pf.push_back(pollfd{fds_[j], short(POLLIN | (st[j].sIdx < st[j].nseg ? POLLOUT : 0)), 0});
    }
    poll(pf.data(), pf.size(), 20);
  }
}

bool pingServer(const std::string& addr, std::chrono::milliseconds wait, const std::string& job) {
  const auto until = Clock::now() + wait;
  int fd = -1;
  try {
    fd = sock::dial(addr, until, "ping", false);
  } catch (const Error&) {
    return false;
  }
  Hello h{};
  h.magic = kHelloMagic;
  h.version = kVersion;
  h.kind = kPing;
  std::memset(h.job, '0', kJobIdLen);
  std::memcpy(h.job, job.data(), std::min(job.size(), kJobIdLen));
  uint32_t pong = 0;
  bool ok = sock::ioAll(fd, &h, sizeof(h), true, until) && sock::ioAll(fd, &pong, sizeof(pong), false, until);
  close(fd);
  return ok && (pong == kPongMagic || (job.empty() && pong == kRefuseMagic));
}

std::unique_ptr<ServerLinks> attachServers(Store& store, Store* root, const std::string& prefix,
                                           const std::string& job, const std::string& secretHex, int rank,
                                           const std::vector<std::vector<int>>& hostRanks,
                                           const std::vector<int>& hostOf, int k,
                                           std::chrono::milliseconds timeout, const std::string& storeDesc,
                                           ServerInfo* info) {
  const std::string key = prefix + "servers";
  if (rank == 0) {
    // Pick k live servers from the registry, waiting for them; the answer (or why there is none) goes to the group.
    std::string answer;
    try {
      PLAIT_CHECK(root, "plait: rank 0: PLAIT_SERVERS / Options.servers needs the job's rendezvous store (the servers "
                        "register there), which this process group does not expose");
      root->set(srv::jobSecretKey(job), secretHex);
      const auto deadline = Clock::now() + timeout;
      std::vector<std::string> live, seen;
      while (true) {
        live.clear();
        seen.clear();
        // Registered servers, newest first (a restarted server's entry supersedes its old one), each address once.
        int64_t n = root->check(kRegistryCount) ? root->add(kRegistryCount, 0) : 0;
        std::vector<std::string> cand;
        for (int64_t i = n - 1; i >= 0; --i) {
          const std::string rk = registryKey(i);
          if (!root->check(rk)) continue;  // registered but never written (the server died in between)
          std::string e = root->get(rk);
          if (e.empty()) continue;  // stopped
          std::string addr = e.substr(0, e.find('\t'));
          if (std::find(cand.begin(), cand.end(), addr) == cand.end()) cand.push_back(addr);
        }
        std::reverse(cand.begin(), cand.end());  // registration order: the same choice whoever asks
        // Ping them all at once (one connection attempt each: a dead entry costs no retries).
        std::vector<char> ok(cand.size(), 0);
        {
          std::vector<std::thread> pings;
          for (size_t i = 0; i < cand.size(); ++i)
            pings.emplace_back([&, i] { ok[i] = pingServer(cand[i], std::chrono::milliseconds(2000), job); });
          for (auto& t : pings) t.join();
        }
        for (size_t i = 0; i < cand.size(); ++i) {
          seen.push_back(cat(cand[i], ok[i] ? "" : " (registered, not answering for this job)"));
          if (ok[i] && int(live.size()) < k) live.push_back(cand[i]);
        }
        if (int(live.size()) >= k) break;
        if (Clock::now() >= deadline) {
          std::string list;
          for (auto& s : seen) list += cat(list.empty() ? "" : ", ", s);
          throw Error(cat("plait: rank 0: the group needs ", k, " summation server(s) (PLAIT_SERVERS / "
                          "Options.servers) but only ", live.size(), " answered within ", timeout.count(),
                          " ms at the job's store ", storeDesc, list.empty() ? " (none registered" : " (registered: ",
                          list, "); start `plait-server ", storeDesc.empty() ? "HOST:PORT" : storeDesc,
                          "` on ", k - int(live.size()), " more host(s)"));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
      for (auto& a : live) answer += cat(answer.empty() ? "" : ",", a);
      answer = "ok\t" + answer;
    } catch (const std::exception& e) {
      answer = cat("error\t", e.what());
    }
    store.set(key, answer);
  }
  const std::string got = store.get(key);
  const size_t tab = got.find('\t');
  PLAIT_CHECK(tab != std::string::npos, "plait: rank ", rank, ": malformed server list in the store");
  if (got.substr(0, tab) != "ok") {
    std::string why = got.substr(tab + 1);
    throw Error(rank == 0 ? why : cat("plait: rank ", rank, ": ", why));
  }
  info->k = k;
  info->addrs = splitOn(got.substr(tab + 1), ',');
  PLAIT_CHECK(int(info->addrs.size()) == k, "plait: rank ", rank, ": the store lists ", info->addrs.size(),
              " servers, not ", k);
  const int nh = int(hostRanks.size());
  const int myHost = hostOf[size_t(rank)];
  const bool leader = hostRanks[size_t(myHost)][0] == rank;
  std::unique_ptr<ServerLinks> links;
  if (leader) {
    std::string st = "ok";
    try {
      links = std::make_unique<ServerLinks>(rank, myHost, nh, info->addrs, job, applyAuthKey(fromHex(secretHex)), timeout);
    } catch (const std::exception& e) {
      st = cat("error\t", e.what());
    }
    store.set(cat(prefix, "srvconn/", myHost), st);
  }
  // Every rank (leaders and the others) learns whether every leader is connected, so nobody waits for a leader
  // that already raised.
  for (int h = 0; h < nh; ++h) {
    std::string v = store.get(cat(prefix, "srvconn/", h));
    if (v != "ok") {
      if (links) links->shutdownAll();  // the servers drop the job (its other workers may be connected)
      throw Error(h == myHost && leader ? v.substr(6)
                                        : cat("plait: rank ", rank, ": host ", h,
                                              "'s leader could not connect to the summation servers: ", v.substr(6)));
    }
  }
  // The servers' link rate: every leader streams `probe` bytes to one server at a time and times the sums coming
  // back; the slowest leader's time counts (the server's link carries all of them), the slowest server's rate is the
  // one the planner uses. The same number on every rank (leader 0 publishes it).
  const std::string rateKey = prefix + "srvrate";
  if (knobs().serverGbps > 0) {
    info->gbps = knobs().serverGbps / 8;
    info->source = "PLAIT_SERVER_GBPS";
    return links;
  }
  if (leader) {
    const size_t probe = size_t(2) << 20, seg = size_t(256) << 10;
    std::vector<char> data(probe, 1);
    double worst = 1e300;
    auto key = [&](int j, int round, int h) { return cat(prefix, "srvprobe/", j, "/", round, "/", h); };
    int j = 0, round = 0;
    try {
      for (j = 0; j < k; ++j) {
        std::vector<ServerLinks::Part> parts(static_cast<size_t>(k));
        double best = 1e300;
        for (round = 0; round < 3; ++round) {
          // Round 0 is a short warm-up that lines the leaders up; rounds 1 and 2 are timed, the better one counts.
          parts[size_t(j)] = {0, round == 0 ? seg : probe};
          auto t0 = Clock::now();
          links->exchange(data.data(), parts, DType::kUInt8, RedOp::kMax, 0xfffffff0u + uint32_t(round), seg,
                          timeout, nullptr, "the summation servers' link measurement");
          double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
          if (round == 0) continue;
          store.set(key(j, round, myHost), cat(us));
          double mx = 0;
          for (int h = 0; h < nh; ++h) {
            std::string v = store.get(key(j, round, h));
            if (v.compare(0, 6, "error\t") == 0) throw Error(v.substr(6));
            mx = std::max(mx, std::atof(v.c_str()));
          }
          best = std::min(best, mx);
        }
        worst = std::min(worst, double(nh) * double(probe) / best / 1e3);  // GB/s
      }
    } catch (const std::exception& e) {
      // Nobody may wait for this leader's numbers: every key it still owes says why, and so does the rate.
      const std::string err = cat("error\t", e.what());
      links->shutdownAll();
      for (int jj = j; jj < k; ++jj)
        for (int r = (jj == j ? std::max(round, 1) : 1); r < 3; ++r) store.set(key(jj, r, myHost), err);
      store.set(rateKey, err);
      throw;
    }
    if (myHost == 0) store.set(rateKey, cat(worst));
  }
  const std::string rate = store.get(rateKey);
  if (rate.compare(0, 6, "error\t") == 0)
    throw Error(cat("plait: rank ", rank, ": measuring the summation servers' links failed: ", rate.substr(6)));
  info->gbps = std::atof(rate.c_str());
  info->source = cat("measured (", nh, " worker host(s) streaming to each server)");
  return links;
}

}  // namespace plait
