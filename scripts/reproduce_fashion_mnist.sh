#!/usr/bin/env bash
# The CPU reproduction of the exact-GN paper's full-batch experiment (Figure 1) on the full
# Fashion-MNIST, the protocol of docs/reproduction.md:
#   1. a validation split of 10,000 images is held out of the 60,000 training images (the same
#      for every seed); the full-batch subset (n = 1024, class-balanced per seed) is drawn from
#      the other 50,000;
#   2. every optimizer's learning rate (and ExactGN's damping) is chosen by `curvlab sweep` on
#      seed 42 by the final validation loss, never the test set;
#   3. the chosen settings run with seeds 42, 43, 44; GN's three schemes side by side, and GN with
#      the true cross-entropy Hessian (damped) beside the authors' identity Hessian;
#   4. `curvlab export` archives the records under docs/records/, from which `curvlab summary`
#      rebuilds every table of docs/reproduction.md.
# Needs Debian's dataset-fashion-mnist (or DATA=PATH). Every command resumes where it stopped when
# run again. STAGE=sweep|final|export|all (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
CURVLAB=${CURVLAB:-.venv/bin/curvlab}
PY=${PY:-.venv/bin/python}
STAGE=${STAGE:-all}
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data "$DATA"); fi
HIDDEN=${HIDDEN:-2048}
RUNS=${RUNS:-runs/fmnist-h$HIDDEN}
COMMON=(--dataset fashion-mnist "${DATA_ARGS[@]}" --hidden "$HIDDEN" --depth 4 --subset 1024
  --steps 100 --validation 10000 --no-progress)

best() {  # best() SWEEP_DIR KEY: the chosen value of a finished sweep
  "$PY" -c "import json,sys; b=json.load(open(sys.argv[1]+'/sweep.json'))['best']; print(b[sys.argv[2]])" "$1" "$2"
}

if [[ $STAGE == sweep || $STAGE == all ]]; then
  S=(--seeds 42 --eval-every 10)
  "$CURVLAB" sweep fullbatch "${COMMON[@]}" "${S[@]}" --optimizer adam --lrs 3e-4,1e-3,3e-3 \
    --out "$RUNS/sweep-adam"
  "$CURVLAB" sweep fullbatch "${COMMON[@]}" "${S[@]}" --optimizer sgd --lrs 0.01,0.03,0.1 \
    --out "$RUNS/sweep-sgd"
  "$CURVLAB" sweep fullbatch "${COMMON[@]}" "${S[@]}" --optimizer gn-right-inverse --lrs 1,2,4 \
    --dampings 0,100 --out "$RUNS/sweep-gn-right-inverse"
  "$CURVLAB" sweep fullbatch "${COMMON[@]}" "${S[@]}" --optimizer gn-paper --lrs 2,4 \
    --out "$RUNS/sweep-gn-paper"
  "$CURVLAB" sweep fullbatch "${COMMON[@]}" "${S[@]}" --ce-hessian exact \
    --optimizer gn-right-inverse --lrs 2 --dampings 0.1,0.3,1 --out "$RUNS/sweep-gn-exact-ce"
fi

if [[ $STAGE == final || $STAGE == all ]]; then
  ADAM=$(best "$RUNS/sweep-adam" lr)
  SGD=$(best "$RUNS/sweep-sgd" lr)
  GN=$(best "$RUNS/sweep-gn-right-inverse" lr)
  GN_DAMPING=$(best "$RUNS/sweep-gn-right-inverse" damping)
  PAPER=$(best "$RUNS/sweep-gn-paper" lr)
  F=(--seeds 42,43,44 --eval-every 5)
  "$CURVLAB" run fullbatch "${COMMON[@]}" "${F[@]}" --damping "$GN_DAMPING" \
    --lr "gn-right-inverse=$GN,adam=$ADAM,sgd=$SGD" --optimizers gn-right-inverse,adam,sgd \
    --out "$RUNS/fullbatch"
  # The other two schemes undamped, as swept (paper) and as defined (pinv: the Moore-Penrose
  # step, at gn-right-inverse's rate: both are exact normalized right inverses, so with
  # full-rank blocks they move the outputs by the same function-space step).
  "$CURVLAB" run fullbatch "${COMMON[@]}" "${F[@]}" --lr "gn-paper=$PAPER,gn-pinv=$GN" \
    --optimizers gn-paper,gn-pinv --out "$RUNS/fullbatch-schemes"
  EXACT=$(best "$RUNS/sweep-gn-exact-ce" lr)
  EXACT_DAMPING=$(best "$RUNS/sweep-gn-exact-ce" damping)
  "$CURVLAB" run fullbatch "${COMMON[@]}" "${F[@]}" --ce-hessian exact \
    --output-damping "$EXACT_DAMPING" --lr "gn-right-inverse=$EXACT" \
    --optimizers gn-right-inverse --out "$RUNS/fullbatch-exact-ce"
fi

if [[ $STAGE == export || $STAGE == all ]]; then
  mkdir -p docs/records
  for name in fullbatch fullbatch-schemes fullbatch-exact-ce; do
    [[ -f "$RUNS/$name/results.jsonl" ]] && \
      "$CURVLAB" export "$RUNS/$name" "docs/records/fmnist-h$HIDDEN-$name.jsonl.gz"
  done
  for sweep in "$RUNS"/sweep-*; do
    for run in "$sweep"/*/; do
      [[ -f "$run/results.jsonl" ]] && "$CURVLAB" export "$run" \
        "docs/records/sweeps/h$HIDDEN-$(basename "$sweep")-$(basename "$run").jsonl.gz"
    done
  done
fi
