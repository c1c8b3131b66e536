#!/usr/bin/env bash
# v1 against v2, the two official recipe families, at the same budget on the offline MNIST
# protocol of RESULTS.md (train on the first 5,000 images of the MNIST test split in $LINF_JAX_MNIST_DIR, certify the
# last 5,000 at ε = 0.1 and 0.3): the 4 × 256 ℓ∞-dist Net of configs/mnist_local.py, batch 250,
# 50 epochs, ε_train 0.45 pixels (both official MNIST ε = 0.3 scripts use 0.45), PGD-20.
#   v1: zbh2047/L_inf-dist-net command/ell_inf_dist_net_mnist.sh, epochs 0,50,0,350,400 scaled
#       by 50/400 to (0,6,0,44,50): ε_train from step 0, p = 8 to epoch 6, ∞ from 44; lr 0.02
#       constant to 6 then a cosine; hinge mix 0.75; weight decay 5e-3 (ℓp form); zero-padded
#       crops by 1.
#   v2: zbh2047/L_inf-dist-net-v2 command/mnist_0.3.sh, epochs 0,0,25,400,450 scaled by 50/450
#       to (0,0,3,44,50): ε_train from step 0, p = 8 to epoch 3, ∞ from 44; lr 0.03 (scale
#       0.006) cosine from step 0; v2 mixture loss, λ 0.05 -> 0.0002; no weight decay;
#       edge-padded crops by 1.
#   bash experiments/v1_vs_v2.sh [runs-folder] [seeds]       (2-core CPU: ~5 minutes a run)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LINF_JAX_MNIST_DIR:?set LINF_JAX_MNIST_DIR to the folder of the MNIST test-set IDX files (README, Data)}"
export LINF_JAX_MNIST_DIR
OUT=${1:-runs/v1_vs_v2}
SEEDS=${2:-0}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
V1=(--config.train.schedule=v1 "--config.train.epochs=(0,6,0,44,50)" --config.train.lr=0.02
    --config.train.weight_decay=5e-3 --config.train.loss=hinge --config.train.mix=0.75
    --config.train.kappa=1.0 --config.train.crop_mode=zeros)
V2=(--config.train.schedule=v2 "--config.train.epochs=(0,0,3,44,50)" --config.train.lr=0.03
    --config.train.logit_scale_lr=0.006 --config.train.weight_decay=0 --config.train.loss=v2
    --config.train.lam_start=0.05 --config.train.lam_end=0.0002 --config.train.crop_mode=edge)
for seed in $SEEDS; do
  for recipe in v1 v2; do
    name="${recipe}_seed$seed"
    if [ "$recipe" = v1 ]; then flags=("${V1[@]}"); else flags=("${V2[@]}"); fi
    /usr/bin/time -f "$name train wall %e s" "$PY" train.py --config configs/mnist_local.py \
      --workdir "$OUT/$name" --progress=false --config.seed="$seed" \
      --config.train.eps_train=0.45 --config.train.crop_padding=1 "${flags[@]}"
    for w in ema raw; do
      "$PY" certify.py --workdir "$OUT/$name" --eps 0.1,0.3 --weights $w --pgd_steps 20 \
        --progress=false --output "$OUT/$name/certify_$w.json"
    done
  done
done
