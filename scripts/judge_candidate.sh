#!/usr/bin/env bash
# Embed or not: a new speedrun export against the embedded model, on the same held-out material, in one command.
#
#   bash scripts/judge_candidate.sh EXPORT CORPUS REAL OUT
#
# EXPORT: the candidate's export folder (python -m src.pieces unpack ... export ...; it holds CKPT+*/).
# CORPUS: the corpus the embedded model's report was made on (python -m src.corpus, same seed and engines as
#   docs/demo_model.md "What it does"); its test, test-engine and conversation scripts are scored.
# REAL: the folder of python -m src.real_speech (real.csv, real-asterisk.csv).
# OUT: where the two reports and compare.md go (not inside EXPORT).
#
# Why: a lease's own report is made on the lease's corpus, whose voices (DECtalk there) and scripts differ from
# those of the embedded model's report, so the two cannot be compared (2026-12-05: the same model scored 0.796 of
# conversation slices there and 0.683 here). This scores the candidate here, on the CPU, exactly as the embedded
# model was scored, then prints src.compare_reports against the committed baseline with issue #14's targets.
# The rule (docs/demo_model.md, the leases' runbook): embed only a model better on the held-out state and answer
# measures.
set -euo pipefail
if [[ $# -ne 4 || $1 == -h || $1 == --help ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
export_dir=$1 corpus=$2 real=$3 out=$4
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
for path in "$corpus/test.csv" "$corpus/test-engine.csv" "$corpus/conversations" "$corpus/conversations-engine" \
            "$real/real.csv" "$real/real-asterisk.csv"; do
    [[ -e $path ]] || { echo "judge_candidate: $path is missing: CORPUS must be a python -m src.corpus folder and REAL one of python -m src.real_speech (with the asterisk .debs)" >&2; exit 2; }
done
ls -d "$export_dir"/CKPT+* > /dev/null 2>&1 || { echo "judge_candidate: no CKPT+* folder in $export_dir: give the unpacked export" >&2; exit 2; }
baseline=docs/demo_model/embedded-2026-12-05
mkdir -p "$out"
"$python" -m src.evaluate hparams/speedrun/duplex.yaml --checkpoint "$export_dir" \
    --manifest "$corpus/test.csv" --manifest "$corpus/test-engine.csv" --manifest "$real/real.csv" \
    --scripts "$corpus/conversations" --scripts "$corpus/conversations-engine" --max-rows 300 --device cpu \
    --out "$out/held-out" --no-progress
"$python" -m src.evaluate hparams/speedrun/duplex.yaml --checkpoint "$export_dir" \
    --manifest "$real/real-asterisk.csv" --device cpu --out "$out/real-asterisk" --no-progress
"$python" -m src.compare_reports "embedded=$baseline/report.json,$baseline/real-asterisk/report.json" \
    "candidate=$out/held-out/report.json,$out/real-asterisk/report.json" --targets hparams/speedrun/targets.yaml \
    --out "$out/compare.md"
