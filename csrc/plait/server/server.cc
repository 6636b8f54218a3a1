// The summation server (server.h): an accept thread that authenticates connections and groups them into jobs, and
// one thread per job that sums segments in worker order (protocol.h).
#include "plait/server/server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>

#include "plait/bootstrap.h"
#include "plait/common.h"
#include "plait/kernels/codec.h"
#include "plait/kernels/reduce.h"
#include "plait/server/protocol.h"
#include "plait/transport/auth.h"
#include "plait/transport/sock.h"

namespace plait {

using namespace srv;

namespace {
constexpr auto kHandshakeLimit = std::chrono::seconds(10);
constexpr size_t kLogLines = 200;
constexpr size_t kMaxPending = 256;  // connections in their handshake at once (the oldest is dropped beyond)

bool isHex(const char* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isxdigit(static_cast<unsigned char>(p[i]))) return false;
  return true;
}

void sendRefusal(int fd, const std::string& why) {
  uint32_t hdr[2] = {kRefuseMagic, uint32_t(std::min<size_t>(why.size(), 1024))};
  std::string frame(reinterpret_cast<const char*>(hdr), sizeof(hdr));
  frame += why.substr(0, hdr[1]);
  send(fd, frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}
}  // namespace

// A connection in its handshake.
struct Pending {
  int fd;
  std::string from;
  Clock::time_point deadline;
  int stage = 0;  // 0: reading Hello, 1: reading Proof
  Hello hello{};
  Proof proof{};
  size_t got = 0;
  uint8_t nonce[16];
  std::string secret;
};

struct AdmitInfo {
  Hello hello;
};

struct SumServer::Job {
  std::string id;
  int n = 0;
  int64_t timeoutMs = 0;
  Clock::time_point created;
  std::vector<int> fds;
  std::vector<std::string> from;
  int joined = 0;
  std::thread th;
  std::atomic<bool> done{false};
};

// The summation loop of one job (runs on the job's thread).
struct JobRunner {
  struct InSeg {
    SegHeader h{};
    std::vector<char> data;
    size_t got = 0;
  };
  struct Out {
    SegHeader h{};
    std::vector<char> data;
    int pending = 0;  // workers still to send it to
  };
  struct Worker {
    int fd = -1;
    std::string from;
    std::deque<InSeg> in;  // the back one may be partial (reading == true)
    SegHeader hdr{};
    size_t hdrGot = 0;
    bool reading = false;
    std::deque<Out*> out;
    size_t outOff = 0;
    bool left = false, bye = false;
    bool hup = false;  // the socket reported a hang-up while its queue was full (not polled until there is room)
    std::string why;  // how it left, when not by a goodbye
  };

  SumServer& srv;
  SumServer::Job& job;
  int threads;
  size_t depth;
  std::vector<Worker> w;
  std::deque<std::unique_ptr<Out>> outs;  // owned sums (in flight)
  std::vector<std::vector<char>> pool;
  std::vector<float> acc;  // a compressed segment's float32 sum
  uint64_t held = 0;

  static std::string describe(const SegHeader& h) {
    return cat("seq ", h.seq, " segment ", h.index, " (dtype ", int(h.dtype), ", op ", int(h.op), ", codec ",
               int(h.codec), " block ", h.block, ", ", h.values, " values, ", h.bytes, " bytes)");
  }

  std::vector<char> take(size_t bytes) {
    for (size_t i = 0; i < pool.size(); ++i)
      if (pool[i].capacity() >= bytes) {
        std::vector<char> v = std::move(pool[i]);
        pool.erase(pool.begin() + long(i));
        v.resize(bytes);
        return v;
      }
    srv.noteBuffer(int64_t(bytes));
    held += bytes;
    return std::vector<char>(bytes);
  }
  void give(std::vector<char>&& v) {
    if (pool.size() < (w.size() + 1) * depth * 2) {
      pool.push_back(std::move(v));
    } else {
      srv.noteBuffer(-int64_t(v.capacity()));
      held -= std::min<uint64_t>(held, v.capacity());
    }
  }

  std::string who(int i) const { return cat("worker ", i, " (", w[i].from, ")"); }

  // Reads what worker i has for us; false when it left.
  void readFrom(int i) {
    Worker& x = w[i];
    while (!x.left) {
      if (!x.reading) {
        if (x.in.size() >= depth) return;
        ssize_t r = recv(x.fd, reinterpret_cast<char*>(&x.hdr) + x.hdrGot, sizeof(SegHeader) - x.hdrGot,
                         MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          x.left = true;
          x.why = r == 0 ? "closed its connection" : cat("connection lost: ", std::strerror(errno));
          return;
        }
        if (r < 0) return;
        x.hdrGot += size_t(r);
        if (x.hdrGot < sizeof(SegHeader)) continue;
        x.hdrGot = 0;
        if (x.hdr.magic != kSegMagic || (x.hdr.kind != kSeg && x.hdr.kind != kBye)) {
          x.left = true;
          x.why = "sent a malformed message header";
          return;
        }
        if (x.hdr.kind == kBye) {
          x.left = x.bye = true;
          return;
        }
        if (x.hdr.bytes == 0 || x.hdr.bytes > kMaxSegBytes) {
          x.left = true;
          x.why = cat("sent a segment of ", x.hdr.bytes, " bytes (at most ", kMaxSegBytes, ")");
          return;
        }
        InSeg s;
        s.h = x.hdr;
        s.data = take(x.hdr.bytes);
        x.in.push_back(std::move(s));
        x.reading = true;
      }
      InSeg& s = x.in.back();
      ssize_t r = recv(x.fd, s.data.data() + s.got, s.data.size() - s.got, MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        x.left = true;
        x.why = r == 0 ? "closed its connection in the middle of a segment"
                       : cat("connection lost: ", std::strerror(errno));
        return;
      }
      if (r < 0) return;
      s.got += size_t(r);
      srv.bytesIn_ += uint64_t(r);
      if (s.got == s.data.size()) x.reading = false;
    }
  }

  // Sends what is queued for worker i.
  void writeTo(int i) {
    Worker& x = w[i];
    while (!x.left && !x.out.empty()) {
      Out* o = x.out.front();
      const size_t total = sizeof(SegHeader) + o->data.size();
      iovec iov[2];
      int cnt = 0;
      if (x.outOff < sizeof(SegHeader))
        iov[cnt++] = {reinterpret_cast<char*>(&o->h) + x.outOff, sizeof(SegHeader) - x.outOff};
      size_t dOff = x.outOff > sizeof(SegHeader) ? x.outOff - sizeof(SegHeader) : 0;
      if (dOff < o->data.size()) iov[cnt++] = {o->data.data() + dOff, o->data.size() - dOff};
      msghdr m{};
      m.msg_iov = iov;
      m.msg_iovlen = size_t(cnt);
      ssize_t r = sendmsg(x.fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
      if (r < 0) {
        x.left = true;
        x.why = cat("connection lost: ", std::strerror(errno));
        return;
      }
      x.outOff += size_t(r);
      srv.bytesOut_ += uint64_t(r);
      if (x.outOff < total) return;
      x.outOff = 0;
      x.out.pop_front();
      release(o);
    }
  }

  void release(Out* o) {
    if (--o->pending > 0) return;
    for (auto it = outs.begin(); it != outs.end(); ++it)
      if (it->get() == o) {
        give(std::move(o->data));
        outs.erase(it);
        return;
      }
  }

  // Sums segment heads while every worker has one and every worker's queue of sums has room. Returns a reason to
  // give up on the job, or "".
  std::string sumReady() {
    while (true) {
      for (auto& x : w)
        if (x.left || x.in.empty() || (x.reading && x.in.size() == 1) || x.out.size() >= depth) return "";
      const SegHeader& h0 = w[0].in.front().h;
      for (size_t i = 1; i < w.size(); ++i) {
        const SegHeader& h = w[i].in.front().h;
        if (h.seq != h0.seq || h.index != h0.index || h.dtype != h0.dtype || h.op != h0.op || h.bytes != h0.bytes ||
            h.codec != h0.codec || h.block != h0.block || h.values != h0.values)
          return cat("the workers disagree on segment ", h0.index, " of collective seq ", h0.seq, ": ", who(0),
                     " sent ", describe(h0), "; ", who(int(i)), " sent ", describe(h));
      }
      if (h0.dtype >= uint8_t(DType::kCount) || h0.op >= uint8_t(RedOp::kCount))
        return cat("segment ", h0.index, " of seq ", h0.seq, " names dtype ", int(h0.dtype), " / op ", int(h0.op),
                   ", which this server does not know");
      const DType dt = DType(h0.dtype);
      const RedOp op = RedOp(h0.op);
      const size_t es = dtypeSize(dt);
      codec::Spec spec;
      if (h0.codec != uint8_t(codec::Codec::kNone)) {
        try {
          if (h0.codec >= codec::kCodecCount || h0.block == 0) throw Error("unknown codec");
          spec = codec::makeSpec(codec::Codec(h0.codec), h0.block);
          if (h0.values == 0 || codec::encodedBytes(spec, h0.values) != h0.bytes) throw Error("size");
        } catch (const std::exception&) {
          return cat("segment ", h0.index, " of seq ", h0.seq, " is not a valid encoded segment: ", describe(h0));
        }
      } else if (h0.bytes % es || h0.values != h0.bytes / es) {
        return cat("segment ", h0.index, " of seq ", h0.seq, " is not a whole number of elements: ", describe(h0));
      }
      const size_t count = h0.values;
      auto o = std::make_unique<Out>();
      o->h = h0;
      o->data = take(h0.bytes);
      try {
        if (spec.codec != codec::Codec::kNone) {
          // Decode every worker's segment into one float32 sum in worker order, then encode the sum once.
          acc.assign(count, 0.0f);
          for (auto& x : w) codec::decodeAccumulate(spec, x.in.front().data.data(), count, acc.data());
          codec::encode(spec, DType::kFloat32, acc.data(), count, 1.0f, o->data.data());
        } else if (w.size() == 1) {
          std::memcpy(o->data.data(), w[0].in.front().data.data(), h0.bytes);
        } else {
          // In worker order, so that the sum is the same bits whatever order the segments arrived in.
          reduce(op, dt, o->data.data(), w[0].in.front().data.data(), w[1].in.front().data.data(), count, threads);
          for (size_t i = 2; i < w.size(); ++i)
            reduce(op, dt, o->data.data(), o->data.data(), w[i].in.front().data.data(), count, threads);
        }
      } catch (const std::exception& e) {
        give(std::move(o->data));
        return e.what();
      }
      srv.segments_ += 1;
      o->pending = int(w.size());
      for (auto& x : w) {
        x.out.push_back(o.get());
        give(std::move(x.in.front().data));
        x.in.pop_front();
      }
      outs.push_back(std::move(o));
    }
  }

  // Tells every worker still connected why the job ends (after finishing the frame it was in the middle of).
  void abortAll(const std::string& why) {
    srv.jobsAborted_ += 1;
    const std::string msg = cat("summation server ", srv.address(), " dropped job ", job.id, ": ", why);
    srv.log(msg);
    const auto until = Clock::now() + std::chrono::milliseconds(500);
    for (size_t i = 0; i < w.size(); ++i) {
      Worker& x = w[i];
      if (x.left) continue;
      sock::setNonBlocking(x.fd, false);
      if (x.outOff > 0 && !x.out.empty()) {  // finish the frame in flight so the abort is read as a header
        Out* o = x.out.front();
        std::vector<char> rest;
        if (x.outOff < sizeof(SegHeader))
          rest.insert(rest.end(), reinterpret_cast<char*>(&o->h) + x.outOff, reinterpret_cast<char*>(&o->h + 1));
        size_t dOff = x.outOff > sizeof(SegHeader) ? x.outOff - sizeof(SegHeader) : 0;
        rest.insert(rest.end(), o->data.begin() + long(dOff), o->data.end());
        if (!sock::ioAll(x.fd, rest.data(), rest.size(), true, until)) continue;
      }
      SegHeader h{kSegMagic, kAbort, 0, 0, 0, 0, 0, 0, 0, 0, std::min<uint64_t>(msg.size(), kMaxAbortBytes)};
      std::string frame(reinterpret_cast<const char*>(&h), sizeof(h));
      frame += msg.substr(0, h.bytes);
      sock::ioAll(x.fd, frame.data(), frame.size(), true, until);
    }
  }

  void run() {
    w.resize(size_t(job.n));
    for (int i = 0; i < job.n; ++i) {
      w[i].fd = job.fds[i];
      w[i].from = job.from[i];
      sock::setNonBlocking(w[i].fd, true);
    }
    srv.log(cat("job ", job.id, ": ", job.n, " worker(s) joined"));
    std::string why;
    try {
      why = loop();
    } catch (const std::exception& e) {  // e.g. out of memory for a segment: the workers must hear of it now
      why = cat("internal error: ", e.what());
    }
    if (!why.empty()) abortAll(why);
    else srv.log(cat("job ", job.id, ": every worker left; job done"));
    for (auto& x : w) {
      if (x.fd >= 0) close(x.fd);
      x.fd = -1;
    }
    srv.noteBuffer(-int64_t(held));
  }

  // Serves the job until every worker left (returns "") or it must be dropped (returns why).
  std::string loop() {
    std::string why;
    while (why.empty()) {
      if (srv.stop_.load()) {
        why = "the server is stopping";
        break;
      }
      std::vector<pollfd> pf;
      std::vector<int> idx;
      for (int i = 0; i < job.n; ++i) {
        if (w[i].left) continue;
        // A hung-up socket keeps reporting POLLHUP: while its queue is full there is nothing to do with it.
        if (w[i].hup && !w[i].reading && w[i].in.size() >= depth && w[i].out.empty()) continue;
        w[i].hup = false;
        short ev = 0;
        if (w[i].reading || w[i].in.size() < depth) ev |= POLLIN;
        if (!w[i].out.empty()) ev |= POLLOUT;
        pf.push_back(pollfd{w[i].fd, ev, 0});
        idx.push_back(i);
      }
      if (pf.empty()) {
        bool anyLive = false;
        for (auto& x : w) anyLive = anyLive || !x.left;
        if (!anyLive) break;  // every worker left
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // only hung-up sockets with full queues
        continue;
      }
      poll(pf.data(), pf.size(), 200);
      for (size_t k = 0; k < pf.size(); ++k) {
        if (pf[k].revents & (POLLIN | POLLHUP | POLLERR)) readFrom(idx[k]);
        if (pf[k].revents & (POLLOUT | POLLHUP | POLLERR)) writeTo(idx[k]);
        if (pf[k].revents & (POLLHUP | POLLERR)) w[size_t(idx[k])].hup = true;
      }
      why = sumReady();
      for (int i = 0; i < job.n && why.empty(); ++i) writeTo(i);
      if (!why.empty()) break;
      // A worker that left (a goodbye, or its connection ended): the sums already made still go to the others
      // (a fast worker may exit right after its last all-reduce while a slower one still receives), but once
      // another worker has a segment that can never be summed, the job is over for everyone.
      for (int i = 0; i < job.n && why.empty(); ++i) {
        if (!w[i].left) continue;
        for (int j = 0; j < job.n && why.empty(); ++j)
          if (!w[j].left && !w[j].in.empty())
            why = w[i].bye ? cat(who(j), " sent segments after ", who(i), " left the job (destroyed its process group)")
                           : cat(who(i), " ", w[i].why, " (its process died or its process group failed)");
      }
    }
    return why;
  }
};

SumServer::SumServer(std::shared_ptr<Store> store, const ServerOptions& opts) : store_(std::move(store)), opts_(opts) {
  knobs();  // a malformed PLAIT_* variable raises here, not later on the accept thread
  listenFd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  PLAIT_CHECK(listenFd_ >= 0, "plait-server: socket() failed: ", std::strerror(errno));
  int one = 1;
  setsockopt(listenFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = htons(uint16_t(opts.port));
  if (bind(listenFd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(listenFd_, 256) != 0) {
    int e = errno;
    close(listenFd_);
    throw Error(cat("plait-server: cannot listen on port ", opts.port, ": ", std::strerror(e)));
  }
  socklen_t len = sizeof(a);
  getsockname(listenFd_, reinterpret_cast<sockaddr*>(&a), &len);
  std::string host = opts.advertise.empty() ? sock::routeTo(opts.storeHost) : opts.advertise;
  address_ = cat(host, ":", ntohs(a.sin_port));
  if (opts_.threads <= 0) opts_.threads = int(std::max(1u, std::min(8u, std::thread::hardware_concurrency())));
  opts_.depth = std::max<size_t>(1, opts_.depth);
}

SumServer::~SumServer() {
  try {
    stop();
  } catch (...) {
  }
  if (listenFd_ >= 0) close(listenFd_);
}

void SumServer::noteBuffer(int64_t delta) {
  uint64_t now = bufferBytes_.fetch_add(uint64_t(delta)) + uint64_t(delta);
  uint64_t peak = peakBufferBytes_.load();
  while (now > peak && !peakBufferBytes_.compare_exchange_weak(peak, now)) {
  }
}

void SumServer::log(const std::string& line) {
  std::fprintf(stderr, "[plait-server %s] %s\n", address_.c_str(), line.c_str());
  std::lock_guard<std::mutex> g(logMu_);
  log_.push_back(line);
  if (log_.size() > kLogLines) log_.erase(log_.begin());
}

std::vector<std::string> SumServer::recentLog() const {
  std::lock_guard<std::mutex> g(logMu_);
  return log_;
}

int64_t SumServer::registerSelf() {
  char hn[256] = {0};
  gethostname(hn, sizeof(hn) - 1);
  std::lock_guard<std::mutex> g(storeMu_);
  index_ = store_->add(kRegistryCount, 1) - 1;
  store_->set(registryKey(index_), cat(address_, "\t", hn, "\t", getpid()));
  return index_;
}

void SumServer::deregister() {
  if (index_ < 0) return;
  std::lock_guard<std::mutex> g(storeMu_);
  store_->set(registryKey(index_), "");
}

std::string SumServer::secretFor(const std::string& job) {
  std::lock_guard<std::mutex> g(storeMu_);
  const std::string key = jobSecretKey(job);
  if (!store_->check(key)) return "";
  return applyAuthKey(fromHex(store_->get(key)));
}

SumServer::Stats SumServer::stats() const {
  Stats s;
  s.jobsStarted = jobsStarted_.load();
  s.jobsAborted = jobsAborted_.load();
  s.refused = refused_.load();
  s.segments = segments_.load();
  s.bytesIn = bytesIn_.load();
  s.bytesOut = bytesOut_.load();
  s.peakBufferBytes = peakBufferBytes_.load();
  std::lock_guard<std::mutex> g(mu_);
  for (const auto& kv : jobs_) s.jobsActive += kv.second->joined == kv.second->n && !kv.second->done.load();
  return s;
}

void SumServer::start() {
  PLAIT_CHECK(!acceptThread_.joinable(), "plait-server: already started");
  acceptThread_ = std::thread([this] { acceptLoop(); });
}

void SumServer::stop() {
  stop_ = true;
  if (acceptThread_.joinable()) acceptThread_.join();
  std::vector<std::shared_ptr<Job>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : jobs_) all.push_back(kv.second);
    jobs_.clear();
  }
  for (auto& j : all) {
    if (j->th.joinable()) j->th.join();
    else
      for (int fd : j->fds)
        if (fd >= 0) close(fd);
  }
}

void SumServer::admit(int fd, const std::string& from, const AdmitInfo& info) {
  const Hello& h = info.hello;
  const std::string id(h.job, kJobIdLen);
  std::shared_ptr<Job> job;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto& slot = jobs_[id];
    if (!slot) {
      slot = std::make_shared<Job>();
      slot->id = id;
      slot->n = h.nworkers;
      slot->timeoutMs = std::min<int64_t>(int64_t(24) * 3600 * 1000, std::max<int64_t>(1000, h.timeoutMs));
      slot->created = Clock::now();
      slot->fds.assign(size_t(h.nworkers), -1);
      slot->from.assign(size_t(h.nworkers), "");
    }
    job = slot;
    std::string why;
    if (job->n != h.nworkers) why = cat("says the job has ", h.nworkers, " workers; others said ", job->n);
    else if (job->joined == job->n) why = "the job has already started";
    else if (job->fds[size_t(h.worker)] >= 0) why = cat("worker ", h.worker, " is already connected");
    if (!why.empty()) {
      refused_ += 1;
      sendRefusal(fd, why);
      close(fd);
      log(cat("refused a connection from ", from, " to job ", id, ": ", why));
      return;
    }
    uint32_t ok[2] = {kAcceptMagic, 0};
    send(fd, ok, sizeof(ok), MSG_NOSIGNAL | MSG_DONTWAIT);
    job->fds[size_t(h.worker)] = fd;
    job->from[size_t(h.worker)] = from;
    if (++job->joined < job->n) return;
    jobsStarted_ += 1;
  }
  SumServer::Job* raw = job.get();
  job->th = std::thread([this, raw, job] {
    JobRunner r{*this, *raw, opts_.threads, opts_.depth, {}, {}, {}, {}, 0};
    try {
      r.run();
    } catch (const std::exception& e) {
      log(cat("job ", raw->id, ": ", e.what()));
    }
    raw->done = true;
  });
}

void SumServer::acceptLoop() {
  sock::setNonBlocking(listenFd_, true);
  std::vector<Pending> pend;
  auto refuse = [&](size_t i, const std::string& why, bool tell) {
    refused_ += 1;
    log(cat("refused a connection from ", pend[i].from, ": ", why));
    if (tell) sendRefusal(pend[i].fd, why);
    close(pend[i].fd);
    pend.erase(pend.begin() + long(i));
  };
  while (!stop_.load()) {
    try {
      acceptOnce(pend, refuse);
    } catch (const std::exception& e) {
      // Nothing that goes wrong with one connection (or one thread that cannot be made) may take the server down.
      log(cat("error in the accept loop: ", e.what()));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  for (auto& q : pend) close(q.fd);
}

void SumServer::acceptOnce(std::vector<Pending>& pend, const std::function<void(size_t, const std::string&, bool)>& refuse) {
  {
    auto now = Clock::now();
    for (size_t i = 0; i < pend.size();)
      if (now >= pend[i].deadline) refuse(i, "no complete handshake within 10 s", false);
      else ++i;
    // Reap finished jobs, and give up on jobs whose workers did not all join within their timeout.
    {
      std::vector<std::shared_ptr<Job>> reap;
      {
        std::lock_guard<std::mutex> g(mu_);
        for (auto it = jobs_.begin(); it != jobs_.end();) {
          Job& j = *it->second;
          const bool late = j.joined < j.n && now - j.created > std::chrono::milliseconds(j.timeoutMs);
          if (j.done.load() || late) {
            if (late) {
              log(cat("job ", j.id, ": only ", j.joined, " of ", j.n, " workers joined within ", j.timeoutMs,
                      " ms; dropped"));
              for (int& fd : j.fds)
                if (fd >= 0) close(fd), fd = -1;
            }
            reap.push_back(it->second);
            it = jobs_.erase(it);
          } else {
            ++it;
          }
        }
      }
      for (auto& j : reap)
        if (j->th.joinable()) j->th.join();
    }
    std::vector<pollfd> pfds{pollfd{listenFd_, POLLIN, 0}};
    for (auto& q : pend) pfds.push_back(pollfd{q.fd, POLLIN, 0});
    if (poll(pfds.data(), pfds.size(), 100) <= 0) return;
    if (pfds[0].revents & POLLIN) {
      int fd = accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM))
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (fd >= 0) {
        sock::tune(fd);
        Pending q{fd, sock::peerName(fd), Clock::now() + kHandshakeLimit};
        randomBytes(q.nonce, sizeof(q.nonce));
        pend.push_back(std::move(q));
      }
    }
    for (size_t k = pfds.size() - 1; k >= 1; --k) {
      if (!pfds[k].revents) continue;
      size_t i = k - 1;
      Pending& q = pend[i];
      char* dst = q.stage == 0 ? reinterpret_cast<char*>(&q.hello) : reinterpret_cast<char*>(&q.proof);
      size_t want = q.stage == 0 ? sizeof(Hello) : sizeof(Proof);
      ssize_t r = recv(q.fd, dst + q.got, want - q.got, MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        refuse(i, "closed before completing the handshake", false);
        continue;
      }
      if (r < 0) continue;
      q.got += size_t(r);
      if (q.got < want) continue;
      q.got = 0;
      const Hello& h = q.hello;
      if (q.stage == 0) {
        if (h.magic != kHelloMagic || h.version != kVersion) {
          refuse(i, "not a plait worker's handshake (garbage, another program, or another plait version)", false);
          continue;
        }
        if (h.kind == kPing) {
          // A pong only for a job this server can serve (its secret is in this server's store): a stale registry
          // entry whose port now belongs to another store's server does not answer.
          bool known = false;
          if (isHex(h.job, kJobIdLen)) try {
              known = !secretFor(std::string(h.job, kJobIdLen)).empty();
            } catch (const std::exception&) {
            }
          uint32_t pong = known ? kPongMagic : kRefuseMagic;
          send(q.fd, &pong, sizeof(pong), MSG_NOSIGNAL | MSG_DONTWAIT);
          close(q.fd);
          pend.erase(pend.begin() + long(i));
          continue;
        }
        if (h.kind != kJoin || h.nworkers < 1 || h.nworkers > 65536 || h.worker < 0 || h.worker >= h.nworkers ||
            !isHex(h.job, kJobIdLen)) {
          refuse(i, "malformed join request", false);
          continue;
        }
        std::string secret;
        try {
          secret = secretFor(std::string(h.job, kJobIdLen));
        } catch (const std::exception& e) {
          refuse(i, cat("cannot read the job's secret from the store: ", e.what()), true);
          continue;
        }
        if (secret.empty()) {
          refuse(i, cat("job ", std::string(h.job, kJobIdLen), " is unknown at this server's store"), true);
          continue;
        }
        q.secret = secret;
        Challenge c{kChallMagic, 0, {}, {}};
        std::memcpy(c.nonce, q.nonce, sizeof(c.nonce));
        Digest mac = proofOf(secret, 'S', h, q.nonce);
        std::memcpy(c.mac, mac.data(), sizeof(c.mac));
        if (send(q.fd, &c, sizeof(c), MSG_NOSIGNAL | MSG_DONTWAIT) != ssize_t(sizeof(c))) {
          refuse(i, "could not send the challenge", false);
          continue;
        }
        q.stage = 1;
        continue;
      }
      Digest want2 = proofOf(q.secret, 'W', h, q.nonce);
      if (!digestEqual(want2.data(), q.proof.mac)) {
        refuse(i, cat("claimed to be worker ", h.worker, " of job ", std::string(h.job, kJobIdLen),
                      " but failed the challenge (no or wrong job secret, or a replayed handshake)"),
               false);
        continue;
      }
      int fd = q.fd;
      std::string from = q.from;
      AdmitInfo info{h};
      pend.erase(pend.begin() + long(i));
      admit(fd, from, info);
    }
    // Beyond the cap the oldest handshakes go, after the pass above: erasing before it would shift `pend` against
    // `pfds`, pairing one connection's readiness with another's socket.
    while (pend.size() > kMaxPending) refuse(0, "too many connections in their handshake", false);
  }
}

}  // namespace plait
