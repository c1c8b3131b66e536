#!/usr/bin/env bash
# SortNet against the ℓ∞-dist net at the same budget on the offline MNIST protocol of RESULTS.md
# (train on the first 5,000 images of the MNIST test split in $LINF_JAX_MNIST_DIR, certify the
# last 5,000 at ε = 0.1 and 0.3): configs/sortnet_mnist_local.py (mnist_local's recipe and
# budget with a depth-4, width-256 SortNet, q = 0.75) against the same config with q = 1 and
# the identity init, which is mnist_local's ℓ∞-dist Net; for each seed a single model (EMA and
# raw weights certified), then for each seed a joint K = 3 ensemble (EMA weights); PGD-20 (in
# certify.py only).
#   bash experiments/sortnet_vs_linf.sh [runs-folder] [seeds]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LINF_JAX_MNIST_DIR:?set LINF_JAX_MNIST_DIR to the folder of the MNIST test-set IDX files (README, Data)}"
export LINF_JAX_MNIST_DIR
OUT=${1:-runs/sortnet_vs_linf}
SEEDS=${2:-"0 1 2"}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
run() {  # name, seed, weights to certify, extra flags...
  local name=$1 seed=$2 weights=$3; shift 3
  if [ ! -f "$OUT/$name/results.json" ]; then
    /usr/bin/time -f "$name train wall %e s" "$PY" train.py --config configs/sortnet_mnist_local.py \
      --workdir "$OUT/$name" --progress=false --config.seed="$seed" --config.eval.pgd_steps=0 "$@"
  fi
  for w in $weights; do
    "$PY" certify.py --workdir "$OUT/$name" --eps 0.1,0.3 --weights "$w" --pgd_steps 20 \
      --progress=false --output "$OUT/$name/certify_$w.json"
  done
}
SORT=(--config.model.q=0.75)
LINF=(--config.model.q=1.0 --config.model.identity_init=True)
for seed in $SEEDS; do
  run "sort_single_seed$seed" "$seed" "ema raw" "${SORT[@]}"
  run "linf_single_seed$seed" "$seed" "ema raw" "${LINF[@]}"
done
for seed in $SEEDS; do
  for net in sort linf; do
    if [ "$net" = sort ]; then flags=("${SORT[@]}"); else flags=("${LINF[@]}"); fi
    run "${net}_joint_k3_seed$seed" "$seed" "ema" "${flags[@]}" \
      --config.ensemble.size=3 --config.ensemble.mode=joint
  done
done
