"""Test sets of real human speech, from Debian packages: python -m src.real_speech --root ROOT --out data/real

Why: every other test split here is synthetic, and a model trained on synthetic voices must also be measured on
people. Two sources are read from a root where their .debs are installed or unpacked (`dpkg -x`), never committed:
- `alsa-utils`: the 8 spoken channel names ("front left", ...): one voice, 16 words; the speedrun carries it.
- `asterisk-core-sounds-en-wav` (CC-BY-SA-3.0, Allison Smith): about 540 telephone-system prompts ("please enter
  your password followed by the pound key", digits, letters), 8 kHz, with their transcripts in
  `asterisk-core-sounds-en`'s `core-sounds-en.txt.gz` (install or unpack both). Everyday phrasing from a real
  voice through a telephone band: far from the training voices, and about 4000 words.
(The `audio-channel-*.oga` of `sound-theme-freedesktop` are the alsa recordings again, re-encoded.)

Writes 16 kHz FLAC copies under `out/audio`, `out/real.csv` (every source) and `out/real-<source>.csv` (one
each), as ASR rows in the corpus's columns, so that `python -m src.evaluate ... --manifest out/real.csv` scores
them. A source that is not there is left out with a line; none at all is an error that says how to get them.

    apt-get download alsa-utils asterisk-core-sounds-en asterisk-core-sounds-en-wav
    for deb in *.deb; do dpkg -x "$deb" /tmp/real-root; done
    python -m src.real_speech --root /tmp/real-root --out data/real
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import pathlib
import re
import sys

import soundfile

from src.audio import SAMPLE_RATE, AudioError, load_audio
from src.corpus.build import write_csv
from src.corpus.normalize import transcript as normalised

ALSA_SOUNDS = pathlib.Path("usr/share/sounds/alsa")
NOT_SPEECH = {"Noise"}
ASTERISK_SOUNDS = pathlib.Path("usr/share/asterisk/sounds")
ASTERISK_TRANSCRIPTS = pathlib.Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
# what the speaker says for the keypad's symbols, and the transcript file's own misspellings
SPOKEN_SYMBOLS = {"*": " star ", "#": " pound "}
SPELLING = {"exclaimation": "exclamation", "decending": "descending", "fourtieth": "fortieth"}
COLUMNS = ("ID", "duration", "wav", "wrd", "task", "state", "response", "answer", "context")


class RealSpeechError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Recording:
    source: str  # "alsa" or "asterisk": the manifest real-<source>.csv
    utt_id: str
    path: pathlib.Path
    words: str  # normalised as the corpus's transcripts (src.corpus.normalize.transcript)


def transcript(path: pathlib.Path) -> str:
    """What an alsa recording says, from its name: Front_Center.wav -> "front center"."""
    return path.stem.replace("_", " ").lower()


def alsa_recordings(root: pathlib.Path) -> list[Recording]:
    """The spoken channel names under `root`, sorted by name (none: an empty list)."""
    folder = root / ALSA_SOUNDS
    return [Recording("alsa", f"real-{path.stem.lower()}", path, transcript(path))
            for path in sorted(folder.glob("*.wav")) if path.stem not in NOT_SPEECH]


def spoken_prompt(text: str) -> str | None:
    """A prompt's transcript line -> the words said, normalised; None for a sound that is not speech.

    "[ascending tones]", "<beep ascending>" and "(10 seconds of silence)" are not speech; "at [@]" says "at";
    "press * to toggle" says "star"."""
    text = text.strip()
    if not text or re.fullmatch(r"[\[<(].*[\]>)]", text):
        return None
    text = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", " ", text)  # inline notes: "dot [.]"
    for symbol, words in SPOKEN_SYMBOLS.items():
        text = text.replace(symbol, words)
    words = normalised(text)
    for wrong, right in SPELLING.items():
        words = re.sub(rf"\b{wrong}\b", right, words)
    return words or None


def read_prompt_transcripts(path: pathlib.Path) -> dict[str, str]:
    """`name: text` lines (name relative to the voice folder, without extension) -> the words said."""
    prompts = {}
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as stream:
        for line in stream:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            words = spoken_prompt(text)
            if words:
                prompts[name.strip()] = words
    return prompts


def asterisk_recordings(root: pathlib.Path) -> tuple[list[Recording], int]:
    """The English prompts with a transcript under `root` (none: an empty list), and how many audio files had no
    speech transcript (tones, silences, prompts the transcript file does not list)."""
    transcripts_file = root / ASTERISK_TRANSCRIPTS
    voices = sorted(folder for folder in (root / ASTERISK_SOUNDS).glob("en*") if folder.is_dir()
                    and not folder.is_symlink())
    if not transcripts_file.is_file() or not voices:
        return [], 0
    prompts = read_prompt_transcripts(transcripts_file)
    found, unlisted = [], 0
    for voice in voices:
        for path in sorted(voice.rglob("*.wav")):
            name = path.relative_to(voice).with_suffix("").as_posix()
            if name not in prompts:
                unlisted += 1
                continue
            utt_id = "asterisk-" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            found.append(Recording("asterisk", utt_id, path, prompts[name]))
    return found, unlisted


def build(root: pathlib.Path, out: pathlib.Path, log=print) -> pathlib.Path:
    """16 kHz FLAC copies under `out/audio`, `out/real.csv` and one `out/real-<source>.csv` per source found;
    returns real.csv. Every source's file count and what was left out go to `log`."""
    alsa = alsa_recordings(root)
    asterisk, unlisted = asterisk_recordings(root)
    if not alsa and not asterisk:
        raise RealSpeechError(f"no recordings under {root}: neither {ALSA_SOUNDS} (apt-get install alsa-utils) nor "
                              f"{ASTERISK_SOUNDS}/en* with {ASTERISK_TRANSCRIPTS} (asterisk-core-sounds-en and "
                              "asterisk-core-sounds-en-wav). Install them, or unpack their .debs with dpkg -x into "
                              "a folder and pass it as --root.")
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows_by_source: dict[str, list[dict]] = {}
    unreadable = []
    for recording in alsa + asterisk:
        try:
            wav = load_audio(recording.path)  # (N,) 16 kHz mono
        except AudioError as error:  # a clip too short for one adapter position, or a damaged file
            unreadable.append(f"{recording.path.name} ({error})")
            continue
        name = f"audio/{recording.utt_id}.flac"
        soundfile.write(out / name, wav.numpy(), SAMPLE_RATE)
        rows_by_source.setdefault(recording.source, []).append(
            {"ID": recording.utt_id, "duration": f"{wav.numel() / SAMPLE_RATE:.3f}", "wav": name,
             "wrd": recording.words, "task": "asr", "state": "empty", "response": recording.words, "answer": "",
             "context": ""})
    for source, rows in rows_by_source.items():
        write_csv(out / f"real-{source}.csv", rows, COLUMNS)
        words = sum(len(row["wrd"].split()) for row in rows)
        log(f"real speech: {source}: {len(rows)} recordings, {words} words -> {out / f'real-{source}.csv'}")
    if not alsa:
        log(f"real speech: alsa: none under {root / ALSA_SOUNDS} (alsa-utils)")
    if not asterisk:
        log(f"real speech: asterisk: none under {root / ASTERISK_SOUNDS} (asterisk-core-sounds-en and -en-wav)")
    if unlisted:
        log(f"real speech: asterisk: {unlisted} files left out, not speech or without a transcript")
    if unreadable:
        log(f"real speech: {len(unreadable)} unreadable or too short, left out: {'; '.join(unreadable[:5])}")
    manifest = out / "real.csv"
    write_csv(manifest, [row for rows in rows_by_source.values() for row in rows], COLUMNS)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.real_speech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/"),
                        help="where usr/share/sounds/alsa and usr/share/asterisk are (default /; the speedrun's "
                             "dpkg -x prefix)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for audio/ and the manifests")
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
