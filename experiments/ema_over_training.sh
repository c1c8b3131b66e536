#!/usr/bin/env bash
# Does the EMA help, and when? EMA against raw weights at every kept checkpoint, on the offline
# MNIST protocol of RESULTS.md (configs/mnist_local.py: train on the first 5,000 images of the
# MNIST test split, certify the last 5,000 at ε = 0.1 and 0.3; 4 × 256 ℓ∞-dist Net, v1 recipe,
# batch 250, ε_train 0.45, hinge mix 0.75, lr 0.02, weight decay 5e-3), three seeds each:
#   long:     100 epochs, epochs (0,16,16,80,100), a checkpoint kept every 5 epochs
#   short:     30 epochs, epochs (0,5,5,24,30),    a checkpoint kept every 2 epochs
#   ensemble:  the short schedule, a joint K = 3 ensemble (one loss on the averaged logits)
# Each run is certified at every kept checkpoint with EMA and raw weights (interval
# certificate; no PGD), then experiments/summarize_ema.py draws the plots and the table.
#   bash experiments/ema_over_training.sh [runs-folder] [seeds]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LINF_JAX_MNIST_DIR:?set LINF_JAX_MNIST_DIR to the folder of the MNIST test-set IDX files (README, Data)}"
export LINF_JAX_MNIST_DIR
OUT=${1:-runs/ema_over_training}
SEEDS=${2:-"0 1 2"}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
LONG=("--config.train.epochs=(0,16,16,80,100)" --config.train.checkpoint_every_epochs=5
      --config.train.keep_every_epochs=5)
SHORT=("--config.train.epochs=(0,5,5,24,30)" --config.train.checkpoint_every_epochs=2
       --config.train.keep_every_epochs=2)
for seed in $SEEDS; do
  for kind in short ensemble long; do
    name="${kind}_seed$seed"
    case $kind in
      long) flags=("${LONG[@]}") ;;
      short) flags=("${SHORT[@]}") ;;
      ensemble) flags=("${SHORT[@]}" --config.ensemble.size=3 --config.ensemble.mode=joint) ;;
    esac
    if [ ! -f "$OUT/$name/results.json" ]; then
      /usr/bin/time -f "$name train wall %e s" "$PY" train.py --config configs/mnist_local.py \
        --workdir "$OUT/$name" --progress=false --config.seed="$seed" \
        --config.eval.pgd_steps=0 "${flags[@]}"
    fi
    /usr/bin/time -f "$name certify wall %e s" "$PY" certify.py --workdir "$OUT/$name" \
      --all_checkpoints --eps 0.1,0.3 --pgd_steps 0 --progress=false \
      --output "$OUT/$name/certify_checkpoints.json"
  done
done
