// The collectives: free functions over a communicator's engine verbs (Comm::begin / postSend / postRecv /
// postRecvReduce / waitAll / localCopy / localReduce), each a schedule from schedules.h or a direct exchange.
// Buffers are host memory, or device memory while the communicator is in device mode (Comm::setDevice): then each
// collective copies through the staging buffer (device_collectives.cc) and runs the same code there. Counts are
// elements. Every rank of the group must make the same calls in the same order.
#pragma once

#include <chrono>
#include <vector>

#include "plait/algo/cost_model.h"
#include "plait/comm.h"

namespace plait {
namespace coll {

void allreduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, Algo algo = Algo::kAuto);
void broadcast(Comm& c, void* buf, size_t bytes, int root);
// Result lands in buf on root; other ranks' buf are left unchanged.
void reduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, int root);
// out holds size() blocks of bytes[i] each, packed; in is this rank's block (may alias its place in out).
void allgather(Comm& c, const void* in, void* out, const std::vector<size_t>& bytes);
// in holds size() packed blocks of counts[i] elements; out receives the reduction of block rank().
void reduceScatter(Comm& c, const void* in, void* out, const std::vector<size_t>& counts, DType dtype, RedOp op);
// Block i of in (sendBytes[i]) goes to rank i; block j of out (recvBytes[j]) comes from rank j.
void alltoall(Comm& c, const void* in, const std::vector<size_t>& sendBytes, void* out,
              const std::vector<size_t>& recvBytes);
void gather(Comm& c, const void* in, size_t bytes, void* out, int root);
void scatter(Comm& c, const void* in, void* out, size_t bytes, int root);
void barrier(Comm& c);
void monitoredBarrier(Comm& c, std::chrono::milliseconds timeout, bool waitAllRanks);

// All-reduce (SUM, or AVG when `average`: values are divided by the group size before they are quantized) of a
// float32 / bfloat16 / float16 buffer, block-quantized with `spec` on the wire (algo/compressed.cc): the direct
// schedule, or the hierarchical one when compressedHierarchical(c). Results are bitwise identical on every rank;
// every element is quantized at most twice.
// residual (optional, float32 SUM on the direct schedule): receives, for each value, what this rank's quantization
// dropped (value - decoded; 0 on the range it owns), for error feedback; zero-filled on the hierarchical schedule.
void allreduceCompressed(Comm& c, void* buf, size_t count, DType dtype, bool average, const codec::Spec& spec,
                         float* residual = nullptr);
// Every host has the same number (> 1) of this group's ranks, and there are several hosts.
bool compressedHierarchical(const Comm& c);

// Summation servers (algo/servers.cc): the planner's split for an all-reduce of `bytes` on this group (share 0:
// none), and the all-reduce itself after begin(); false (nothing done) when the split sends nothing to the servers.
// With `spec` (a compressed all-reduce after its begin(): SUM, or AVG when `average`), both shares travel encoded
// and `residual` (optional) receives the error feedback as allreduceCompressed describes (zero-filled when some
// host has several ranks: the in-host reduction runs in full precision first).
ServerSplit serverSplitFor(const Comm& c, size_t bytes);
bool serverAllreduce(Comm& c, char* buf, size_t count, DType dtype, RedOp op, const codec::Spec* spec = nullptr,
                     bool average = false, float* residual = nullptr);

// Device mode: the same collectives through the staging buffer (device_collectives.cc); the ones above call these
// when Comm::stageOnDevice() says so.
void deviceAllreduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, Algo algo);
// The share of a device all-reduce of `bytes` that takes the host path, agreed on every rank (device mode): 1 on the
// host path's own stages, 0 without it beside the device engine, PLAIT_HOST_SHARE when set, else the planner's
// (planHostSplit), measuring the rates first at the first call that needs them (every local rank calls it there).
HostSplit hostSplitFor(Comm& c, size_t bytes);
void deviceBroadcast(Comm& c, void* buf, size_t bytes, int root);
void deviceReduce(Comm& c, void* buf, size_t count, DType dtype, RedOp op, int root);
void deviceAllgather(Comm& c, const void* in, void* out, const std::vector<size_t>& bytes);
void deviceReduceScatter(Comm& c, const void* in, void* out, const std::vector<size_t>& counts, DType dtype,
                         RedOp op);
void deviceAlltoall(Comm& c, const void* in, const std::vector<size_t>& sendBytes, void* out,
                    const std::vector<size_t>& recvBytes);
void deviceGather(Comm& c, const void* in, size_t bytes, void* out, int root);
void deviceScatter(Comm& c, const void* in, void* out, size_t bytes, int root);

}  // namespace coll
}  // namespace plait
