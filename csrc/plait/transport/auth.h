// Authentication of TCP connections: HMAC-SHA256 (FIPS 180-4 / RFC 2104) over a per-job secret that rank 0 draws
// from the kernel's random source and hands to the group through the c10d Store. Every connection runs a
// challenge-response in both directions before any data is accepted (see tcp.cc); nonces make a recorded
// handshake useless a second time.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace plait {

using Digest = std::array<uint8_t, 32>;

Digest sha256(const void* data, size_t n);
Digest hmacSha256(const std::string& key, const void* msg, size_t n);
// Compares without an early exit, so timing does not reveal how many bytes matched.
bool digestEqual(const uint8_t* a, const uint8_t* b, size_t n = 32);
// n bytes from getrandom(2); throws if the kernel cannot provide them.
void randomBytes(void* out, size_t n);
std::string toHex(const void* data, size_t n);
std::string fromHex(const std::string& hex);  // throws plait::Error on malformed input

}  // namespace plait
