"""scripts/whisper_check.py with a scripted stand-in for Whisper (faster-whisper is not a requirement): the
sample, the per-family grouping from speakers.csv and the WER arithmetic; bad inputs named."""
import collections
import csv
import json
import pathlib
from types import SimpleNamespace

import pytest

from scripts import whisper_check

SAMPLE = pathlib.Path(__file__).resolve().parent / "data" / "corpus"


class ScriptedWhisper:
    """Hears every transcript right, except that it drops the last word of each flite utterance; it is given the
    file's path where Whisper gets its samples (load_audio is replaced), and answers in segments, as Whisper does."""

    def __init__(self, manifest):
        with open(manifest, newline="", encoding="utf-8") as stream:
            self.by_wav = {(manifest.parent / row["wav"]).resolve(): row for row in csv.DictReader(stream)}
        with open(manifest.parent / "speakers.csv", newline="", encoding="utf-8") as stream:
            self.engine = {row["speaker"]: row["engine"] for row in csv.DictReader(stream)}

    def family(self, row):
        return self.engine[pathlib.PurePosixPath(row["wav"]).parts[1]]

    def transcribe(self, path, **options):
        row = self.by_wav[pathlib.Path(path).resolve()]
        words = row["wrd"].split()[:-1] if self.family(row) == "flite" else row["wrd"].split()
        half = len(words) // 2
        return [SimpleNamespace(text=" ".join(words[:half]).capitalize()),
                SimpleNamespace(text=" ".join(words[half:]) + ".")], None


def test_scores_per_voice_family(tmp_path, monkeypatch, capsys):
    manifest = SAMPLE / "train.csv"
    fake = ScriptedWhisper(manifest)
    monkeypatch.setattr(whisper_check, "whisper", lambda folder, threads: fake)
    monkeypatch.setattr(whisper_check, "load_audio", lambda path: SimpleNamespace(numpy=lambda: path))
    whisper_check.main([str(manifest), "--model", str(tmp_path), "--out", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    with open(manifest, newline="", encoding="utf-8") as stream:
        rows = [row for row in csv.DictReader(stream) if row["wrd"].strip()]
    words, utterances = collections.Counter(), collections.Counter()
    for row in rows:
        words[fake.family(row)] += len(row["wrd"].split())
        utterances[fake.family(row)] += 1
    assert scores["espeak"]["WER"] == 0.0 and scores["espeak"]["words"] == words["espeak"] > 0
    assert scores["flite"]["word_errors"] == utterances["flite"] > 0  # one deletion per flite utterance
    assert scores["all"]["utterances"] == len(rows)
    assert "| flite |" in capsys.readouterr().out


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,duration\nx,1.0\n")
    with pytest.raises(SystemExit, match="needs the columns wav and wrd"):
        whisper_check.sample_rows(bad, 10)
    with pytest.raises(SystemExit, match="no model.bin|not importable"):
        whisper_check.whisper(tmp_path, 1)
    assert len(whisper_check.sample_rows(SAMPLE / "train.csv", 2)) == 2
