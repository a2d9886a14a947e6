"""`transcripts_as_targets` (stage YAML): every manifest row read as an ASR row, its transcript the target.

The speedrun's stage 1 aligns on every transcribed utterance of the corpus (spoken questions, cut-off questions,
background talk), not only on its ASR rows; the rows' own state, reply and earlier turns must not leak in.
"""
import csv
import json
import pathlib

import pytest
from hyperpyyaml import load_hyperpyyaml

from modules.tokenizer import load_tokenizer
from src.data_prep import STATE_EMPTY, TASK_ASR
from src.stages import PromptDraws, TextIds, make_datasets, read_manifest
from tests.training_corpus import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = [  # ID, wav, wrd, task, state, response, context
    ("asr-100-0-0000", "train/100/0/asr-100-0-0000.flac", "the cat sat", "asr", "empty", "the cat sat", ""),
    ("100-1-0002", "train/100/1/100-1-0002.flac", "what is two plus two", "qa", "respond",
     "Two plus two is four.", ""),
    ("100-3-0003-cut", "train/100/3/100-3-0003-cut.flac", "what is the", "state", "incomplete",
     "It seems like your question got cut off.",
     json.dumps([{"wav": "train/100/1/100-1-0002.flac", "reply": "Two plus two is four.", "duration": 1.4}])),
    ("100-4-0004-ignore", "train/100/4/100-4-0004-ignore.flac", "", "state", "ignore",
     "I didn't get that, could you rephrase it?", ""),  # no transcript: left out
]


@pytest.fixture()
def manifest(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", splits=("train",))
    path = corpus / "rows.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["ID", "duration", "wav", "wrd", "task", "state", "response", "context"])
        for utt_id, wav, wrd, task, state, response, context in ROWS:
            writer.writerow([utt_id, "1.300", wav, wrd, task, state, response, context])
    return path


def _entries(dataset, keys):
    with dataset.output_keys_as(["id", *keys]):
        return {item["id"]: item for item in dataset}


def test_every_transcribed_row_becomes_an_asr_row(manifest):
    entries = _entries(read_manifest(manifest, transcripts=True),
                       ["task", "state", "response", "context", "context_duration"])
    assert sorted(entries) == ["100-1-0002", "100-3-0003-cut", "asr-100-0-0000"]
    for utt_id, wav, wrd, *_ in ROWS[:3]:
        entry = entries[utt_id]
        assert (entry["task"], entry["state"], entry["response"]) == (TASK_ASR, STATE_EMPTY, wrd)
        assert entry["context"] == "[]" and entry["context_duration"] == 0.0


def test_without_the_key_rows_keep_their_targets(manifest):
    entries = _entries(read_manifest(manifest), ["task", "response", "context_duration"])
    assert len(entries) == 4
    assert entries["100-1-0002"]["response"] == "Two plus two is four." and entries["100-1-0002"]["task"] == "qa"
    assert entries["100-3-0003-cut"]["context_duration"] == 1.4


def test_stage1_label_ids_are_the_transcript_and_the_task_filter_applies_first(manifest):
    """make_datasets reads the YAML keys: the stage-1 response ids are the tokenised transcript; `tasks` still
    chooses the rows before they are turned into ASR rows."""
    tokenizer = load_tokenizer(num_state_tokens=1)
    text_ids = TextIds(tokenizer, stage=1)
    hparams = {"seed": 1, "train_csv": manifest, "valid_csv": manifest, "test_csvs": [manifest],
               "tasks": None, "transcripts_as_targets": True}
    train, _, _ = make_datasets(hparams, text_ids, PromptDraws(1, train=True))
    entries = _entries(train, ["response_ids"])
    assert entries["100-1-0002"]["response_ids"] == text_ids.encode("what is two plus two")
    hparams["tasks"] = ["qa"]
    train, _, _ = make_datasets(hparams, text_ids, PromptDraws(1, train=True))
    assert list(_entries(train, ["response_ids"])) == ["100-1-0002"]


def test_the_speedrun_stage1_reads_every_row_as_transcription():
    with open(ROOT / "hparams" / "speedrun" / "train_stage1.yaml") as stream:
        hparams = load_hyperpyyaml(stream, {"data_folder": "unused"})
    assert hparams["tasks"] is None and hparams["transcripts_as_targets"] is True
