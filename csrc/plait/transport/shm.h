// Shared-memory transport between ranks on one host: every rank owns one segment holding a single-producer /
// single-consumer byte ring per sender, plus a doorbell (futex eventcount) that peers ring after they write into
// its rings or drain the rings it writes to. Segments are unlinked as soon as every local peer has mapped them,
// so nothing is left in /dev/shm whatever way the job ends.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "plait/transport/channel.h"

namespace plait {

struct ShmSegHeader;

// Sizes a new shared-memory object and reserves its pages (posix_fallocate): on a small /dev/shm (Docker's default is
// 64 MiB) ftruncate alone succeeds and the first touch of a page beyond what tmpfs can give kills the process with
// SIGBUS mid-collective. Throws naming `what`, the size and /dev/shm.
void reserveShm(int fd, size_t bytes, const std::string& name, const std::string& what);
// Liveness without process ids (which differ across PID namespaces and get reused): the owner of a shared-memory
// object holds an open-file-description lock on it for as long as it lives; the kernel drops the lock when the
// process ends, however it ends. holdLiveness takes it (false where the kernel has no OFD locks); lockGone tells a
// peer, through its own descriptor of the object, whether the owner's lock is gone.
bool holdLiveness(int fd);
void closeLiveness(int fd);  // closes a descriptor passed to holdLiveness (the lock goes with it)
bool lockGone(int fd);

class ShmDomain {
 public:
  // Creates and maps this rank's segment: one ring (ringBytes) per rank of `local` (the ranks of this group on this
  // host, increasing, this rank included), indexed by the sender's position in `local`.
  ShmDomain(const std::string& name, int rank, const std::vector<int>& local, size_t ringBytes);
  ~ShmDomain();
  const std::string& name() const { return name_; }
  // Maps a local peer's segment, published by its rank under the given name.
  void attach(int peer, const std::string& name);
  void unlinkOwn();
  std::unique_ptr<Channel> channel(int peer);

  // Eventcount on this rank's doorbell.
  // Sleeping on the doorbell: announce(), re-check for work, then sleep(ticket) or retract(). Peers bump the
  // doorbell only when a waiter has announced itself, so the busy path costs no shared-line writes.
  uint32_t announce();
  void sleep(uint32_t ticket, int64_t micros);
  void retract();
  // Waiting on shared memory and TCP at once: announcePoll(), re-check for work, poll(2) on the TCP sockets and
  // bellFd() (peers that change a ring send it a datagram while a poller is announced), then retractPoll().
  void announcePoll();
  void retractPoll();
  int bellFd() const { return bellFd_; }
  // Rings this rank's own doorbell (wakes a thread of this process sleeping in sleep() or in poll on bellFd()).
  void poke();
  // Marks every attached peer's segment as aborted by this rank, with its error, and wakes it.
  void abortPeers(const std::string& why);
  // Rank that aborted this rank's communicator, or -1; *why gets its error.
  int abortedBy(std::string* why = nullptr) const;
  // The attached peer's process has ended (its liveness lock is gone; pid check where locks are unavailable).
  bool peerGone(int peer) const;

 private:
  friend class ShmChannel;
  struct Mapping {
    void* base = nullptr;
    size_t bytes = 0;
  };
  static ShmSegHeader* header(void* base) { return static_cast<ShmSegHeader*>(base); }
  int slot(int rank) const;  // position of `rank` in local_
  std::string name_;
  int rank_, nranks_;
  std::vector<int> local_;
  int ownFd_ = -1;
  std::vector<int> peerFds_;
  size_t ringBytes_, segBytes_;
  Mapping own_;
  std::vector<ShmSegHeader*> peers_;
  std::vector<Mapping> peerMaps_;
  bool unlinked_ = false;
  int bellFd_ = -1;
};

void ringBell(ShmSegHeader* h);

}  // namespace plait
