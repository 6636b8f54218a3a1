// TCP transport between ranks on different hosts (or on one host with PLAIT_TRANSPORT=tcp): PLAIT_TCP_STREAMS
// sockets per peer pair, non-blocking, TCP_NODELAY, bounded socket buffers. The lower rank listens, the higher
// connects. Every connection is authenticated before any data is accepted: a mutual HMAC-SHA256
// challenge-response over the job's secret (auth.h), bound to both ranks, the stream index and a fresh nonce
// from each side. A connection that fails it (no secret, a wrong one, garbage, a replayed handshake, a rank that
// is already connected) is logged and closed, and the listener keeps waiting for the real peer.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "plait/transport/channel.h"

namespace plait {

class TcpDomain {
 public:
  TcpDomain(int rank, int nranks, int streams);
  ~TcpDomain();
  // "addr:port" to publish; addr is PLAIT_SOCKET_ADDR, else the local address that routes to `hint`.
  std::string listenAddress(const std::string& hint) const;
  // Connects to all peers in `peers` (addresses indexed by rank): dials lower ranks, accepts higher ones.
  // `secret` is the job's shared secret, `jobId` a per-incarnation string both sides bind into the proofs.
  void connectAll(const std::vector<int>& peers, const std::vector<std::string>& addrs, const std::string& secret,
                  const std::string& jobId, int64_t timeoutMs);
  void closeListener();
  // `peerDesc` names the peer in errors ("peer rank 3 on host 10.0.0.2 (ranks 2, 3)").
  std::unique_ptr<Channel> channel(int peer, const std::string& peerDesc);
  int streams() const { return streams_; }
  // The pair's control connection (beside the data streams): carries only a failing rank's error.
  int controlFd(int peer) const { return fds_[peer][streams_]; }
  // The socket of data stream `stream` to `peer` (tests and fuzz targets write raw bytes into it).
  int fd(int peer, int stream) const { return fds_[peer][stream]; }
  // Shuts every connection down so peers see the failure at once.
  void abortAll();

 private:
  void dial(int peer, int stream, const std::string& hostPort, const std::string& secret, const std::string& jobId,
            int64_t deadlineMs);
  int rank_, nranks_, streams_;
  int listenFd_ = -1;
  int port_ = 0;
  std::vector<std::vector<int>> fds_;  // [peer][stream]; stream `streams_` is the control connection
};

}  // namespace plait
