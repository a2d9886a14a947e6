#!/usr/bin/env bash
# Multi-GPU smoke test of the training recipes: tiny stage 1 then stage 2 (hand-off from stage 1's average)
# under torchrun with NCCL on every visible GPU, bf16 autocast, on the committed sample corpus.
#   bash bench/ddp_smoke.sh                 # all GPUs, NCCL
#   NPROC=2 BACKEND=gloo DEVICE=cpu bash bench/ddp_smoke.sh   # the same on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NPROC=${NPROC:-$($PY -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
BACKEND=${BACKEND:-nccl}
DEVICE=${DEVICE:-}  # empty: SpeechBrain picks cuda:LOCAL_RANK per process
PRECISION=${PRECISION:-bf16}
OUT_DIR=${OUT_DIR:-results/ddp_smoke}
common=(--data_folder=tests/data/corpus --distributed_backend "$BACKEND" --precision="$PRECISION" --noprogressbar)
[ -n "$DEVICE" ] && common+=(--device="$DEVICE")
run() { $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"; }
run train_stage1.py hparams/tiny/train_stage1.yaml "${common[@]}" --output_folder="$OUT_DIR/stage1"
run train_stage2.py hparams/tiny/train_stage2.yaml "${common[@]}" --output_folder="$OUT_DIR/stage2" \
    --previous_output_folder="$OUT_DIR/stage1"
for s in stage1 stage2; do
  echo "== $s: $(ls -d "$OUT_DIR/$s"/save/CKPT+* | wc -l) checkpoint(s)"; tail -n 3 "$OUT_DIR/$s/train_log.txt"
done
