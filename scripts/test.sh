#!/usr/bin/env bash
# Set up (see scripts/setup.sh; PLAIT_SKIP_SETUP=1 skips it), then run the test suite. Extra arguments go
# to pytest:
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k ring -v
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ "${PLAIT_SKIP_SETUP:-0}" == "1" ]] || bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" -m pytest tests -x -q "$@"
