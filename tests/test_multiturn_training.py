"""A tiny stage 3 trains on multi-turn rows: the `context` column of a manifest reaches the Brain, the earlier
turns' audio is encoded in the same forward pass, and only the current turn carries loss."""
import csv
import json
import math
import pathlib

import pytest

from src.brain import DuplexBrain
from src.stages import run_stage
from tests.training_corpus import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


def multi_turn_manifest(corpus: pathlib.Path) -> pathlib.Path:
    """Rows of the training test corpus: the state rows follow its spoken question (answered in full, or cut
    after two words as by an interruption)."""
    question, answer = "train/100/1/100-1-0002.flac", "Two plus two is four."
    rows = [
        ("100-1-0002", "1.400", question, "qa", "respond", answer, []),
        ("100-3-0003-cut", "1.500", "train/100/3/100-3-0003-cut.flac", "state", "incomplete",
         "It seems like your question got cut off.", [{"wav": question, "reply": answer}]),
        ("100-4-0004-ignore", "1.600", "train/100/4/100-4-0004-ignore.flac", "state", "ignore",
         "I didn't get that, could you rephrase it?", [{"wav": question, "reply": "Two plus"}]),
    ]
    path = corpus / "multi.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["ID", "duration", "wav", "wrd", "task", "state", "response", "context"])
        for utt_id, duration, wav, task, state, response, context in rows:
            writer.writerow([utt_id, duration, wav, "", task, state, response, json.dumps(context) if context else ""])
    return path


class CountsContext(DuplexBrain):
    seen = 0

    def compute_forward(self, batch, stage):
        CountsContext.seen += sum(len(turns) for turns in batch.context_turns)
        return super().compute_forward(batch, stage)


@pytest.mark.slow  # one short CPU training
def test_tiny_stage3_trains_on_multi_turn_rows(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", splits=("train",))
    manifest = multi_turn_manifest(corpus)
    brain = run_stage(CountsContext, [
        str(ROOT / "hparams" / "tiny" / "train_stage3.yaml"), f"--data_folder={corpus}",
        f"--output_folder={tmp_path / 'out'}", "--device=cpu", "--noprogressbar", "--data_prep=null",
        f"--train_csv={manifest}", f"--valid_csv={manifest}", f"--test_csvs=[{manifest}]",
        "--init_from={folder: null}", "--number_of_epochs=1", "--test_max_new_tokens=0",
        "--train_dataloader_opts={batch_size: 3}", "--speed_perturb=null"])
    assert CountsContext.seen >= 2 * 3  # train, valid and test passes each saw both multi-turn rows
    assert brain.train_losses and all(math.isfinite(loss) for loss in brain.train_losses)


def test_context_column_is_resolved_and_counted_for_batching(tmp_path):
    """read_manifest resolves the earlier turns' audio against the CSV's folder and sums their durations (dynamic
    batching counts them); a malformed context is an error naming the row."""
    from src.stages import read_manifest
    corpus = write_corpus(tmp_path / "corpus", splits=("train",))
    manifest = multi_turn_manifest(corpus)
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    turns = json.loads(rows[1]["context"])
    turns[0]["duration"] = 1.4
    rows[1]["context"] = json.dumps(turns)
    with open(manifest, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dataset = read_manifest(manifest)
    with dataset.output_keys_as(["id", "context", "context_duration"]):
        entries = {item["id"]: item for item in dataset}
    context = json.loads(entries["100-3-0003-cut"]["context"])
    assert pathlib.Path(context[0]["wav"]).is_absolute() and pathlib.Path(context[0]["wav"]).is_file()
    assert entries["100-3-0003-cut"]["context_duration"] == 1.4 and entries["100-1-0002"]["context_duration"] == 0
    rows[1]["context"] = '[{"reply": "no audio"}]'
    with open(manifest, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="row 100-3-0003-cut has context"):
        read_manifest(manifest)
