#!/usr/bin/env bash
# The two pre-trainings of the demo model (docs/pretraining.md) on one GPU: the small Mamba LM (train_lm.py) and the
# ConMamba + Mamba-decoder ASR (train_asr.py), each within a wall-clock budget (whole epochs only: src/epochs.py),
# for the speedrun's steps of at most 10 minutes. Each result folder (save folder with optimizer, so another machine
# can resume; the LM export; the text pool) is packed into $OUT in pieces under 15 MiB as soon as its run ends, and
# pieces found in $CARRY are unpacked first: a second call, here or on another machine, continues the training.
#
#   DATA=data/demo OUT=results/pretrain_gpu bash scripts/pretrain_demo_gpu.sh
#   then: train_stage1.py hparams/demo/train_stage1.yaml --asr_checkpoint_folder=results/demo/demo_asr/3407/save \
#         --lm_source=results/demo/demo_lm/3407/lm
#
# Environment (defaults in brackets):
#   DATA [data/demo]           the corpus (LibriSpeech layout with train.csv, e.g. unpacked by scripts/corpus_pack.py)
#   CARRY [.carry]             folder with demo_lm.tgz.part* / demo_asr.tgz.part* of earlier runs
#   OUT [results/pretrain_gpu] where the pieces and train logs go
#   PARTS ["lm asr"]           what to run, in order
#   EPOCHS ["lm:40 asr:60"], MINUTES ["lm:4 asr:4"]   epoch limits (total, across calls) and budgets per call
#   DEVICE [cuda:0]; LM_ARGS, ASR_ARGS: extra `--key=value` overrides for each recipe
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/demo}
CARRY=${CARRY:-.carry}
OUT=${OUT:-results/pretrain_gpu}
PARTS=${PARTS:-lm asr}
EPOCHS=${EPOCHS:-lm:40 asr:60}
MINUTES=${MINUTES:-lm:4 asr:4}
SEED=3407  # the YAMLs' seed: their output folders are results/demo/demo_<part>/3407
mkdir -p "$OUT"

pick() {  # pick asr "lm:40 asr:60" -> 60
  local part=$1; shift
  for pair in $*; do [ "${pair%%:*}" = "$part" ] && echo "${pair#*:}"; done
}

for first in "$CARRY"/demo_lm.tgz.partaa "$CARRY"/demo_asr.tgz.partaa; do  # result folders of earlier calls
  [ -f "$first" ] && cat "${first%aa}"* | tar xzf - && echo "unpacked ${first%.partaa}"
done

for part in $PARTS; do
  case $part in
    lm) extra=${LM_ARGS:-} ;;
    asr) extra=${ASR_ARGS:-} ;;
    *) echo "unknown part $part (lm, asr)"; exit 2 ;;
  esac
  name=demo_$part
  echo "== $name ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086  # $extra holds separate --key=value words
  python3 "train_$part.py" "hparams/$part/demo.yaml" --data_folder="$DATA" --device="${DEVICE:-cuda:0}" \
    --number_of_epochs="$(pick "$part" $EPOCHS)" --max_minutes="$(pick "$part" $MINUTES)" --noprogressbar \
    $extra 2>&1 | grep -v "^INFO" | tail -12
  status=${PIPESTATUS[0]}
  folder=results/demo/$name/$SEED
  cp "$folder/train_log.txt" "$OUT/${name}_train_log.txt" 2>/dev/null
  rm -f "$OUT/$name.tgz.part"*
  tar czf - --exclude='tokens' "$folder" | split -b 15M - "$OUT/$name.tgz.part" || exit 1
  [ "$status" = 0 ] || { echo "$name failed (exit $status)"; exit "$status"; }
done
echo "== done ($(date -u +%H:%M:%S))"
