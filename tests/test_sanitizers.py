"""The torch-free core under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer.

scripts/sanitize.sh builds plait_core and tests/core/core_test.cc with -DPLAIT_SANITIZE=address|thread
(-DPLAIT_CORE_ONLY=ON: no torch) into build-asan/ and build-tsan/ and runs core_test, which forks the ranks of each
scenario and checks exact results of every collective; a sanitizer report makes the rank exit 66, so the script fails.

CI runs a subset that fits its time (CI_SCENARIOS with --quick: smaller buffers and fewer cases per collective);
PLAIT_SANITIZE_FULL=1 runs every scenario at full size, as `bash scripts/sanitize.sh all` does. Skipped when the
compiler cannot link a program with the sanitizer (no runtime library installed).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sanitize.sh")

# One of each: shared memory, TCP, two fake hosts (hierarchical schedules, shm + TCP in one group), the emulated
# device engine and the host path's copy threads, and two failure paths.
CI_SCENARIOS = ["shm3", "tcp3", "hosts2x2", "dev2", "devhost2", "fail_exit_shm", "fail_mismatch"]


def _run(kind, args=None):
    full = os.environ.get("PLAIT_SANITIZE_FULL") == "1"
    if args is None:
        args = [] if full else ["--quick", *CI_SCENARIOS]
    env = dict(os.environ, CORE_TEST_SCENARIO_TIMEOUT_S="300")
    p = subprocess.run(["bash", SCRIPT, kind, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=3000 if full else 1200)
    out = p.stdout + p.stderr
    if p.returncode == 2 and "cannot build or run with" in out:
        pytest.skip(f"the toolchain lacks the {kind} sanitizer runtime: " + out.strip().splitlines()[-1])
    sys.stderr.write(out[-4000:])
    return p.returncode, out


@pytest.mark.parametrize("kind", ["address", "thread"])
def test_core_under_sanitizer(kind):
    rc, out = _run(kind)
    assert rc == 0, f"scripts/sanitize.sh {kind} failed (exit {rc}):\n{out[-6000:]}"
    assert f"[sanitize] {kind}: clean" in out, out[-3000:]
    summary = re.search(r"core_test summary \((\d+) scenario\(s\), (\d+) failed\)", out)
    assert summary and int(summary.group(1)) >= len(CI_SCENARIOS) and summary.group(2) == "0", out[-3000:]
    assert not re.search(r"runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|WARNING: ThreadSanitizer", out)


# What each sanitizer must report on core_test's canary (a data race and a one-byte heap overflow, tests/core): with
# -fsanitize=address,undefined, UBSan's object-size check sees the overflow before ASan does.
CANARY_REPORT = {
    "address": ("ERROR: AddressSanitizer: heap-buffer-overflow", "runtime error: load of address"),
    "thread": ("WARNING: ThreadSanitizer: data race",),
}


@pytest.mark.parametrize("kind", ["address", "thread"])
def test_sanitizer_reports_fail_the_run(kind):
    """The runs above are live: a planted bug is reported, and a report fails scripts/sanitize.sh."""
    rc, out = _run(kind, ["canary"])
    assert rc == 1, f"scripts/sanitize.sh {kind} canary: exit {rc}, expected 1 (a report):\n{out[-4000:]}"
    assert any(r in out for r in CANARY_REPORT[kind]) and "canary" in out, out[-4000:]
    assert f"[sanitize] {kind}: FAILED" in out, out[-3000:]
