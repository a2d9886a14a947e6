"""Re-cut a synthetic corpus's manifests for the small demo model (hparams/demo/, docs/demo_model.md).

Why: a randomly initialised 3.7M-parameter model trained for an hour on 2 CPU cores cannot learn 680 quiz facts,
but it can learn templated replies and the three state classes. So:

* `demo-asr-<split>.csv` (stage 1): utterances of every kind as ASR, target = the transcript, so the encoder
  learns from all the audio, not only from the few ASR rows; at most `--asr-rows` per split (an evenly spaced
  subset: stage 1 only has to align the encoder and estimate the feature statistics in a few minutes).
* `demo-qa-state-<split>.csv` (stages 2-4): spoken QA restricted to the learnable kinds (capitals, arithmetic,
  units), plus every incomplete and ignore row (state classes). `--questions all` keeps every spoken question
  instead: four times more examples of the respond class (what the GPU-trained model used: its state decisions
  need many kinds of question; its replies to quiz facts are then fluent guesses).

Written next to the corpus's own manifests (same relative `wav` paths), so the stage YAMLs read them with
`data_prep: null`.

    python scripts/demo_manifests.py data/demo
"""
import argparse
import csv
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(ROOT))
from src.data_prep import as_transcription_row  # noqa: E402

SPLITS = ("train", "valid", "test")
ARITHMETIC = re.compile(r"\b(plus|minus|times|divided by|multiplied by|add|take)\b")
LEARNABLE_QA = (
    ("capital", lambda words: words.startswith("what is the capital of")),
    ("arithmetic", lambda words: ARITHMETIC.search(words) is not None),
    ("units", lambda words: words.startswith("how many")),
)


def qa_kind(words: str) -> str | None:
    """Which learnable QA kind a question's transcript is, or None."""
    for kind, matches in LEARNABLE_QA:
        if matches(words):
            return kind
    return None


def read_rows(csv_path: pathlib.Path) -> tuple[list[str], list[dict]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: manifest missing; make the corpus first "
                                f"(python -m src.corpus --out {csv_path.parent} ...).")
    with open(csv_path, newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames), list(reader)


def write_rows(csv_path: pathlib.Path, fields: list[str], rows: list[dict]) -> None:
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def as_asr(row: dict) -> dict:
    """Any utterance as an ASR example (the transcript is the target), under an `asr-` id."""
    return {**as_transcription_row(row), "ID": row["ID"] if row["ID"].startswith("asr-") else f"asr-{row['ID']}"}


def qa_state_rows(rows: list[dict], questions: str = "learnable") -> list[dict]:
    """Incomplete and ignore rows, plus the spoken questions (`learnable` kinds only, or `all`)."""
    def keep_question(row):
        return questions == "all" or qa_kind(row["wrd"]) is not None
    return [row for row in rows if row["task"] == "state" or (row["task"] == "qa" and keep_question(row))]


def evenly_spaced(rows: list[dict], limit: int) -> list[dict]:
    """At most `limit` rows spread over the whole list (manifests are ordered by speaker and kind)."""
    if len(rows) <= limit:
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=pathlib.Path, help="output folder of python -m src.corpus")
    parser.add_argument("--asr-rows", type=int, nargs=3, default=(1200, 96, 96), metavar=("TRAIN", "VALID", "TEST"),
                        help="most stage-1 rows per split (default 1200 96 96)")
    parser.add_argument("--questions", choices=("learnable", "all"), default="learnable",
                        help="spoken questions kept for stages 2-4 (default: the learnable kinds)")
    args = parser.parse_args(argv)
    for split, asr_rows in zip(SPLITS, args.asr_rows):
        fields, rows = read_rows(args.corpus / f"{split}.csv")
        asr = [as_asr(row) for row in evenly_spaced(rows, asr_rows)]
        write_rows(args.corpus / f"demo-asr-{split}.csv", fields, asr)
        kept = qa_state_rows(rows, args.questions)
        write_rows(args.corpus / f"demo-qa-state-{split}.csv", fields, kept)
        counts = {kind: sum(1 for row in kept if (row["state"] if row["task"] == "state" else "respond") == kind)
                  for kind in ("respond", "incomplete", "ignore")}
        print(f"{split}: {len(asr)} asr rows, qa-state {counts}")


if __name__ == "__main__":
    main()
