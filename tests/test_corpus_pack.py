"""src/corpus/pack.py on the committed sample corpus: pack -> unpack gives the same files under the same
names (manifests byte-identical, audio a close Opus copy of the same length), and bad inputs are refused;
scripts/demo_manifests.py's two question selections."""
import csv
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
import soundfile

from src.corpus.pack import main as corpus_pack
from scripts.demo_manifests import main as demo_manifests, qa_kind

CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "corpus"


def relative_files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_pack_unpack_round_trip(tmp_path):
    archive = tmp_path / "corpus.tar"
    corpus_pack(["pack", str(CORPUS), str(archive), "--jobs", "2"])
    corpus_pack(["unpack", str(archive), str(tmp_path / "copy"), "--jobs", "2"])
    copy = tmp_path / "copy"
    assert relative_files(copy) == relative_files(CORPUS)
    audio = [name for name in relative_files(CORPUS) if name.endswith((".flac", ".wav"))]
    assert audio
    for name in relative_files(CORPUS):
        if name not in audio:
            assert (copy / name).read_bytes() == (CORPUS / name).read_bytes(), name
    for name in audio:
        original, rate = soundfile.read(CORPUS / name, dtype="float32")
        decoded, decoded_rate = soundfile.read(copy / name, dtype="float32")
        assert decoded_rate == rate == 16000 and decoded.shape == original.shape, name
        correlation = np.corrcoef(original, decoded)[0, 1]
        assert correlation > 0.9, (name, correlation)  # lossy, but the same speech


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        corpus_pack(["pack", str(tmp_path), str(tmp_path / "a.tar")])
    odd_rate = tmp_path / "odd"
    shutil.copytree(CORPUS, odd_rate)
    first_audio = sorted(odd_rate.rglob("*.flac"))[0]
    soundfile.write(first_audio, np.zeros(8000, dtype="float32"), 8000)
    with pytest.raises(ValueError, match="8000 Hz"):
        corpus_pack(["pack", str(odd_rate), str(tmp_path / "b.tar")])
    archive = tmp_path / "c.tar"
    corpus_pack(["pack", str(CORPUS), str(archive)])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        corpus_pack(["unpack", str(archive), str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    whole = archive.read_bytes()
    with tarfile.open(archive) as packed:
        last_member_at = packed.getmembers()[-1].offset
    for cut_at in (len(whole) // 3, last_member_at):  # transfers that stopped early (the second: only the end lost)
        cut = tmp_path / f"cut-{cut_at}.tar"
        cut.write_bytes(whole[:cut_at])
        with pytest.raises(ValueError, match="not a whole pack"):
            corpus_pack(["unpack", str(cut), str(tmp_path / f"from-{cut_at}")])


def read_states(path):
    with open(path, newline="") as stream:
        return [(row["task"], row["state"]) for row in csv.DictReader(stream)]


def test_demo_manifests_question_selection(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    demo_manifests([str(corpus)])
    learnable = read_states(corpus / "demo-qa-state-train.csv")
    demo_manifests([str(corpus), "--questions", "all"])
    every = read_states(corpus / "demo-qa-state-train.csv")
    with open(corpus / "train.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    questions = sum(row["task"] == "qa" for row in rows)
    others = sum(row["task"] == "state" for row in rows)
    assert sum(task == "qa" for task, _ in every) == questions
    assert sum(task == "state" for task, _ in every) == sum(task == "state" for task, _ in learnable) == others
    learnable_questions = sum(row["task"] == "qa" and qa_kind(row["wrd"]) is not None for row in rows)
    assert sum(task == "qa" for task, _ in learnable) == learnable_questions < questions  # the sample's one
    # question (a chemical symbol) is not a learnable kind
