#!/usr/bin/env bash
# The offline MNIST protocol of RESULTS.md: train on the first 5,000 images of
# the MNIST test split ($LINF_JAX_MNIST_DIR), certify the last 5,000 at ε = 0.1 and 0.3.
# A single model, then joint and independent ensembles of K = 3 and 5 on the same data and
# epochs; EMA and raw weights of every run are certified side by side.
#   bash experiments/mnist_local.sh [runs-folder]        (2-core CPU: about 40 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LINF_JAX_MNIST_DIR:?set LINF_JAX_MNIST_DIR to the folder of the MNIST test-set IDX files (README, Data)}"
export LINF_JAX_MNIST_DIR
OUT=${1:-runs/mnist_local}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
run() {  # name, extra flags...
  local name=$1; shift
  /usr/bin/time -f "$name train wall %e s" "$PY" train.py --config configs/mnist_local.py \
    --workdir "$OUT/$name" --progress=false "$@"
  for w in ema raw; do
    "$PY" certify.py --workdir "$OUT/$name" --eps 0.1,0.3 --weights $w --pgd_steps 20 --progress=false \
      --output "$OUT/$name/certify_$w.json"
  done
}
run single
for k in 3 5; do
  for mode in joint independent; do
    run "${mode}_k$k" --config.ensemble.size=$k --config.ensemble.mode=$mode
  done
done
