"""Multi-process launcher for plait's tests.

``run_world(fn, world_size, *args)`` starts ``world_size`` fresh Python processes. Each one imports plait (when
the backend under test is plait), joins a process group, calls ``fn(rank, world_size, *args)``, writes the
return value (or the exception and its traceback) to a file, and destroys the group. The parent waits with a
hard wall-clock limit, kills every child it started on overrun, and fails the test with the traceback of each
failed rank or the list of ranks that hung (with their Python stacks, dumped by faulthandler).

``fn`` must be a module-level function of an importable module under ``tests/`` (the child imports it by
file path); ``args`` and the return value must be picklable.

The backend under test is ``BACKEND`` (env ``PLAIT_TEST_BACKEND``, default ``plait``). Setting it to ``gloo``
runs the same tests against gloo, to validate the tests themselves; plait-only features are skipped via
``IS_PLAIT``.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

BACKEND = os.environ.get("PLAIT_TEST_BACKEND", "plait")
IS_PLAIT = BACKEND == "plait"
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Set in the child process before fn runs.
CTX: "ChildContext | None" = None


@dataclasses.dataclass
class ChildContext:
    rank: int
    world_size: int
    backend: str
    init: str | None
    init_method: str | None
    pg_timeout_s: float
    workdir: str
    options: dict | None


@dataclasses.dataclass
class RankResult:
    rank: int
    ok: bool = False
    value: Any = None
    exc_type: str | None = None  # qualified class name, e.g. "torch.distributed.DistBackendError"
    exc_mro: tuple = ()  # names of the exception's classes (for isinstance-like checks in the parent)
    exc_msg: str | None = None
    tb: str | None = None
    elapsed_s: float | None = None  # time fn ran (until it returned or raised)
    returncode: int | None = None
    reported: bool = False  # the child wrote a result file
    hung: bool = False  # killed by the harness (never finished fn)
    shutdown_hung: bool = False  # finished fn but did not exit within the grace period
    log: str = ""

    def describe(self) -> str:
        if self.hung:
            state = "HUNG (killed by harness)"
        elif not self.reported:
            state = f"DIED without reporting (exit code {self.returncode})"
        elif self.ok:
            state = "ok"
        else:
            state = f"raised {self.exc_type}: {self.exc_msg}"
        return f"rank {self.rank}: {state}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_files(prefix: str = "plait") -> set[str]:
    return set(glob.glob(f"/dev/shm/{prefix}*"))


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def run_world(
    fn: Callable,
    world_size: int,
    *args,
    backend: str | None = None,
    init: str | None = "file",
    timeout_s: float = 240.0,
    pg_timeout_s: float = 60.0,
    env: dict | None = None,
    rank_env: dict | None = None,
    options: dict | None = None,
    expect_fail: bool = False,
    shutdown_grace_s: float = 30.0,
    port: int | None = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes.

    backend: backend of the default group (default ``BACKEND``).
    init: "file" | "tcp" | "env" | None (None: fn sets up the process group itself; see ``CTX``).
    timeout_s: hard wall-clock limit for the whole launch.
    pg_timeout_s: ``timeout=`` passed to init_process_group.
    env: extra environment for every child; rank_env: {rank: {name: value}} for single ranks.
    options: kwargs for ``plait.Options`` passed as ``pg_options`` (ignored unless the backend is plait).
    expect_fail: return the list of ``RankResult`` instead of failing the test when a rank fails.
    port: the rendezvous store's port for init "tcp" / "env" (default: a free one), e.g. one that summation servers
    were started against.

    Returns the list of per-rank return values (or ``RankResult`` objects when ``expect_fail``).
    """
    import pytest

    backend = backend or BACKEND
    workdir = tempfile.mkdtemp(prefix="plait_test_world_")
    init_method = None
    port = port or None  # the caller's, else a free one below
    if init == "file":
        init_method = f"file://{workdir}/filestore"
    elif init == "tcp":
        port = port or free_port()
        init_method = f"tcp://127.0.0.1:{port}"
    elif init == "env":
        port = port or free_port()
        init_method = "env://"
    elif init is not None:
        raise ValueError(f"unknown init {init!r}")

    mod = sys.modules[fn.__module__]
    spec = {
        "module_name": fn.__module__,
        "module_file": os.path.abspath(mod.__file__),
        "qualname": fn.__qualname__,
        "args": args,
        "backend": backend,
        "init": init,
        "init_method": init_method,
        "pg_timeout_s": pg_timeout_s,
        "options": options,
        "workdir": workdir,
    }
    spec_path = os.path.join(workdir, "spec.pkl")
    with open(spec_path, "wb") as f:
        pickle.dump(spec, f)

    base_env = dict(os.environ)
    base_env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
    )
    if init == "env":
        base_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size))
    if env:
        base_env.update({k: str(v) for k, v in env.items()})

    procs = []
    logs = []
    child_code = (
        "import sys; sys.path.insert(0, %r); import _harness; _harness._child_main(%r)" % (TESTS_DIR, spec_path)
    )
    for rank in range(world_size):
        e = dict(base_env)
        e["PLAIT_TEST_RANK"] = str(rank)
        e["PLAIT_TEST_WORLD_SIZE"] = str(world_size)
        if init == "env":
            e["RANK"] = str(rank)
            e["LOCAL_RANK"] = str(rank)
        if rank_env and rank in rank_env:
            e.update({k: str(v) for k, v in rank_env[rank].items()})
        log_path = os.path.join(workdir, f"rank{rank}.log")
        logf = open(log_path, "wb")
        logs.append(log_path)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", child_code],
                env=e,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=TESTS_DIR,
            )
        )
        logf.close()

    def result_path(r):
        return os.path.join(workdir, f"result{r}.pkl")

    deadline = time.monotonic() + timeout_s
    shutdown_deadline = {}
    hung = set()
    shutdown_hung = set()
    try:
        while True:
            now = time.monotonic()
            alive = [r for r, p in enumerate(procs) if p.poll() is None]
            if not alive:
                break
            for r in alive:
                if os.path.exists(result_path(r)) and r not in shutdown_deadline:
                    shutdown_deadline[r] = now + shutdown_grace_s
            overdue_shutdown = [r for r in alive if r in shutdown_deadline and now > shutdown_deadline[r]]
            if now > deadline or overdue_shutdown:
                victims = alive if now > deadline else overdue_shutdown
                for r in victims:
                    if r in shutdown_deadline:
                        shutdown_hung.add(r)
                    else:
                        hung.add(r)
                _kill(procs, victims)
                if now > deadline:
                    break
                continue
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                _killpg(p, signal.SIGKILL)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    results = []
    for r, p in enumerate(procs):
        res = RankResult(rank=r, returncode=p.returncode)
        try:
            with open(logs[r], "rb") as f:
                res.log = f.read().decode("utf-8", "replace")
        except OSError:
            pass
        if os.path.exists(result_path(r)):
            with open(result_path(r), "rb") as f:
                data = pickle.load(f)
            res.reported = True
            res.__dict__.update(data)
        res.hung = r in hung
        res.shutdown_hung = r in shutdown_hung
        results.append(res)

    if not any(r.hung or r.shutdown_hung for r in results):
        shutil.rmtree(workdir, ignore_errors=True)  # logs are in the results; keep the dir only after a hang

    if expect_fail:
        return results

    problems = [res for res in results if not (res.reported and res.ok)]
    if problems:
        lines = [f"{len(problems)} of {world_size} ranks failed ({fn.__qualname__}, backend={backend}, init={init}):"]
        for res in problems:
            lines.append("=" * 30 + " " + res.describe())
            if res.tb:
                lines.append(res.tb)
            lines.append("-" * 10 + f" rank {res.rank} output (tail):\n" + _tail(res.log))
        others = [res for res in results if res not in problems]
        if others:
            lines.append("other ranks: " + "; ".join(res.describe() for res in others))
        pytest.fail("\n".join(lines), pytrace=False)
    if shutdown_hung:
        lines = [f"ranks {sorted(shutdown_hung)} finished {fn.__qualname__} but did not exit (destroy/shutdown hang):"]
        for r in sorted(shutdown_hung):
            lines.append("-" * 10 + f" rank {r} output (tail):\n" + _tail(results[r].log))
        pytest.fail("\n".join(lines), pytrace=False)
    bad_exit = [res for res in results if res.returncode != 0]
    if bad_exit:
        pytest.fail(
            "ranks exited non-zero after reporting success: "
            + ", ".join(f"rank {res.rank} rc={res.returncode}\n{_tail(res.log, 2000)}" for res in bad_exit),
            pytrace=False,
        )
    return [res.value for res in results]


def _killpg(p, sig):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(procs, ranks):
    # Ask for Python stacks first (faulthandler is registered on SIGUSR1 in the child), then kill.
    for r in ranks:
        try:
            procs[r].send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(1.0)
    for r in ranks:
        _killpg(procs[r], signal.SIGKILL)
    for r in ranks:
        try:
            procs[r].wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def format_results(results) -> str:
    return "\n".join(r.describe() for r in results)


# ---------------------------------------------------------------------------------------------------------------
# child side


def _child_main(spec_path: str) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    rank = int(os.environ["PLAIT_TEST_RANK"])
    world_size = int(os.environ["PLAIT_TEST_WORLD_SIZE"])
    workdir = spec["workdir"]
    out_path = os.path.join(workdir, f"result{rank}.pkl")

    global CTX
    CTX = ChildContext(
        rank=rank,
        world_size=world_size,
        backend=spec["backend"],
        init=spec["init"],
        init_method=spec["init_method"],
        pg_timeout_s=spec["pg_timeout_s"],
        workdir=workdir,
        options=spec["options"],
    )

    result: dict = {"ok": False}
    initialized = False
    t0 = time.monotonic()
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if spec["backend"] == "plait" or IS_PLAIT:
            import plait  # noqa: F401  (registers the backend)

        msd = importlib.util.spec_from_file_location(spec["module_name"], spec["module_file"])
        module = importlib.util.module_from_spec(msd)
        sys.modules[spec["module_name"]] = module
        msd.loader.exec_module(module)
        fn = module
        for part in spec["qualname"].split("."):
            fn = getattr(fn, part)

        if spec["init"] is not None:
            init_process_group(rank, world_size)
            initialized = True
        t0 = time.monotonic()
        value = fn(rank, world_size, *spec["args"])
        result = {"ok": True, "value": value}
    except BaseException as e:  # noqa: BLE001
        result = {
            "ok": False,
            "exc_type": f"{type(e).__module__}.{type(e).__qualname__}",
            "exc_mro": tuple(c.__name__ for c in type(e).__mro__),
            "exc_msg": str(e),
            "tb": traceback.format_exc(),
        }
    result["elapsed_s"] = time.monotonic() - t0
    try:
        data = pickle.dumps(result)
    except Exception as e:  # noqa: BLE001
        result["value"] = repr(result.get("value"))
        result.setdefault("tb", f"(return value not picklable: {e})")
        data = pickle.dumps(result)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)
    sys.stdout.flush()
    sys.stderr.flush()

    if initialized and result["ok"]:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    elif not result["ok"]:
        # After a failure, do not risk hanging in teardown; the failure is already recorded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


def make_options(options: dict | None):
    """plait.Options(**options) under plait, None otherwise."""
    if options is None or not IS_PLAIT:
        return None
    import plait

    return plait.Options(**options)


def init_process_group(rank: int, world_size: int, **kwargs):
    """Initialise the default group from CTX (used by the child, and by fns that re-initialise)."""
    from datetime import timedelta

    import torch.distributed as dist

    ctx = CTX
    kw = dict(
        backend=ctx.backend,
        init_method=ctx.init_method,
        timeout=timedelta(seconds=ctx.pg_timeout_s),
    )
    if ctx.init != "env":
        kw.update(rank=rank, world_size=world_size)
    if ctx.options is not None and ctx.backend == "plait":
        kw["pg_options"] = make_options(ctx.options)
    kw.update(kwargs)
    dist.init_process_group(**kw)


def expect_raise(fn, *needles):
    """Calls fn (waiting on the Work it returns, if any); it must raise a RuntimeError (DistBackendError included)
    whose message contains every needle (case-insensitive). Returns the message."""
    try:
        w = fn()
        if w is not None and hasattr(w, "wait"):
            w.wait()
    except RuntimeError as e:
        msg = str(e)
        for n in needles:
            assert n.lower() in msg.lower(), f"error message lacks {n!r}: {msg!r}"
        return msg
    raise AssertionError(f"no exception (expected one mentioning {needles})")
