#!/usr/bin/env bash
# libFuzzer targets for everything in plait that parses bytes from the network (fuzz/README.md).
#
#   scripts/fuzz.sh [seconds-per-target]      build every target, run each for that long (default 60)
#   FUZZ_TARGETS="fuzz_server fuzz_tcp_handshake" scripts/fuzz.sh 30   only some targets
#   FUZZ_BUILD_ONLY=1 scripts/fuzz.sh                                  build, do not run
#   FUZZ_JOBS=2 scripts/fuzz.sh 300                                    run two targets at once
#
# Builds the torch-free core with clang++ -fsanitize=fuzzer,address,undefined (CUDA off) into build-fuzz/, then
# runs each target on a copy of its seed corpus (fuzz/corpus/<target>/, grown in build-fuzz/corpus/<target>/) and
# prints, per target, executions, exec/s, coverage (libFuzzer's cov: edges and ft: features) and crashes. Crash,
# leak and timeout inputs land in build-fuzz/artifacts/<target>/. Writes build-fuzz/fuzz_summary.json. Exits
# non-zero if any target crashed, leaked, timed out or failed to build.
#
# Needs clang with libFuzzer (Debian/Ubuntu: apt-get install clang; the libclang-rt-<N>-dev package that comes
# with it holds libclang_rt.fuzzer).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-60}
OUT=$ROOT/build-fuzz
CXX=${FUZZ_CXX:-clang++}
JOBS=${FUZZ_JOBS:-1}
ALL_TARGETS="fuzz_tcp_handshake fuzz_engine_wire fuzz_control fuzz_server"
TARGETS=${FUZZ_TARGETS:-$ALL_TARGETS}

command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found (apt-get install clang)" >&2; exit 2; }
mkdir -p "$OUT/obj" "$OUT/bin" "$OUT/corpus" "$OUT/artifacts" "$OUT/logs"

# libFuzzer present? (clang without compiler-rt's fuzzer library fails to link -fsanitize=fuzzer)
if [ ! -f "$OUT/.probe_ok" ]; then
  printf '#include <cstdint>\n#include <cstddef>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t){return 0;}\n' \
    >"$OUT/probe.cc"
  if ! "$CXX" -fsanitize=fuzzer,address,undefined "$OUT/probe.cc" -o "$OUT/probe" 2>"$OUT/probe.log"; then
    echo "fuzz.sh: $CXX cannot link -fsanitize=fuzzer (install libclang-rt-<version>-dev):" >&2
    cat "$OUT/probe.log" >&2
    exit 2
  fi
  touch "$OUT/.probe_ok"
fi

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
CXXFLAGS="-std=c++17 -O1 -g $SAN -DPLAIT_FUZZING -I$ROOT/csrc -I$ROOT/fuzz -Wall -Wno-unused-parameter"

# The core's sources, as CMakeLists.txt lists them for plait_core, with the CUDA stubs.
mapfile -t SRCS < <(awk '/add_library\(plait_core/{on=1; next} on && /\)/{on=0} on' CMakeLists.txt |
                   grep -o 'csrc/plait/[A-Za-z0-9_/]*\.cc')
SRCS+=(csrc/plait/kernels/cuda_stub.cc csrc/plait/transport/cuda_ipc_stub.cc)

# clang 14 does not know __builtin_cpu_supports("f16c"): the dispatchers take the portable kernels here (the fuzz
# targets are about parsing, not arithmetic speed).
NOCPU="'-D__builtin_cpu_supports(x)=0'"  # quoted: it lands in a make recipe that /bin/sh runs
extra_flags() {
  case "$1" in
    */reduce_avx2.cc) echo "-mavx2 -mf16c -mfma" ;;
    */codec_avx2.cc) echo "-mavx2 -mf16c -mfma -ffp-contract=off" ;;
    */codec.cc) echo "-ffp-contract=off $NOCPU" ;;
    */reduce.cc) echo "$NOCPU" ;;
  esac
}

# A generated Makefile does the incremental build (-MMD: an object is rebuilt when its source or a header it
# includes changed).
OBJS=()
{
  echo "CXX := $CXX"
  echo "CXXFLAGS := $CXXFLAGS -MMD -MP -fsanitize=fuzzer-no-link"
  echo "OBJS :="
  for s in "${SRCS[@]}" fuzz/harness.cc; do
    o="$OUT/obj/$(echo "${s#csrc/plait/}" | tr / _).o"
    [ "$s" = fuzz/harness.cc ] || OBJS+=("$o")
    echo "$o: $ROOT/$s"
    echo "	\$(CXX) \$(CXXFLAGS) $(extra_flags "$s") -c \$< -o \$@"
    echo "-include $o.d" | sed 's/\.o\.d$/.d/'
  done
  echo "CORE := ${OBJS[*]} $OUT/obj/fuzz_harness.cc.o"
  bins=""
  for t in $TARGETS; do
    [ -f "fuzz/$t.cc" ] || { echo "fuzz.sh: no such target fuzz/$t.cc" >&2; exit 2; }
    echo "$OUT/obj/$t.o: $ROOT/fuzz/$t.cc"
    echo "	\$(CXX) \$(CXXFLAGS) -c \$< -o \$@"
    echo "-include $OUT/obj/$t.d"
    echo "$OUT/bin/$t: $OUT/obj/$t.o \$(CORE)"
    echo "	\$(CXX) $CXXFLAGS -fsanitize=fuzzer \$^ -lpthread -lrt -o \$@"
    bins="$bins $OUT/bin/$t"
  done
  echo "all:$bins"
  echo ".DEFAULT_GOAL := all"
} >"$OUT/Makefile"
echo "fuzz.sh: building with $CXX ($($CXX --version | head -1)) into $OUT"
make -s -f "$OUT/Makefile" -j "$(nproc)" all
echo "fuzz.sh: built $(echo $TARGETS | wc -w) target(s) in $OUT/bin"
[ -n "${FUZZ_BUILD_ONLY:-}" ] && exit 0

# ---- run ----
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1:allocator_may_return_null=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PLAIT_DEBUG=${PLAIT_DEBUG:-0}

run_one() {
  local t=$1 secs=$2
  local corpus=$OUT/corpus/$t art=$OUT/artifacts/$t log=$OUT/logs/$t.log
  mkdir -p "$corpus" "$art"
  [ -d "$ROOT/fuzz/corpus/$t" ] && cp -n "$ROOT/fuzz/corpus/$t"/* "$corpus"/ 2>/dev/null || true
  local start end rc=0
  start=$(date +%s.%N)
  # -timeout: one input may take at most this long (a hang past every deadline the target sets is a bug);
  # -rss_limit_mb: a leak or an unbounded allocation driven by peer bytes ends the run.
  "$OUT/bin/$t" "$corpus" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2560 -malloc_limit_mb=2048 \
    -max_len=4096 -print_final_stats=1 -artifact_prefix="$art/" -close_fd_mask=2 >"$log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  python3 - "$t" "$log" "$rc" "$start" "$end" "$art" "$OUT/results" <<'EOF'
import json, os, re, sys
t, log, rc, start, end, art, resdir = sys.argv[1:]
text = open(log, errors="replace").read()
execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
eps = re.findall(r"stat::average_exec_per_sec:\s*(\d+)", text)
cov = re.findall(r"\bcov: (\d+) ft: (\d+)", text)
crashes = sorted(os.listdir(art)) if os.path.isdir(art) else []
fail = [l for l in text.splitlines() if re.search(r"ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|"
                                                 r"==\d+== ?ERROR|deadly signal|out-of-memory|Timeout", l)]
r = {"target": t, "seconds": round(float(end) - float(start), 1), "exit_code": int(rc),
     "executions": int(execs[-1]) if execs else 0, "exec_per_s": int(eps[-1]) if eps else 0,
     "cov": int(cov[-1][0]) if cov else 0, "ft": int(cov[-1][1]) if cov else 0,
     "corpus_files": len(os.listdir(os.path.dirname(art).replace("artifacts", "corpus") + "/" + t)),
     "artifacts": crashes, "errors": fail[:5], "log": log}
r["ok"] = r["exit_code"] == 0 and not fail
os.makedirs(resdir, exist_ok=True)
json.dump(r, open(os.path.join(resdir, t + ".json"), "w"), indent=1)
print(f"{t:22s} execs {r['executions']:>9}  exec/s {r['exec_per_s']:>6}  cov {r['cov']:>5}  ft {r['ft']:>6}  "
      f"crashes {len(crashes)}  {'OK' if r['ok'] else 'FAILED (see ' + log + ')'}")
for l in fail[:5]:
    print("    " + l)
EOF
}
export -f run_one
export OUT ROOT

rm -rf "$OUT/results"
mkdir -p "$OUT/results"
echo "fuzz.sh: running each target for ${SECS}s ($JOBS at a time)"
printf '%s\n' $TARGETS | xargs -P "$JOBS" -I{} bash -c 'run_one {} '"$SECS"

python3 - "$OUT" $TARGETS <<'EOF'
import json, os, sys
out, targets = sys.argv[1], sys.argv[2:]
res = []
for t in targets:
    p = os.path.join(out, "results", t + ".json")
    res.append(json.load(open(p)) if os.path.exists(p) else {"target": t, "ok": False, "errors": ["no result"]})
ok = all(r["ok"] for r in res)
json.dump({"ok": ok, "targets": res}, open(os.path.join(out, "fuzz_summary.json"), "w"), indent=1)
print(f"fuzz.sh: {'all targets clean' if ok else 'FAILURES'}; summary in {out}/fuzz_summary.json")
sys.exit(0 if ok else 1)
EOF
