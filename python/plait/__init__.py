"""plait: native-accelerated collectives for PyTorch.

``import plait`` registers the ``"plait"`` torch.distributed backend for CPU and CUDA tensors (CUDA when plait was
built with the CUDA toolkit; see ``cuda_available()``)::

    import plait
    dist.init_process_group("plait")   # the only change to a working DDP script

Per-group settings go through ``pg_options=plait.Options(...)``; ``topology()`` and ``plan_allreduce()`` show what
the cost model sees and picks; ``monitored_barrier()`` stands in for torch's gloo-only one. Environment knobs
(``PLAIT_ALGO``, ``PLAIT_DEBUG``, ...) are listed in the README.
"""

from ._backend import (AllreducePlan, HostPathPlan, Options, ServerCount, ServersPlan, all_reduce, monitored_barrier,
                       plan_allreduce, plan_host_path, plan_servers, topology)
from . import hooks
from . import _C

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when plait was built with its CUDA kernels and a CUDA device is usable in this process."""
    return _C.cuda_compiled() and _C.cuda_device_count() > 0


__all__ = ["AllreducePlan", "HostPathPlan", "plan_host_path", "plan_servers", "ServersPlan", "ServerCount", "Options", "all_reduce", "hooks", "monitored_barrier", "plan_allreduce", "topology", "cuda_available", "__version__"]
