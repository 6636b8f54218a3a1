// Transports move bytes between two ranks and nothing else. A Channel is the pair of byte streams to one peer;
// all calls are non-blocking and return how much they did, the engine decides when to wait.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace plait {

enum class TransportKind : uint8_t { kShm, kTcp };

class Channel {
 public:
  virtual ~Channel() = default;
  virtual TransportKind kind() const = 0;
  // Appends up to n bytes of src to the outgoing stream; returns how many were taken (0: no room now).
  virtual size_t write(const void* src, size_t n) = 0;
  // Points *p at readable bytes, contiguous, without copying; returns their count (0: none yet).
  virtual size_t peek(const void** p) = 0;
  // Drops n bytes that peek() exposed.
  virtual void consume(size_t n) = 0;
  // Copies up to n readable bytes into dst (across a wrap); returns how many.
  virtual size_t read(void* dst, size_t n) = 0;
  // Total readable bytes now (may exceed what peek shows contiguously).
  virtual size_t available() = 0;
  // A descriptor to poll(2) for readability (forWrite false) or writability of the next bytes; -1 if none.
  virtual int pollFd(bool forWrite) const { return -1; }
};

}  // namespace plait
