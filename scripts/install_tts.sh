#!/usr/bin/env bash
# Installs the offline TTS engines the corpus maker can use (Debian/Ubuntu, as root).
# Engines that are missing are skipped by the corpus maker with a message; this script is best effort.
set -euo pipefail
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v flite >/dev/null || need+=(flite)
command -v sox >/dev/null || need+=(sox)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing TTS tools: ${need[*]} (install them with your package manager)" >&2
  exit 1
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
