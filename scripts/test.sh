#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), runs the static checks (lint, format, types, import layering),
# then the whole test suite. Arguments go to pytest (e.g. `-m "not slow"` for the fast tier).
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
exec .venv/bin/python -m pytest "$@"
