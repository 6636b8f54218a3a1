// CUDA kernels: pure functions over device buffers, enqueued on a stream; no knowledge of ranks, no torch and no
// CUDA headers here (streams are passed as void*, a cudaStream_t). Every function returns a cudaError_t as int
// (0: enqueued). Compiled only when nvcc is found (plait_cuda); without it, cuda_stub.cc makes them return an error.
//
// Element-wise semantics are exactly those of the CPU kernels (kernels/reduce_impl.h): half types widen to float32
// and round to nearest even once; min is `b < a ? b : a`, max is `a < b ? b : a`; integer results wrap; bool is a
// byte 0/1 (sum/max = or, prod/min = and, band/bor/bxor on the truth values).
#pragma once

#include <cstddef>
#include <cstdint>

#include "plait/common.h"

namespace plait {
namespace cuda {

// dst[i] = a[i] op b[i] for i < n elements; dst may alias a or b exactly. 16-byte vector loads and stores where the
// three pointers are equally aligned modulo 16 (after a scalar head up to the first boundary), a scalar tail, scalar
// throughout otherwise; a grid sized from the device's multiprocessor count. Pointers must be element-aligned.
int reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t n, void* stream);

// dst[0, bytes) = src[0, bytes); 16-byte vectorized when aligned. dst and src must not overlap partially.
int copy(void* dst, const void* src, size_t bytes, void* stream);

// A descriptor a peer published for one transfer (in memory the device can read): the offset of the bytes in the
// peer's buffer and their length, 64 bits each (staging buffers may exceed 4 GiB), then the key of the collective the
// publisher is in (PullKey: the device engine's receivers compare it with their own). The publisher writes each field
// as 32-bit words (stream memory operations are 32-bit) before it raises the ready flag, so a reader that saw the flag
// reads whole values.
struct PullKey {
  uint32_t seq;   // the collective's sequence number
  uint32_t word;  // collective, dtype, op, root and schedule, packed (DeviceEngine::keyOf)
};
struct PullDesc {
  uint64_t offset;
  uint64_t bytes;
  PullKey key;
};
static_assert(sizeof(PullDesc) == 24, "PullDesc is six 32-bit words");
// Where a keyed pull that disagreed leaves what it saw (32-bit words after *err, written before *err by the one
// reporter): the descriptor's key and length, then the expected key and length.
enum PullErrWord : uint32_t {
  kErrGotSeq = 2, kErrGotWord, kErrExpSeq, kErrExpWord, kErrGotBytesLo, kErrGotBytesHi, kErrExpBytesLo,
  kErrExpBytesHi, kErrWords
};

// The fused receive step of an algorithm over CUDA IPC: reads `*desc` on the device (the host does not know it when
// it enqueues), takes src = peerBase + desc->offset, and
//   withReduce false: dst[0, bytes) = src
//   withReduce true:  dst[i] = dst[i] op src[i] over bytes / sizeof(dt) elements (one pass over memory)
// If desc->bytes != bytes (or src is not aligned to an element of dt) nothing is written and, if *err is 0,
// *err = errCode (atomically): the host reads *err (mapped host memory) and reports which peer disagreed. bytes must
// be whole elements and dst element-aligned (else cudaErrorInvalidValue, nothing enqueued). Alignment is decided on the device (16-byte vector path
// when dst and src are aligned, else scalar).
int pull(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
         uint32_t* err, uint32_t errCode, void* stream);
// The same, and the descriptor's key must equal `expect` too (a peer in another collective with the same byte count
// is flagged like a length mismatch). On any mismatch the reporter also writes err[kErrGotSeq .. kErrExpBytesHi]
// (before *err) so the host can name both sides. bytes == 0 still launches (one thread) to check the key.
int pullKeyed(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
              PullKey expect, uint32_t* err, uint32_t errCode, void* stream);

// Block-quantization codecs (cuda/codec.cu): the wire format, rounding and NaN rules of kernels/codec.h, computed
// with the same functions as the CPU kernels (kernels/codec_impl.h), so the bytes written and the values decoded are
// bit for bit the CPU's. `codec` is a plait::codec::Codec value (int8 1, int4 2, fp8 3, bf16 4; none is invalid
// here); block 0 means the codec's default, any other block must be a multiple of 8 in [8, 65536]; dt is float32,
// bfloat16 or float16. Value buffers (src of encode, dst of decode, acc) must be aligned to their element; encoded
// buffers may start at any byte. Buffers must not overlap. Invalid arguments return cudaErrorInvalidValue and
// enqueue nothing; n == 0 enqueues nothing.
//
// Encodes n values of src (each divided by div unless div == 1; div must be finite and nonzero) into
// plait::codec::encodedBytes({codec, block}, n) bytes at dst.
int codecEncode(uint8_t codec, uint32_t block, DType dt, const void* src, size_t n, float div, void* dst,
                void* stream);
// dst[i] = decoded value i rounded to nearest even to dt, for i < n.
int codecDecode(uint8_t codec, uint32_t block, const void* src, size_t n, DType dt, void* dst, void* stream);
// acc[i] = acc[i] + decoded value i (float32, one rounding, not fused), for i < n.
int codecDecodeAccumulate(uint8_t codec, uint32_t block, const void* src, size_t n, float* acc, void* stream);

// Multiprocessors of the current device (cached per device); 0 if unknown.
int smCount();

}  // namespace cuda
}  // namespace plait
