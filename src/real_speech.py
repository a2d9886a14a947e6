"""A tiny test set of real human speech: the 8 spoken channel names of Debian's `alsa-utils` ("front left", ...).

Why: every other test split here is synthetic. These are the only human recordings found on these machines
(../shared/spec/offline_resources.md §2; the `audio-channel-*.oga` of `sound-theme-freedesktop` are the same
recordings, re-encoded). One voice and 16 words are far too few for a WER worth comparing with anything, but
enough to show whether a model trained on synthetic voices hears a person at all. The files are read from a
root where the .deb is installed or unpacked (`dpkg -x`, as the speedrun does), never committed.

    python -m src.real_speech --root / --out data/real        # then: python -m src.evaluate ... --manifest data/real/real.csv
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import soundfile

from src.audio import SAMPLE_RATE, load_audio

ALSA_SOUNDS = pathlib.Path("usr/share/sounds/alsa")
NOT_SPEECH = {"Noise"}
COLUMNS = ("ID", "duration", "wav", "wrd", "task", "state", "response", "answer", "context")


class RealSpeechError(RuntimeError):
    pass


def recordings(root: pathlib.Path) -> list[pathlib.Path]:
    """The spoken channel names under `root`, sorted; an error that says how to get them when there are none."""
    folder = root / ALSA_SOUNDS
    found = sorted(path for path in folder.glob("*.wav") if path.stem not in NOT_SPEECH)
    if not found:
        raise RealSpeechError(f"no recordings in {folder}: apt-get install alsa-utils, or unpack its .deb with "
                              "dpkg -x into a folder and pass it as --root (scripts/fetch_carry.sh carries it)")
    return found


def transcript(path: pathlib.Path) -> str:
    """What the file says, from its name: Front_Center.wav -> "front center"."""
    return path.stem.replace("_", " ").lower()


def build(root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """16 kHz FLAC copies of the recordings under `out/audio` and the manifest `out/real.csv` (ASR rows in the
    corpus's columns, so that `python -m src.evaluate` scores them with every metric); returns the manifest."""
    sources = recordings(root)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for source in sources:
        wav = load_audio(source)  # (N,) 16 kHz mono
        name = f"audio/real-{source.stem.lower()}.flac"
        soundfile.write(out / name, wav.numpy(), SAMPLE_RATE)
        words = transcript(source)
        rows.append({"ID": f"real-{source.stem.lower()}", "duration": f"{wav.numel() / SAMPLE_RATE:.3f}",
                     "wav": name, "wrd": words, "task": "asr", "state": "empty", "response": words,
                     "answer": "", "context": ""})
    manifest = out / "real.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.real_speech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/"),
                        help="where usr/share/sounds/alsa is (default /; the speedrun's dpkg -x prefix)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for audio/ and real.csv")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.root, args.out)
    except RealSpeechError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
