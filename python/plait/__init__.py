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
from . import trace

import os as _os

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when plait was built with its CUDA kernels and a CUDA device is usable in this process."""
    return _C.cuda_compiled() and _C.cuda_device_count() > 0


def trace_dump(directory: str | None = None, reason: str = "plait.trace_dump()") -> list[str]:
    """Writes the flight record of every live plait group of this process (its last ``PLAIT_TRACE_BUFFER``
    collectives) as JSON into ``directory`` (default: ``PLAIT_TRACE_DIR``, else the current directory); returns the
    paths. Read them with ``python -m plait.trace DIR``."""
    d = directory or _os.environ.get("PLAIT_TRACE_DIR") or "."
    return list(_C._trace_dump(str(d), reason))


def trace_records() -> list[dict]:
    """The flight record of every live plait group of this process, as dicts (what ``trace_dump`` writes)."""
    import json
    return [json.loads(t) for t in _C._trace_json("plait.trace_records()")]


__all__ = ["trace", "trace_dump", "trace_records", "AllreducePlan", "HostPathPlan", "plan_host_path", "plan_servers", "ServersPlan", "ServerCount", "Options", "all_reduce", "hooks", "monitored_barrier", "plan_allreduce", "topology", "cuda_available", "__version__"]
