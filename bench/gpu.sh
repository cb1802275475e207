#!/usr/bin/env bash
# Issue 15's GPU check on one CUDA GPU (an H200 here), start-up included in well under 8 minutes:
#
#   bash bench/gpu.sh                 # results in bench/gpu-out/ (or $OUT): results.md, results.json
#   bash bench/gpu.sh --phases smoke  # only the CUDA correctness checks (~1 minute)
#
# Needs a CUDA torch and transformers, peft, accelerate, pyarrow, pandas (the GPU machine has them).
# TRL and datasets are not there and nothing can be fetched: their wheels travel with the tree in
# bench/wheels/ (pure Python, 2.3 MB; fetched with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 trl==1.16.0 datasets==5.2.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19`).
# pip picks the datasets version that fits the installed pyarrow/fsspec; if no combination
# resolves, the wheels go in without their dependency checks, and if TRL still does not import,
# the check runs philora alone and says so. flash-attn is neither needed nor used: philora
# attends per conversation with torch's SDPA (philora_sdpa); TRL runs on SDPA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
start=$(date +%s)
if ! "$PY" -c "import trl, datasets" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links bench/wheels trl datasets >"$OUT/pip.txt" 2>&1 \
        || "$PY" -m pip install -q --no-index --no-deps bench/wheels/trl-*.whl bench/wheels/datasets-5.*.whl \
               bench/wheels/dill-*.whl bench/wheels/multiprocess-*.whl >>"$OUT/pip.txt" 2>&1
fi
systems=(philora)
if "$PY" -c "import trl, datasets" 2>>"$OUT/pip.txt"; then
    systems+=(trl-cookbook trl-padding-free)
else
    echo "gpu.sh: TRL does not import here (see $OUT/pip.txt): philora alone" | tee -a "$OUT/pip.txt"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
echo "gpu.sh: installs took $(( $(date +%s) - start )) s"
# the check itself: no phase starts after 300 s, no memory probe after 420 s, killed at 450 s
timeout 450 "$PY" bench/gpu_check.py --out "$OUT" --systems "${systems[@]}" "$@"
rc=$?
echo "gpu.sh: exit $rc after $(( $(date +%s) - start )) s; results in $OUT"
exit $rc
