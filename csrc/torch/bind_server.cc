// Python bindings of the summation servers: the server itself (python -m plait.server / plait-server) and the
// planner's formulas (plait.plan_servers).
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "plait/algo/cost_model.h"
#include "plait/server/link.h"
#include "plait/server/server.h"
#include "torch/backend.h"

namespace py = pybind11;

namespace plait_torch {

void register_server(py::module_& m) {
  py::class_<plait::SumServer>(m, "SumServer")
      .def(py::init([](const c10::intrusive_ptr<c10d::Store>& store, int port, const std::string& advertise,
                       const std::string& storeHost, int threads, size_t depth) {
             plait::ServerOptions o;
             o.port = port;
             o.advertise = advertise;
             o.storeHost = storeHost;
             o.threads = threads;
             o.depth = depth;
             return std::make_unique<plait::SumServer>(std::make_shared<StoreAdapter>(store), o);
           }),
           py::arg("store"), py::arg("port") = 0, py::arg("advertise") = "", py::arg("store_host") = "",
           py::arg("threads") = 0, py::arg("depth") = 4)
      .def_property_readonly("address", &plait::SumServer::address)
      .def("register", &plait::SumServer::registerSelf, py::call_guard<py::gil_scoped_release>())
      .def("deregister", &plait::SumServer::deregister, py::call_guard<py::gil_scoped_release>())
      .def("start", &plait::SumServer::start)
      .def("stop", &plait::SumServer::stop, py::call_guard<py::gil_scoped_release>())
      .def("recent_log", &plait::SumServer::recentLog)
      .def("stats", [](const plait::SumServer& s) {
        auto st = s.stats();
        py::dict d;
        d["jobs_started"] = st.jobsStarted;
        d["jobs_active"] = st.jobsActive;
        d["jobs_aborted"] = st.jobsAborted;
        d["refused"] = st.refused;
        d["segments"] = st.segments;
        d["bytes_in"] = st.bytesIn;
        d["bytes_out"] = st.bytesOut;
        d["peak_buffer_bytes"] = st.peakBufferBytes;
        return d;
      });
  m.def(
      "_server_time",
      [](int n, int k, double workerGbps, double serverGbps, double alphaUs, double bytes, double segBytes,
         double share) {
        auto p = share < 0 ? plait::planServerSplit(n, k, workerGbps / 8, serverGbps / 8, alphaUs, bytes, segBytes)
                           : plait::serverTime(n, k, workerGbps / 8, serverGbps / 8, alphaUs, bytes, segBytes, share);
        return py::make_tuple(p.share, p.predictedUs, p.ringUs, p.workerBytes, p.serverBytes, p.why);
      },
      "The summation servers' planner (cost_model.h planServerSplit; share < 0) or the time at a given share, for n "
      "workers and k servers with links in Gbit/s.",
      py::arg("n"), py::arg("k"), py::arg("worker_gbps"), py::arg("server_gbps"), py::arg("alpha_us"),
      py::arg("bytes"), py::arg("segment_bytes"), py::arg("share") = -1.0);
  m.def("_servers_saturate", &plait::serversSaturate, py::arg("n"), py::arg("worker_gbps"), py::arg("server_gbps"));
  m.def(
      "_ping_server", [](const std::string& addr, double waitS) {
        return plait::pingServer(addr, std::chrono::milliseconds(int64_t(waitS * 1000)));
      },
      py::arg("address"), py::arg("wait_s") = 1.0, py::call_guard<py::gil_scoped_release>());
}

}  // namespace plait_torch
