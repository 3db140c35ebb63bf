#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), runs the static checks (lint, format, types, import layering),
# then the tests: the fast tier (not marked slow) on pytest-xdist workers, then the slow tier one test at a time
# (whole nodes, chaos, benchmarks: they time real processes and would starve each other); the slow tier runs
# even when the fast one failed, so one run reports both. `--fast` stops after the fast tier. Other arguments go
# to pytest (e.g. -q, -x, -k pattern).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1

failed=()
check() {
  local name=$1
  shift
  echo "test: $name"
  "$@" || failed+=("$name")
}
check "ruff check" .venv/bin/ruff check .
check "ruff format --check" .venv/bin/ruff format --check .
check "mypy (node db inference engines)" .venv/bin/mypy
check "import layering (lint-imports)" .venv/bin/lint-imports
if [ ${#failed[@]} -gt 0 ]; then
  printf 'test: static check failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
fast_only=false
if [ "${1:-}" = "--fast" ]; then
  fast_only=true
  shift
fi
# One worker more than cores: the fast tests wait on real peers (dcmtk, Orthanc, PostgreSQL) part of the time.
workers=$(( $(nproc) + 1 ))
echo "test: fast tier (pytest -m 'not slow' -n $workers --dist worksteal)"
fast_status=0
.venv/bin/python -m pytest -m "not slow" -n "$workers" --dist worksteal "$@" || fast_status=$?
if [ "$fast_only" = true ]; then
  exit "$fast_status"
fi
echo "test: slow tier (pytest -m slow)"
slow_status=0
.venv/bin/python -m pytest -m slow "$@" || slow_status=$?
# pytest's 5 is "no tests selected": fine for one tier (e.g. -k matching only fast tests), not for both.
if [ "$fast_status" -eq 5 ] && [ "$slow_status" -eq 5 ]; then
  echo "test: no tests selected" >&2
  exit 5
fi
[ "$fast_status" -eq 5 ] && fast_status=0
[ "$slow_status" -eq 5 ] && slow_status=0
if [ "$fast_status" -ne 0 ] || [ "$slow_status" -ne 0 ]; then
  echo "test: fast tier exit $fast_status, slow tier exit $slow_status" >&2
  exit 1
fi
