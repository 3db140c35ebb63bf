#!/usr/bin/env bash
# Sets up a fresh Debian machine for edgenode: the DICOM peers and validators the node and its tests
# use (dcmtk, dicom3tools, Orthanc), Chromium for the dashboard test, and a virtualenv in .venv with
# torch 2.13.0 installed before the project so pip never resolves another (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  # postgresql: its server binaries (initdb, pg_ctl) for the tests' throwaway servers; the system cluster is
  # neither needed nor started (policy-rc.d below keeps the package from starting it).
  for pkg in dcmtk dicom3tools orthanc chromium postgresql; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  # A fresh Debian has python3 but not its venv module (ensurepip); pyenv or other builds bring their own.
  if ! "${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1; then
    need+=(python3 python3-venv)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    apt-get update -qq
    policy=/usr/sbin/policy-rc.d
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ -z "${made_policy:-}" ] || rm -f "$policy"
  fi
else
  echo "setup: not root or no apt-get; expecting dcmtk, dicom3tools, orthanc, chromium and postgresql to be installed" >&2
fi

PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup: .venv is incomplete (an earlier run failed half-way); creating it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
echo "setup: installing edgenode and its dependencies"
# postgres: psycopg 3 for a shared PostgreSQL (tests start their own server from Debian's postgresql).
# triton: the gRPC client of the Triton backend (tests run it against a real server; see tests/triton_support.py,
# which makes the server's own venv under .cache/ on first use, since PyTriton pins numpy < 2).
.venv/bin/python -m pip install -q -e ".[dev,triton,postgres]"
echo "setup: done"
