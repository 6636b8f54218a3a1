// Socket helpers shared by the TCP transport (tcp.cc) and the summation servers' connections (server/): tuning,
// blocking I/O with a deadline for handshakes, and a connect that retries until a deadline.
#pragma once

#include <string>

#include "plait/common.h"

namespace plait {
namespace sock {

// TCP_NODELAY, bounded kernel buffers, keepalive / TCP_USER_TIMEOUT after PLAIT_TCP_DEAD_PEER_S (before connect).
void tune(int fd);
void setNonBlocking(int fd, bool on);
// Moves exactly n bytes (blocking socket or not) unless the deadline passes or the connection fails: false then.
bool ioAll(int fd, void* buf, size_t n, bool isWrite, Clock::time_point deadline);
// The local address of the interface that routes towards `host` (PLAIT_SOCKET_ADDR when set; "127.0.0.1" when
// there is no route or no host).
std::string routeTo(const std::string& host);
// "a.b.c.d:port" of the remote end, or "?".
std::string peerName(int fd);
// Connects to "host:port" (a blocking socket, tuned), retrying refused / unreachable attempts every 20 ms until the
// deadline (retry false: one attempt); throws plait::Error "<what>: cannot connect to host:port: <reason>".
int dial(const std::string& hostPort, Clock::time_point deadline, const std::string& what, bool retry = true);

}  // namespace sock
}  // namespace plait
