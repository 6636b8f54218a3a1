#!/usr/bin/env bash
# Builds plait with UBSan's alignment check (-fsanitize=alignment, abort on the first finding; CUDA off) and runs the
# scenario of issue 10 item 6 under it: odd-length point-to-point messages, then float64 all-reduces over the same
# shared-memory ring with every algorithm and both kernel paths. Before messages were padded to 8 bytes, the ring
# all-reduce reduced doubles straight out of the ring at odd offsets ("reduce_impl.h:30: runtime error: load of
# misaligned address ... for type 'const double'"): harmless on x86-64 hardware, undefined behaviour in C++ (and a
# fault on targets that trap), so only a sanitizer shows it. Not part of CI (a second full build).
# The same scenario (odd-length point-to-point messages before the float64 all-reduces, every algorithm, both kernel
# paths) also runs torch-free under full UBSan + ASan and under TSan in scripts/sanitize.sh (tests/core/core_test.cc,
# in CI through tests/test_sanitizers.py); this script remains the check of the torch extension's path.
#
#   bash scripts/ubsan_alignment.sh
#
# It installs the instrumented build into .venv (build dir build/ubsan), runs the scenario, then reinstalls the
# normal build (scripts/setup.sh, incremental). Exit status: 0 clean, 1 a finding or a wrong result.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || bash scripts/setup.sh
UBSAN="$(${CXX:-c++} -print-file-name=libubsan.so)"
[[ -e "$UBSAN" ]] || { echo "ubsan_alignment: libubsan.so not found (gcc's runtime)" >&2; exit 2; }

echo "[ubsan] building plait with -fsanitize=alignment into build/ubsan" >&2
SKBUILD_BUILD_DIR=build/ubsan \
  SKBUILD_CMAKE_ARGS="-DPLAIT_WITH_CUDA=OFF;-DCMAKE_CXX_FLAGS=-fsanitize=alignment -fno-sanitize-recover=alignment -fno-omit-frame-pointer" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 1

status=0
for algo in ring tree direct; do
  for kernels in auto scalar; do
    if ! LD_PRELOAD="$UBSAN" PLAIT_ALGO=$algo PLAIT_KERNELS=$kernels PLAIT_TRANSPORT=shm "$PY" - <<'PY'
import os, sys
sys.path.insert(0, "tests")
import _harness as H
import ubsan_alignment_worker as W
res = H.run_world(W.worker, 2, expect_fail=True, timeout_s=120)
bad = [r for r in res if not r.ok]
for r in bad:
    print(r.describe())
    print("\n".join(l for l in r.log.splitlines() if "runtime error" in l)[:2000])
print(f"[ubsan] algo={os.environ['PLAIT_ALGO']} kernels={os.environ['PLAIT_KERNELS']}: "
      + ("clean" if not bad else "FINDING"), file=sys.stderr)
sys.exit(1 if bad else 0)
PY
    then status=1; fi
  done
done

echo "[ubsan] reinstalling the normal build" >&2
PLAIT_FORCE_REBUILD=1 bash scripts/setup.sh >/dev/null || status=1
exit $status
