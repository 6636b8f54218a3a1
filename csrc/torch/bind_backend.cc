#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "plait/algo/cost_model.h"
#include "plait/transport/auth.h"
#include "torch/backend.h"
#include "plait/algo/collectives.h"

namespace py = pybind11;

namespace plait_torch {

static py::tuple splitTuple(const plait::HostSplit& h) {
  return py::make_tuple(h.share, h.predictedUs, h.deviceOnlyUs, h.hostOnlyUs, h.why);
}

static py::dict ratesDict(const plait::HostPathRates& r) {
  py::dict d;
  d["measured"] = r.measured;
  d["pcie_gbps"] = r.pcieGBps;
  d["sum_gbps"] = r.sumGBps;
  d["path_gbps"] = r.pathGBps;
  d["device_gbps"] = r.deviceGBps;
  d["host_call_us"] = r.hostCallUs;
  d["device_call_us"] = r.deviceCallUs;
  return d;
}

static py::tuple planTuple(const plait::Comm& c, size_t bytes, bool device = false) {
  plait::Topology t = c.topology();
  t.device = device && c.deviceSupported();
  auto p = plait::planAllreduce(t, bytes, c.forcedAlgo());
  return py::make_tuple(std::string(plait::algoName(p.algo)), p.oneShot, p.predictedUs, plait::explain(p, t, bytes));
}

void register_backend(py::module_& m) {
  py::class_<PlaitBackend, c10d::Backend, c10::intrusive_ptr<PlaitBackend>>(m, "PlaitBackend")
      .def("monitored_barrier",
           [](PlaitBackend& self, std::optional<std::chrono::milliseconds> timeout, bool waitAll) {
             c10d::BarrierOptions o;  // no timeout: the group's
             if (timeout) o.timeout = *timeout;
             self.monitoredBarrier(o, waitAll);
           },
           py::arg("timeout") = py::none(), py::arg("wait_all_ranks") = false,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("group_timeout", [](PlaitBackend& self) { return self.comm().timeout(); })
      .def_property_readonly("topology",
                             [](PlaitBackend& self) {
                               const auto& t = self.comm().topology();
                               py::dict d;
                               d["nranks"] = t.nranks;
                               d["nhosts"] = t.nhosts;
                               d["all_shm"] = t.allShm;
                               d["oversubscribed"] = t.oversubscribed;
                               d["max_local"] = t.maxLocal;
                               d["cpu_load"] = t.cpuLoad;
                               d["link_alpha_us"] = t.linkAlphaUs;
                               d["link_gbps"] = t.linkUsPerByte > 0 ? 8e-3 / t.linkUsPerByte : 0.0;
                               d["link_source"] = t.linkSource;
                               // "" until the first collective on device tensors (CUDA, or PLAIT_DEVICE=emulate)
                               d["device_engine"] = self.comm().deviceEngineName();
                               // the host path's rates (measured at the first device all-reduce that needs them)
                               d["host_path"] = ratesDict(self.comm().hostRates());
                               // bytes of device all-reduces summed by each path so far, and the rate measurements
                               d["device_engine_bytes"] = self.comm().deviceEngineBytes();
                               d["host_path_bytes"] = self.comm().hostPathBytes();
                               d["host_path_measurements"] = self.comm().hostMeasurements();
                               // summation servers (k = 0: none), and the all-reduce bytes each side summed
                               const auto& si = self.comm().servers();
                               py::dict sd;
                               sd["count"] = si.k;
                               sd["addresses"] = si.addrs;
                               sd["gbps"] = si.gbps * 8;
                               sd["source"] = si.source;
                               sd["server_bytes"] = self.comm().serverBytes();
                               sd["worker_bytes"] = self.comm().workerBytes();
                               d["servers"] = sd;
                               return d;
                             })
      .def("all_reduce",
           [](PlaitBackend& self, at::Tensor t, const c10d::ReduceOp& op, const std::string& compression,
              bool asyncOp) -> c10::intrusive_ptr<c10d::Work> {
             std::vector<at::Tensor> v{t};
             c10d::AllreduceOptions o;
             o.reduceOp = op;
             o.asyncOp = asyncOp;
             auto w = self.allreduceWith(v, o, compression);
             if (!asyncOp) {
               w->wait();
               return {};
             }
             return w;
           },
           py::arg("tensor"), py::arg("op"), py::arg("compression") = "", py::arg("async_op") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("_all_reduce_ef",
           [](PlaitBackend& self, at::Tensor t, at::Tensor residual, const std::string& compression)
               -> c10::intrusive_ptr<c10d::Work> {
             std::vector<at::Tensor> v{t};
             c10d::AllreduceOptions o;
             o.asyncOp = true;
             return self.allreduceWith(v, o, compression, residual);
           },
           py::arg("tensor"), py::arg("residual"), py::arg("compression"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("compression", [](PlaitBackend& self) { return self.compression(); })
      .def_property_readonly("compression_block", [](PlaitBackend& self) { return self.compressionBlock(); })
      .def("plan_compression",
           [](PlaitBackend& self, size_t count, const std::string& dtype, const std::string& compression) {
             const std::string mode = compression.empty() ? self.compression() : compression;
             plait::DType dt = plait::DType::kFloat32;
             if (dtype == "bfloat16") dt = plait::DType::kBFloat16;
             else if (dtype == "float16") dt = plait::DType::kFloat16;
             else if (dtype != "float32") dt = plait::DType::kInt64;  // not compressible
             plait::codec::Spec spec;
             if (mode != "none" && mode != "auto")
               spec = plait::codec::makeSpec(plait::codec::parseCodec(mode), self.compressionBlock());
             auto& c = self.comm();
             auto p = plait::planCompression(c.topology(), count, dt, mode == "auto", spec, self.compressionBlock(),
                                             c.forcedAlgo(), plait::coll::compressedHierarchical(c));
             return py::make_tuple(std::string(plait::codec::codecName(p.spec.codec)), p.spec.block, p.hier,
                                   p.plainUs, p.compressedUs, p.why);
           },
           py::arg("count"), py::arg("dtype") = "float32", py::arg("compression") = "")
      .def("plan_allreduce",
           [](PlaitBackend& self, size_t bytes, bool device) { return planTuple(self.comm(), bytes, device); },
           py::arg("bytes"), py::arg("device") = false)
      .def("plan_server_split",
           [](PlaitBackend& self, size_t bytes) {
             auto p = plait::coll::serverSplitFor(self.comm(), bytes);
             return py::make_tuple(p.share, p.predictedUs, p.ringUs, p.workerBytes, p.serverBytes, p.why);
           },
           py::arg("bytes"))
      .def("plan_host_split",
           [](PlaitBackend& self, size_t bytes) {
             auto& c = self.comm();
             return splitTuple(plait::decideHostSplit(c.deviceSupported(), c.hostRates(), bytes));
           },
           py::arg("bytes"));

  m.def(
      "_plan_host_split",
      [](size_t bytes, double pcieGBps, double sumGBps, double deviceGBps, double hostCallUs, double deviceCallUs,
         double pathGBps) {
        plait::HostPathRates r;
        r.measured = true;
        r.pcieGBps = pcieGBps;
        r.sumGBps = sumGBps;
        r.deviceGBps = deviceGBps;
        r.hostCallUs = hostCallUs;
        r.deviceCallUs = deviceCallUs;
        r.pathGBps = pathGBps;
        return splitTuple(plait::planHostSplit(r, bytes));
      },
      py::arg("bytes"), py::arg("pcie_gbps"), py::arg("sum_gbps"), py::arg("device_gbps"), py::arg("host_call_us"),
      py::arg("device_call_us"), py::arg("path_gbps"));

  m.def(
      "_trace_dump",
      [](const std::string& dir, const std::string& reason) {
        return plait::FlightRecorder::dumpAll(dir.empty() ? plait::knobs().traceDir : dir, reason);
      },
      py::arg("dir"), py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
      "Writes every live group's flight record (JSON) into dir; returns the paths.");
  m.def(
      "_trace_json", [](const std::string& reason) { return plait::FlightRecorder::jsonAll(reason); },
      py::arg("reason") = "on request", py::call_guard<py::gil_scoped_release>(),
      "Every live group's flight record as JSON text.");
  m.def(
      "_auth_key_fingerprint", [] { return plait::authKeyFingerprint(); },
      "PLAIT_AUTH_KEY_FILE's fingerprint as ranks compare it at rendezvous ('none' without a key file).");
  m.def(
      "_hmac_sha256",
      [](const py::bytes& key, const py::bytes& msg) {
        std::string k = key, m2 = msg;
        auto d = plait::hmacSha256(k, m2.data(), m2.size());
        return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
      },
      "HMAC-SHA256 as the TCP handshake computes it (exposed for tests).");
  m.def(
      "create_backend",
      [](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, std::chrono::milliseconds timeout,
         const std::string& algo, const std::string& transport, size_t chunkBytes, size_t shmRingBytes,
         const std::string& addressHint, const std::string& groupName, const std::string& compression,
         uint32_t compressionBlock, int servers, const c10::intrusive_ptr<c10d::Store>& rootStore,
         const std::string& storeDesc, const std::vector<int>& globalRanks) {
        plait::Options o;
        o.globalRanks = globalRanks;
        o.servers = servers;
        if (rootStore) o.rootStore = std::make_shared<StoreAdapter>(rootStore);
        o.storeDesc = storeDesc;
        o.compression = compression;
        o.compressionBlock = compressionBlock;
        o.algo = algo;
        o.transport = transport;
        o.chunkBytes = chunkBytes;
        o.shmRingBytes = shmRingBytes;
        o.addressHint = addressHint;
        o.groupName = groupName;
        return c10::make_intrusive<PlaitBackend>(store, rank, size, timeout, o);
      },
      py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"), py::arg("algo") = "",
      py::arg("transport") = "", py::arg("chunk_bytes") = 0, py::arg("shm_ring_bytes") = 0,
      py::arg("address_hint") = "", py::arg("group_name") = "", py::arg("compression") = "",
      py::arg("compression_block") = 0, py::arg("servers") = -1, py::arg("root_store") = nullptr,
      py::arg("store_desc") = "", py::arg("global_ranks") = std::vector<int>{},
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace plait_torch
