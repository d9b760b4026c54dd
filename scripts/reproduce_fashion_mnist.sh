#!/usr/bin/env bash
# The CPU reproduction of the exact-GN paper's Figures 1, 2, 3 and 5 on the full Fashion-MNIST
# (docs/reproduction.md). Needs Debian's dataset-fashion-mnist (or --data PATH via $DATA).
# Reduced width and epochs so that it finishes in about an hour on 2 cores; every command resumes
# where it stopped when run again (and extends a finished run when --steps/--epochs grow).
set -euo pipefail
cd "$(dirname "$0")/.."
CURVLAB=${CURVLAB:-.venv/bin/curvlab}
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data "$DATA"); fi
COMMON=(--dataset fashion-mnist "${DATA_ARGS[@]}" --hidden 2048 --depth 4 --no-progress)

# Figure 1: full batch, n = 1024 balanced training images, 100 updates
# (add --seeds 42,43,44 for the authors' three seeds: the run is extended, not restarted).
"$CURVLAB" run fullbatch "${COMMON[@]}" --steps 100 --eval-every 2 --out runs/fmnist-fullbatch
# Figures 2 and 3: mini-batch, batch 1024, per-update loss change recorded.
"$CURVLAB" run loss-change "${COMMON[@]}" --epochs 10 --batch-size 1024 \
  --eval-train-size 10000 --out runs/fmnist-minibatch
# Figure 5: no inverted bottleneck (authors' block scheme), both phases, shorter.
"$CURVLAB" run no-bottleneck "${COMMON[@]}" --steps 50 --eval-every 2 --epochs 3 \
  --evals-per-epoch 4 --batch-size 1024 --eval-train-size 10000 --out runs/fmnist-no-bottleneck
