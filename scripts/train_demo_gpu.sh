#!/usr/bin/env bash
# Train the demo model (hparams/demo/, docs/demo_model.md) on one GPU of a machine without the TTS engines or a
# registry, from a corpus packed by scripts/corpus_pack.py. Each stage runs within a wall-clock budget (whole
# epochs only: src/epochs.py) and its save folder (model + normaliser, no optimizer) is packed into $OUT as
# soon as it ends, so a run cut short keeps every finished stage.
#
#   OUT=results/demo_gpu STAGES="1 2 3" bash scripts/train_demo_gpu.sh
#
# Environment (defaults in brackets):
#   CARRY [.carry]         folder with demo-corpus.tar, optional wheels/*.whl and demo_stageK.tgz.part* of earlier runs
#   DATA [data/demo]       where the corpus is unpacked (skipped when it exists)
#   STAGES ["1 2 3"]       stages to run, in order; stage K starts from stage K-1's save folder
#   EPOCHS ["1:40 2:6 3:12 4:2"], MINUTES ["1:4 2:1.5 3:2.5 4:1"]   per-stage epoch limits and budgets
#   BATCH [32], WORKERS [6], DEVICE [cuda:0]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/demo_gpu}
CARRY=${CARRY:-.carry}
DATA=${DATA:-data/demo}
STAGES=${STAGES:-1 2 3}
EPOCHS=${EPOCHS:-1:40 2:6 3:12 4:2}
MINUTES=${MINUTES:-1:4 2:1.5 3:2.5 4:1}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-6}
SEED=3407  # the stage YAMLs' seed: their output folders are results/demo/<experiment>/3407
mkdir -p "$OUT"

pick() {  # pick 2 "1:40 2:6" -> 6
  local stage=$1; shift
  for pair in $*; do [ "${pair%%:*}" = "$stage" ] && echo "${pair#*:}"; done
}

if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -d "$DATA" ]; then
  python3 scripts/corpus_pack.py unpack "$CARRY/demo-corpus.tar" "$DATA" || exit 1
fi
for first in "$CARRY"/demo_stage*.tgz.partaa; do  # save folders of earlier runs
  [ -f "$first" ] && cat "${first%aa}"* | tar xzf - && echo "unpacked ${first%.partaa}"
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

for stage in $STAGES; do
  name=demo_stage$stage
  echo "== stage $stage ($(date -u +%H:%M:%S))"
  python3 train_stage$stage.py hparams/demo/train_stage$stage.yaml --data_folder="$DATA" --device="${DEVICE:-cuda:0}" \
    --number_of_epochs="$(pick "$stage" $EPOCHS)" --max_minutes="$(pick "$stage" $MINUTES)" \
    --train_dataloader_opts="{batch_size: $BATCH, shuffle: True, num_workers: $WORKERS}" \
    --valid_dataloader_opts="{batch_size: $BATCH, num_workers: $WORKERS}" \
    --test_dataloader_opts="{batch_size: $BATCH, num_workers: $WORKERS}" 2>&1 \
    | grep -v "^INFO\|it/s\]$" | tail -20
  status=${PIPESTATUS[0]}
  folder=results/demo/$name/$SEED
  cp "$folder/train_log.txt" "$OUT/${name}_train_log.txt" 2>/dev/null
  # pieces under 15 MiB: a lent machine sends back no file over 16 MiB (two kept checkpoints are ~28 MiB)
  tar czf - --exclude='optimizer.ckpt' --exclude='dataloader-*' "$folder" | split -b 15M - "$OUT/$name.tgz.part" \
    || exit 1
  [ "$status" = 0 ] || { echo "stage $stage failed (exit $status)"; exit "$status"; }
done
echo "== done ($(date -u +%H:%M:%S))"
