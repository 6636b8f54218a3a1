#!/usr/bin/env bash
# Set up (see scripts/setup.sh; PLAIT_SKIP_SETUP=1 skips it), then run the test suite, printing the reason of every
# skipped test and expected failure (-rsx). Extra arguments go to pytest and run only that selection:
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k ring -v
#
# Without extra arguments, a second pass runs a representative subset against gloo (PLAIT_TEST_BACKEND=gloo): the
# harness's self-validation, which checks that the tests' references and checks hold for a backend known to be
# right (plait-only tests are skipped there, with the reason). PLAIT_TEST_GLOO=0 leaves it out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ "${PLAIT_SKIP_SETUP:-0}" == "1" ]] || bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"

if (($#)); then
  exec "$PY" -m pytest tests -x -q -rsx "$@"
fi

start=$SECONDS
"$PY" -m pytest tests -x -q -rsx
echo "[test] plait: suite passed in $((SECONDS - start)) s" >&2

if [[ "${PLAIT_TEST_GLOO:-1}" != "0" ]]; then
  # Every collective x dtype x op at 3 ranks, and the API surface (futures, subgroups, init methods, point to point,
  # coalesced variants, layouts, threads, denormals): the tests whose references gloo can confirm.
  GLOO_SUBSET=(
    "tests/test_collectives.py::test_collectives_matrix[3]"
    tests/test_api.py
  )
  start=$SECONDS
  PLAIT_TEST_BACKEND=gloo "$PY" -m pytest "${GLOO_SUBSET[@]}" -x -q -rs
  echo "[test] gloo self-validation subset passed in $((SECONDS - start)) s" >&2
fi
