#!/usr/bin/env bash
# Set up the development environment and build plait. Idempotent; a no-op (about a second) when nothing
# changed.
#
#   1. .venv/ (python3 -m venv) if missing
#   2. torch==2.13.0 (CPU) if not installed at that version; pinned, so pip never resolves a newer torch
#   3. build and test dependencies, each only if missing
#   4. plait itself: pip install --no-build-isolation --no-deps -e .  (scikit-build-core editable install,
#      incremental CMake/ninja build under build/), skipped when nothing under csrc/, python/,
#      CMakeLists.txt, pyproject.toml changed since the last successful install (hash stamp in .venv/).
#
# Knobs: PYTHON (interpreter for the venv, default python3), PLAIT_FORCE_REBUILD=1 (ignore the stamp),
# PLAIT_SETUP_VERBOSE=1 (show pip and build output), PLAIT_TORCH_INDEX_URL (the package index torch is installed
# from; default: pip's own configuration, i.e. plain `pip install torch==2.13.0`). On Linux, PyPI's torch wheel is the
# CUDA build (several GB of nvidia-* packages); for the CPU-only build use
#   PLAIT_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
BUILD_DEPS=(scikit-build-core ninja cmake pybind11 pytest pytest-timeout numpy matplotlib expecttest)
STAMP="$VENV/.plait-install-stamp"

log() { echo "[setup] $*" >&2; }

if [[ "${PLAIT_SETUP_VERBOSE:-0}" == "1" ]]; then PIP_Q=(); else PIP_Q=(-q); fi
pip_install() { "$PY" -m pip install "${PIP_Q[@]}" "$@"; }

# 1. virtual environment ------------------------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
  log "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

# 2 + 3. what is missing (one cheap interpreter start; importlib.metadata does not import the packages) --
read -r TORCH_HAVE MISSING < <("$PY" - "$TORCH_VERSION" "${BUILD_DEPS[@]}" <<'EOF'
import sys
from importlib import metadata

want_torch, deps = sys.argv[1], sys.argv[2:]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
torch = version("torch") or "none"
missing = [d for d in deps if version(d) is None]
print(torch, ",".join(missing) or "-")
EOF
)

if [[ "${TORCH_HAVE%%+*}" != "$TORCH_VERSION" ]]; then
  if [[ -n "${PLAIT_TORCH_INDEX_URL:-}" ]]; then
    log "installing torch==$TORCH_VERSION from $PLAIT_TORCH_INDEX_URL (found: $TORCH_HAVE)"
    pip_install --index-url "$PLAIT_TORCH_INDEX_URL" "torch==$TORCH_VERSION"
  else
    log "installing torch==$TORCH_VERSION (found: $TORCH_HAVE)"
    pip_install "torch==$TORCH_VERSION"
  fi
fi
if [[ "$MISSING" != "-" ]]; then
  IFS=, read -r -a MISSING_LIST <<<"$MISSING"
  log "installing ${MISSING_LIST[*]}"
  # The pin keeps pip from touching torch while resolving anything else.
  pip_install "${MISSING_LIST[@]}" "torch==$TORCH_VERSION"
fi

# 4. plait ------------------------------------------------------------------------------------------------
source_hash() {
  {
    "$PY" -c 'import sys; print(sys.version)'
    echo "torch $TORCH_VERSION"
    find csrc python CMakeLists.txt pyproject.toml \
      \( -name __pycache__ -o -name '*.egg-info' \) -prune -o \
      -type f ! -name '*.pyc' ! -name '*.so' ! -name '*.pyd' -print0 2>/dev/null \
      | LC_ALL=C sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -d' ' -f1
}

HASH="$(source_hash)"
installed() { "$PY" -c 'from importlib import metadata; metadata.version("plait")' 2>/dev/null; }

if [[ "${PLAIT_FORCE_REBUILD:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]] && installed; then
  log "plait up to date (sources unchanged since last install)"
  exit 0
fi

log "building plait (pip install --no-build-isolation -e .; incremental build in build/)"
rm -f "$STAMP"
start=$SECONDS
# --no-deps: dependencies are installed above; pip must not resolve torch on its own.
pip_install --no-build-isolation --no-deps -e .
"$PY" -c 'import plait' || { log "built, but 'import plait' fails"; exit 1; }
echo "$HASH" >"$STAMP"
log "plait installed in $((SECONDS - start)) s"
