#!/usr/bin/env python3
"""A manifest's audio as a telephone line would carry it: resampled to 8 kHz and back, into another folder.

Why: the real recordings we test on (the asterisk prompts, `python -m src.real_speech`) are 8 kHz telephone
audio, and a model trained on 16 kHz synthetic speech fails on them. Scoring the same synthetic rows twice, as
made and band-limited, tells whether the missing upper band explains that failure (docs/demo_model.md, "second
lease after the embedding": it did not).

    python scripts/band_limit.py CORPUS/test-asr.csv OUT --rows 200

writes OUT/<the manifest's name> with the band-limited audio (16 kHz mono, as src.audio.load_audio reads every
file) at the same relative paths, and OUT/original-<name>
with the same rows pointing at the untouched audio, so that both can be scored side by side (e.g. as
`--test_csvs` of train_asr.py).
"""
import argparse
import os
import pathlib
import sys

import soundfile
import torch
import torchaudio

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.audio import SAMPLE_RATE, load_audio  # noqa: E402
from src.corpus.build import write_csv  # noqa: E402
from src.manifest_check import read_rows  # noqa: E402


def band_limit(wav: torch.Tensor, line_rate: int) -> torch.Tensor:
    """(N,) at 16 kHz -> (N,) at 16 kHz, through `line_rate` and back (sinc resampling: nothing above
    line_rate / 2 survives)."""
    narrow = torchaudio.functional.resample(wav, SAMPLE_RATE, line_rate)  # (N * line_rate / 16000,)
    return torchaudio.functional.resample(narrow, line_rate, SAMPLE_RATE)[: wav.shape[-1]]  # (N,)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=pathlib.Path, help="a manifest with a `wav` column (relative to it)")
    parser.add_argument("out", type=pathlib.Path, help="the folder to write (created; may not be the manifest's)")
    parser.add_argument("--rows", type=int, help="only the first ROWS rows (default: all)")
    parser.add_argument("--line-rate", type=int, default=8000, help="the telephone line's sample rate (8000)")
    args = parser.parse_args(argv)
    source = args.manifest.resolve().parent
    if args.out.resolve() == source:
        raise SystemExit(f"{args.out}: that is the manifest's own folder; the band-limited audio would replace "
                         "the original. Give another folder.")
    try:
        rows = [row for _, row in read_rows(args.manifest, required_columns=("ID", "wav"))][: args.rows]
        if not rows:
            raise ValueError(f"{args.manifest}: no rows to band-limit.")
        for row in rows:  # one file at a time: a whole corpus would not fit in memory
            narrow = band_limit(load_audio(source / row["wav"]), args.line_rate)  # (N,) at 16 kHz
            target = args.out / row["wav"]
            target.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(target, narrow.numpy(), SAMPLE_RATE)
    except (FileNotFoundError, ValueError) as error:  # AudioError is a ValueError: the file and the fix named
        raise SystemExit(f"band_limit: {error}; no manifest was written") from None
    write_csv(args.out / args.manifest.name, rows, list(rows[0]))
    original = [{**row, "wav": os.path.relpath(source / row["wav"], args.out.resolve())} for row in rows]
    write_csv(args.out / f"original-{args.manifest.name}", original, list(rows[0]))
    print(f"{len(rows)} rows band-limited to {args.line_rate} Hz: {args.out / args.manifest.name}; the same rows "
          f"untouched: {args.out / ('original-' + args.manifest.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
