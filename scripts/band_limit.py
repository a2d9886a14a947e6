#!/usr/bin/env python3
"""A manifest's audio as a telephone line would carry it: resampled to 8 kHz and back, into another folder.

Why: the real recordings we test on (the asterisk prompts, `python -m src.real_speech`) are 8 kHz telephone
audio, and a model trained on 16 kHz synthetic speech fails on them. Scoring the same synthetic rows twice, as
made and band-limited, tells whether the missing upper band explains that failure (docs/demo_model.md, "second
lease after the embedding": it did not).

    python scripts/band_limit.py CORPUS/test-asr.csv OUT --rows 200

writes OUT/<the manifest's name> with the band-limited audio at the same relative paths, and OUT/original-<name>
with the same rows pointing at the untouched audio, so that both can be scored side by side (e.g. as
`--test_csvs` of train_asr.py).
"""
import argparse
import csv
import os
import pathlib
import sys

import soundfile
import torch
import torchaudio


def band_limit(wav: torch.Tensor, sample_rate: int, line_rate: int) -> torch.Tensor:
    """(C, N) -> (C, N): through `line_rate` and back to `sample_rate` (sinc resampling: nothing above
    line_rate / 2 survives)."""
    narrow = torchaudio.functional.resample(wav, sample_rate, line_rate)  # (C, N * line_rate / sample_rate)
    return torchaudio.functional.resample(narrow, line_rate, sample_rate)[..., : wav.shape[-1]]  # (C, N)


def read_rows(manifest: pathlib.Path, rows: int | None) -> list[dict]:
    with open(manifest, newline="") as stream:
        table = list(csv.DictReader(stream))
    if not table or "wav" not in table[0]:
        raise SystemExit(f"{manifest}: no rows with a `wav` column; give a manifest of python -m src.corpus.")
    return table[:rows] if rows else table


def write_manifest(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


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
    rows = read_rows(args.manifest, args.rows)
    for row in rows:
        audio, sample_rate = soundfile.read(source / row["wav"], dtype="float32", always_2d=True)  # (N, C)
        narrow = band_limit(torch.from_numpy(audio.T), sample_rate, args.line_rate)  # (C, N)
        target = args.out / row["wav"]
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(target, narrow.T.numpy(), sample_rate)
    write_manifest(args.out / args.manifest.name, rows)
    original = [{**row, "wav": os.path.relpath(source / row["wav"], args.out.resolve())} for row in rows]
    write_manifest(args.out / f"original-{args.manifest.name}", original)
    print(f"{len(rows)} rows band-limited to {args.line_rate} Hz: {args.out / args.manifest.name}; the same rows "
          f"untouched: {args.out / ('original-' + args.manifest.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
