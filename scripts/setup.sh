#!/usr/bin/env bash
# One-time, idempotent set-up: a virtualenv in .venv with philora and its pinned dependencies.
# torch is asked for first and exactly (constraints.txt), so pip never pulls a newer CUDA build
# on a CPU machine; everything else is pinned by constraints.txt too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.philora-installed ] || [ constraints.txt -nt .venv/.philora-installed ] || [ pyproject.toml -nt .venv/.philora-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench,qlora]"
  touch .venv/.philora-installed
fi
