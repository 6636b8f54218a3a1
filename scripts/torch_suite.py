"""Runs PyTorch's own distributed test suite (torch.testing._internal.distributed.distributed_test.DistributedTest,
world size 2, one pair of spawned processes per test) against plait.

The wheel does not ship test/distributed/test_distributed_spawn.py, so this script builds the equivalent class itself
(TestDistBackend + DistributedTest._DistTestBase, processes spawned in setUp). Three gatings:

  --gating gloo           the stock suite on gloo (the reference counts)
  --gating plait          BACKEND=plait: plait declared to torch's test tables as a CPU backend with DDP, subgroup and
                          plugin support; tests gated for gloo only are skipped
  --gating plait-as-gloo  BACKEND=gloo (the suite gated as for gloo) but every process group torch creates for "gloo"
                          is created on plait instead (get_backend() then answers "plait")

    .venv/bin/python scripts/torch_suite.py --gating plait-as-gloo            # whole suite, summary at the end
    .venv/bin/python scripts/torch_suite.py --gating plait -k barrier -v      # a subset (substring of test names)
    .venv/bin/python scripts/torch_suite.py --gating gloo --json /tmp/gloo.json

Slow (minutes: two fresh processes per test), so it is not part of `pytest tests`; tests/test_torch_suite.py runs it
when PLAIT_TORCH_SUITE=1 (see docs/torch-suite.md).

Everything below the argument parsing also runs in every spawned child (multiprocessing "spawn" re-imports this file
as __mp_main__): the environment, the test tables and the plait redirection must be in place there too.
"""

from __future__ import annotations

import os
import sys
import tempfile

GATINGS = ("gloo", "plait", "plait-as-gloo")


def _gating_from_argv() -> str:
    g = os.environ.get("PLAIT_TORCH_SUITE_GATING", "")
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--gating" and i + 1 < len(argv):
            g = argv[i + 1]
        elif a.startswith("--gating="):
            g = a.split("=", 1)[1]
    return g or "plait-as-gloo"


GATING = _gating_from_argv()
if GATING not in GATINGS:
    raise SystemExit(f"torch_suite: --gating must be one of {GATINGS}, got {GATING!r}")
os.environ["PLAIT_TORCH_SUITE_GATING"] = GATING  # for the spawned children
os.environ["BACKEND"] = "plait" if GATING == "plait" else "gloo"
os.environ.setdefault("WORLD_SIZE", "2")
if "TEMP_DIR" not in os.environ:
    os.environ["TEMP_DIR"] = tempfile.mkdtemp(prefix="plait_torch_suite_")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing._internal import common_distributed  # noqa: E402

if GATING != "gloo":
    import plait  # noqa: F401,E402  (registers the backend)

if GATING == "plait":
    # What torch's own tables say about a backend; distributed_test.py reads them when its tests are decorated, so
    # they are set before it is imported.
    feats = common_distributed.DistTestCases.backend_feature
    for key in ("plugin", "ddp", "subgroup"):
        feats[key].add("plait")

if GATING == "plait-as-gloo":
    from torch.distributed import distributed_c10d as _c10d

    _orig_helper = _c10d._new_process_group_helper

    def _on_plait(group_size, group_rank, global_ranks_in_group, backend, store, group_name, backend_options=None,
                  *args, **kwargs):
        if str(backend).lower() == "gloo":
            backend = dist.Backend("plait")
            backend_options = None  # gloo's options do not apply
        return _orig_helper(group_size, group_rank, global_ranks_in_group, backend, store, group_name,
                            backend_options, *args, **kwargs)

    _c10d._new_process_group_helper = _on_plait

from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend  # noqa: E402


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        if os.environ.get("PLAIT_TORCH_SUITE_START", "spawn") == "fork":
            self._start_processes(torch.multiprocessing.get_context("fork").Process)
        else:
            self._spawn_processes()


_suffix = {"gloo": "GLOO", "plait": "PLAIT", "plait-as-gloo": "PLAIT_AS_GLOO"}[GATING]
TestDistBackendWithSpawn.__name__ = f"TestDistBackendWithSpawn{_suffix}"
TestDistBackendWithSpawn.__qualname__ = TestDistBackendWithSpawn.__name__
globals()[TestDistBackendWithSpawn.__name__] = TestDistBackendWithSpawn
del TestDistBackendWithSpawn


def _main():
    import argparse
    import json
    import time
    import unittest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gating", choices=GATINGS, default=GATING)
    ap.add_argument("-k", action="append", default=[], help="run only tests whose name contains this (repeatable)")
    ap.add_argument("-v", action="store_true", help="one line per test")
    ap.add_argument("--json", help="write {test: outcome, message} here")
    ap.add_argument("--start", choices=("spawn", "fork"), default=os.environ.get("PLAIT_TORCH_SUITE_START", "spawn"),
                    help="how the two rank processes start: spawn (as torch's test_distributed_spawn; a fresh "
                         "interpreter per rank) or fork (children inherit the imported torch: several times faster)")
    args = ap.parse_args()
    os.environ["PLAIT_TORCH_SUITE_START"] = args.start

    cls = globals()[f"TestDistBackendWithSpawn{_suffix}"]
    names = unittest.TestLoader().getTestCaseNames(cls)
    if args.k:
        names = [n for n in names if any(k in n for k in args.k)]
    suite = unittest.TestSuite(cls(n) for n in names)

    class Result(unittest.TextTestResult):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.outcomes = {}

        def addSuccess(self, test):
            super().addSuccess(test)
            self.outcomes[test._testMethodName] = ("pass", "")

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self.outcomes[test._testMethodName] = ("fail", self._exc_info_to_string(err, test)[-3000:])

        def addError(self, test, err):
            super().addError(test, err)
            self.outcomes[test._testMethodName] = ("fail", self._exc_info_to_string(err, test)[-3000:])

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self.outcomes[test._testMethodName] = ("skip", str(reason))

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self.outcomes[test._testMethodName] = ("xfail", "")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self.outcomes[test._testMethodName] = ("fail", "unexpected success")

    t0 = time.monotonic()
    runner = unittest.TextTestRunner(verbosity=2 if args.v else 1, resultclass=Result, stream=sys.stderr)
    result = runner.run(suite)
    counts = {}
    for outcome, _ in result.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    fails = sorted(n for n, (o, _) in result.outcomes.items() if o == "fail")
    print(f"\n# torch suite, gating {args.gating}: {len(names)} tests in {time.monotonic() - t0:.0f} s: "
          f"pass {counts.get('pass', 0)}, fail {counts.get('fail', 0)}, skip {counts.get('skip', 0)}"
          + (f", xfail {counts['xfail']}" if counts.get("xfail") else ""))
    for n in fails:
        print(f"FAIL {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gating": args.gating, "counts": counts, "tests": result.outcomes}, f, indent=1)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(_main())
