"""Every manifest row checked before the first step (issue #17): bad audio, unknown task values, stale manifests.

Before: a missing, empty, corrupt or too-short file crashed training mid-epoch (the partial epoch lost), an
unknown task (`QA`) dropped its rows silently, and prepared manifests ignored added or deleted audio."""
import csv
import os
import pathlib
import re

import numpy as np
import pytest
import soundfile

from src import manifest_check
from src.data_prep import prepare_manifests
from src.manifest_check import ManifestError, check_manifests, checked_manifests
from tests.training_corpus import SAMPLE_RATE, tone, write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


def prepare(corpus, save):
    return prepare_manifests(save, data_folder=str(corpus), train_splits=["train"], dev_splits=["valid"],
                             test_splits=["test"])


def rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(path, new_rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(new_rows[0]))
        writer.writeheader()
        writer.writerows(new_rows)


@pytest.fixture
def damaged(tmp_path):
    """Prepared manifests of the 5-utterance corpus, then one problem per train row and two in valid."""
    corpus = write_corpus(tmp_path / "corpus")
    paths = prepare(corpus, tmp_path / "manifests")
    train = rows(paths["train"])
    wav = {row["ID"]: pathlib.Path(row["wav"]) for row in train}
    wav["asr-100-0-0000"].write_bytes(b"")  # 0 bytes
    data = wav["asr-100-0-0001"].read_bytes()
    wav["asr-100-0-0001"].write_bytes(data[: len(data) // 2])  # truncated FLAC
    wav["100-1-0002"].unlink()  # missing
    soundfile.write(str(wav["100-3-0003-cut"]), tone(3, 0.1), SAMPLE_RATE)  # now shorter than the CSV says
    next(row for row in train if row["ID"] == "100-4-0004-ignore")["task"] = "QA"  # unknown task (was dropped)
    write_rows(paths["train"], train)
    valid = rows(paths["valid"])
    valid[0]["response"] = "   "  # line 2: empty target text
    soundfile.write(str(pathlib.Path(valid[1]["wav"])), np.zeros((16000, 3), np.float32), 16000)  # 3 channels
    valid[1]["duration"] = "1.000"
    write_rows(paths["valid"], valid)
    return paths


def test_every_problem_is_reported_at_once_with_file_line_and_fix(damaged, tmp_path):
    csvs = [damaged["train"], damaged["valid"], damaged["test"]]
    with pytest.raises(ManifestError) as error:
        checked_manifests(csvs, tasks=["asr", "qa", "state"], cache_file=tmp_path / "cache.json")
    found = {(p.csv.name, p.utt_id): p.what for p in error.value.problems}
    valid_ids = [row["ID"] for row in rows(damaged["valid"])]
    assert set(found) == {("train.csv", "asr-100-0-0000"), ("train.csv", "asr-100-0-0001"),
                          ("train.csv", "100-1-0002"), ("train.csv", "100-3-0003-cut"),
                          ("train.csv", "100-4-0004-ignore"), ("valid.csv", valid_ids[0]),
                          ("valid.csv", valid_ids[1])}
    assert "is empty (0 bytes)" in found["train.csv", "asr-100-0-0000"]
    assert "cannot be decoded" in found["train.csv", "asr-100-0-0001"]
    assert "not found" in found["train.csv", "100-1-0002"]
    assert re.search(r"the manifest says 1\.\d+ s but .* holds 0\.100 s", found["train.csv", "100-3-0003-cut"])
    assert "has task 'QA'; expected one of ['asr', 'qa', 'state']" in found["train.csv", "100-4-0004-ignore"]
    assert "which is not text" in found["valid.csv", valid_ids[0]]
    assert "has 3 channels" in found["valid.csv", valid_ids[1]]
    message = str(error.value)
    line = 2 + [row["ID"] for row in rows(damaged["train"])].index("asr-100-0-0000")  # the header is line 1
    assert f"{damaged['train']}:{line} (asr-100-0-0000):" in message
    assert message.count("Fix:") == 7 and "--skip_bad_rows" in message


def test_skip_bad_rows_leaves_them_out_with_one_counted_warning(damaged, tmp_path, caplog):
    csvs = [damaged["train"], damaged["valid"]]
    with caplog.at_level("WARNING"):
        excluded = checked_manifests(csvs, cache_file=tmp_path / "cache.json", skip_bad_rows=True)
    assert excluded == {str(damaged["train"]): {2, 3, 4, 5, 6}, str(damaged["valid"]): {2, 3}}  # CSV lines
    assert "leaving out 7 row(s) with 7 problem(s)" in caplog.text


def test_rows_of_tasks_the_stage_does_not_use_are_not_decoded(damaged, tmp_path):
    """Stage 1 reads ASR rows only: the QA/state rows' audio is not its concern (their text still is)."""
    problems = check_manifests([damaged["train"]], tasks=["qa"], cache_file=tmp_path / "cache.json")
    assert {p.utt_id for p in problems} == {"100-1-0002", "100-4-0004-ignore"}  # the QA row's audio; task 'QA'


def test_audio_verdicts_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", splits=("train",))
    paths = prepare_manifests(tmp_path / "m", data_folder=str(corpus), train_splits=["train"])
    probed = []
    real_probe = manifest_check.probe_audio
    monkeypatch.setattr(manifest_check, "probe_audio", lambda path: probed.append(path) or real_probe(path))
    cache = tmp_path / "cache.json"
    assert check_manifests([paths["train"]], cache_file=cache) == []
    assert len(probed) == 5
    probed.clear()
    assert check_manifests([paths["train"]], cache_file=cache) == []
    assert probed == []  # nothing decoded again
    changed = pathlib.Path(rows(paths["train"])[0]["wav"])
    soundfile.write(str(changed), tone(0, 2.0), SAMPLE_RATE)
    problems = check_manifests([paths["train"]], cache_file=cache)
    assert probed == [str(changed)] and [p.line for p in problems] == [2]  # only the re-written file, now 2 s


def test_manifests_are_prepared_again_when_audio_files_change(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    paths = prepare(corpus, tmp_path / "manifests")
    first = {row["ID"] for row in rows(paths["train"])}
    extra = corpus / "train" / "100" / "0" / "asr-100-0-0099.flac"
    soundfile.write(str(extra), tone(9, 1.0), SAMPLE_RATE)
    with open(corpus / "train" / "100" / "0" / "100-0.trans.txt", "a") as handle:
        handle.write("asr-100-0-0099 one more\n")
    prepare(corpus, tmp_path / "manifests")
    assert {row["ID"] for row in rows(paths["train"])} == first | {"asr-100-0-0099"}
    extra.unlink()
    (corpus / "train" / "100" / "0" / "100-0.trans.txt").write_text(
        "asr-100-0-0000 the cat sat\nasr-100-0-0001 a dog ran far\n")
    prepare(corpus, tmp_path / "manifests")
    assert {row["ID"] for row in rows(paths["train"])} == first


def test_data_preparation_names_an_empty_flac_for_what_it_is(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    empty = corpus / "train" / "100" / "1" / "100-1-0002.flac"
    empty.write_bytes(b"")
    broken = corpus / "train" / "100" / "0" / "asr-100-0-0000.flac"
    broken.write_bytes(b"not audio at all")
    with pytest.raises(ValueError) as error:
        prepare(corpus, tmp_path / "manifests")
    message = str(error.value)
    assert "2 audio file(s) cannot be used" in message  # both at once
    assert f"{empty}: the audio file is empty (0 bytes)" in message
    assert f"{broken}: cannot read the audio header" in message and "damaged or not audio" in message
    assert "Use FLAC or WAV files" not in message


def test_corpus_maker_manifests_with_relative_paths_pass(tmp_path):
    sample = ROOT / "tests" / "data" / "corpus"
    csvs = [sample / "train.csv", sample / "valid.csv", sample / "test.csv"]
    assert check_manifests(csvs, cache_file=tmp_path / "cache.json") == []
    assert os.path.getsize(tmp_path / "cache.json") > 0


@pytest.mark.slow
def test_a_stage_on_bad_manifests_stops_before_the_first_step_or_skips_with_the_flag(tmp_path):
    """`data_prep: null` with manifests read directly (as docs/training.md describes): one empty FLAC."""
    from src.brain import DuplexBrain
    from src.stages import run_stage
    corpus = write_corpus(tmp_path / "corpus")
    paths = prepare(corpus, tmp_path / "manifests")
    pathlib.Path(rows(paths["train"])[0]["wav"]).write_bytes(b"")
    argv = [str(ROOT / "hparams" / "tiny" / "train_stage2.yaml"), f"--data_folder={corpus}",
            f"--output_folder={tmp_path / 'out'}", "--device=cpu", "--noprogressbar", "--number_of_epochs=1",
            "--init_from={folder: null}", "--test_max_new_tokens=0", "--data_prep=null",
            f"--train_csv={paths['train']}", f"--valid_csv={paths['valid']}", f"--test_csvs=[{paths['test']}]"]
    with pytest.raises(ManifestError, match="is empty"):
        run_stage(DuplexBrain, argv)
    assert not (tmp_path / "out" / "save").exists() or not list((tmp_path / "out" / "save").iterdir())
    brain = run_stage(DuplexBrain, [*argv, "--skip_bad_rows"])
    assert brain.optimizer_step == 1  # 3 asr/qa rows, one left out, batch size 2: one step


def test_earlier_turns_of_a_multi_turn_row_are_checked_too(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", splits=("train",))
    paths = prepare_manifests(tmp_path / "m", data_folder=str(corpus), train_splits=["train"])
    train = rows(paths["train"])
    for row in train:
        row["context"] = ""
    train[0]["context"] = '[{"wav": "gone.flac", "reply": "Hello."}]'
    train[1]["context"] = "not json"
    write_rows(paths["train"], train)
    problems = check_manifests([paths["train"]], cache_file=tmp_path / "cache.json")
    assert [(p.line, p.what.split(":")[0]) for p in problems] == [(2, "context turn"), (3, "has context 'not json', "
                                                                                           "not a JSON list of {\"wav\"")]
    assert "gone.flac not found" in problems[0].what
