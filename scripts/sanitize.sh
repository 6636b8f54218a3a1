#!/usr/bin/env bash
# Builds the torch-free core and its test program (tests/core/core_test.cc: every collective, algorithm, transport,
# the emulated device engine and the failure paths, over forked ranks) under the sanitizers and runs it:
#
#   bash scripts/sanitize.sh [address|thread|all] [core_test arguments...]     (default: all, every scenario)
#
#   address  build-asan/: AddressSanitizer + UndefinedBehaviorSanitizer (-fsanitize=address,undefined, UB aborts),
#            LeakSanitizer at every rank's exit
#   thread   build-tsan/: ThreadSanitizer
#
# Configured with cmake -DPLAIT_CORE_ONLY=ON (no torch) -DPLAIT_SANITIZE=address|thread -DPLAIT_WITH_CUDA=OFF, built
# with ninja (the compiler: $CXX, else c++). The runtime options make the first report fatal (halt_on_error, exit
# code 66 for TSan), so a rank with a finding exits non-zero and core_test fails its scenario; the log is also
# scanned for reports. Suppressions (scripts/sanitizers/*.supp) are for third-party noise only; each entry says why.
# Exit status: 0 clean, 1 a finding or a failed check, 2 the toolchain lacks the sanitizer (nothing ran).
# CORE_TEST_SCENARIO_TIMEOUT_S (default 600) bounds each scenario; logs go to build-{asan,tsan}/core_test.log.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
what="${1:-all}"
[[ $# -gt 0 ]] && shift
case "$what" in
  address|thread) kinds=("$what") ;;
  all) kinds=(address thread) ;;
  *) echo "usage: $0 [address|thread|all] [core_test args...]" >&2; exit 2 ;;
esac

PATH="$ROOT/.venv/bin:$PATH"
command -v cmake >/dev/null || { echo "sanitize: cmake not found (pip install cmake ninja into .venv)" >&2; exit 2; }
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
CXX="${CXX:-c++}"
SUPP="$ROOT/scripts/sanitizers"

# Does the toolchain link and run a program with this sanitizer? (2: no runtime, nothing to test)
probe() {
  local flags="$1" tmp
  tmp="$(mktemp -d)"
  printf 'int main() { return 0; }\n' >"$tmp/p.cc"
  if ! "$CXX" $flags "$tmp/p.cc" -o "$tmp/p" >"$tmp/log" 2>&1 || ! "$tmp/p" >>"$tmp/log" 2>&1; then
    echo "sanitize: $CXX cannot build or run with $flags:" >&2
    sed 's/^/  /' "$tmp/log" | head -5 >&2
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$tmp"
}

status=0
for kind in "${kinds[@]}"; do
  if [[ $kind == address ]]; then
    dir=build-asan flags="-fsanitize=address,undefined"
  else
    dir=build-tsan flags="-fsanitize=thread"
  fi
  probe "$flags" || { status=2; continue; }
  echo "[sanitize] $kind: configuring and building $dir (core_test)" >&2
  t0=$(date +%s)
  if ! cmake -S . -B "$dir" "${GEN[@]}" -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_BUILD_TYPE=Debug \
      -DPLAIT_CORE_ONLY=ON -DPLAIT_WITH_CUDA=OFF -DPLAIT_SANITIZE="$kind" >"$dir.configure.log" 2>&1; then
    cat "$dir.configure.log" >&2; status=1; continue
  fi
  rm -f "$dir.configure.log"
  cmake --build "$dir" --target core_test >"$dir/build.log" 2>&1 || { tail -40 "$dir/build.log" >&2; status=1; continue; }
  t1=$(date +%s)
  log="$dir/core_test.log"
  echo "[sanitize] $kind: built in $((t1 - t0)) s; running $dir/core_test $*" >&2
  # Common: symbolized stacks, the first report ends the process with a non-zero status.
  export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:detect_invalid_pointer_pairs=0:print_summary=1:exitcode=66"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=66:suppressions=$SUPP/ubsan.supp"
  export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
  export TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:history_size=4:suppressions=$SUPP/tsan.supp:print_suppressions=0"
  # The core's spin-waits are far slower under the sanitizers: yield and sleep early rather than burn both cores.
  PLAIT_SPIN_US="${PLAIT_SPIN_US:-0}" "$dir/core_test" "$@" >"$log" 2>&1
  rc=$?
  t2=$(date +%s)
  reports=$(grep -cE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|WARNING: ThreadSanitizer|SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer|ThreadSanitizer)" "$log")
  sed -n '/core_test summary/,$p' "$log"
  if [[ $rc -ne 0 || $reports -ne 0 ]]; then
    echo "[sanitize] $kind: FAILED (exit $rc, $reports report line(s)); log: $log" >&2
    grep -nE -A25 "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|WARNING: ThreadSanitizer" "$log" | head -120 >&2
    grep -E "^FAIL " "$log" | head -20 >&2
    status=1
  else
    echo "[sanitize] $kind: clean (run $((t2 - t1)) s, build $((t1 - t0)) s)" >&2
  fi
done
exit $status
