// TCP transport between ranks on different hosts (or on one host with PLAIT_TRANSPORT=tcp): one stream socket
// per peer pair, non-blocking, TCP_NODELAY. The lower rank listens, the higher connects and introduces itself.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "plait/transport/channel.h"

namespace plait {

class TcpDomain {
 public:
  TcpDomain(int rank, int nranks);
  ~TcpDomain();
  // "addr:port" to publish; addr is PLAIT_SOCKET_ADDR, else the local address that routes to `hint`.
  std::string listenAddress(const std::string& hint) const;
  // Connects to all peers in `peers` (addresses indexed by rank): dials lower ranks, accepts higher ones.
  // `token` is a per-job string every connection must present.
  void connectAll(const std::vector<int>& peers, const std::vector<std::string>& addrs, const std::string& token,
                  int64_t timeoutMs);
  void closeListener();
  std::unique_ptr<Channel> channel(int peer);
  int fd(int peer) const { return fds_[peer]; }
  // Shuts every connection down so peers see the failure at once.
  void abortAll();

 private:
  int rank_, nranks_;
  int listenFd_ = -1;
  int port_ = 0;
  std::vector<int> fds_;
};

}  // namespace plait
