"""Data preparation: LibriSpeech-format folders (real `*.trans.txt`, reference `*response.txt`) -> CSV manifests."""
import csv
import pathlib

import numpy as np
import pytest
import soundfile

from src.data_prep import CSV_COLUMNS, is_prepared, prepare_manifests


def write_audio(path, seconds, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.zeros(int(seconds * rate), dtype=np.float32), rate)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["ID"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def corpus(tmp_path):
    """A LibriSpeech-style train split plus a reference-style (`*response.txt`) one, FLAC and WAV mixed."""
    root = tmp_path / "data"
    chapter = root / "train-a" / "19" / "198"
    write_audio(chapter / "19-198-0000.flac", 1.0)
    write_audio(chapter / "19-198-0001.wav", 2.5, rate=8000)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 SNAKE_CASE STAYS\n")
    ref = root / "train-b" / "spk"
    write_audio(ref / "asr-7.flac", 1.2)
    write_audio(ref / "q1.flac", 1.5)
    write_audio(ref / "q2-cut.flac", 0.8)
    write_audio(ref / "q3-ignore.flac", 1.1)
    write_audio(ref / "orphan.flac", 0.5)  # audio without text: skipped
    (ref / "spk_response.txt").write_text(
        "asr-7 hello there\nq1 Paris is the capital.\nq2-cut Could you finish your question?\n"
        "q3-ignore I'll stay quiet.\n"
    )
    dev = root / "dev" / "1" / "2"
    write_audio(dev / "1-2-0000.flac", 9.0)  # filtered by max_duration
    write_audio(dev / "1-2-0001.flac", 1.0)
    (dev / "1-2.trans.txt").write_text("1-2-0000 TOO LONG\n1-2-0001 SHORT ONE\n")
    (dev / "1-2.response.txt").write_text("1-2-0001 A reply.\n")
    return root


def prepare(corpus, save, **extra):
    return prepare_manifests(save, data_folder=str(corpus), train_splits=["train-a", "train-b"],
                             dev_splits=["dev"], test_splits=["dev"], max_duration=5.0, **extra)


def test_librispeech_and_reference_conventions(corpus, tmp_path):
    paths = prepare(corpus, tmp_path / "save")
    assert set(paths) == {"train", "dev"}
    train = read_rows(paths["train"])
    assert list(next(iter(train.values())).keys()) == CSV_COLUMNS
    assert set(train) == {"19-198-0000", "19-198-0001", "asr-7", "q1", "q2-cut", "q3-ignore"}
    assert train["19-198-0000"]["task"] == "asr" and train["19-198-0000"]["response"] == "HELLO WORLD"
    assert train["19-198-0001"]["wrd"] == "SNAKE_CASE STAYS"  # no "_" corruption
    assert float(train["19-198-0001"]["duration"]) == pytest.approx(2.5)  # WAV at 8 kHz
    assert train["asr-7"]["task"] == "asr" and train["asr-7"]["state"] == "empty"
    assert (train["q1"]["task"], train["q1"]["state"]) == ("qa", "respond")
    assert train["q1"]["response"] == "Paris is the capital."
    assert (train["q2-cut"]["task"], train["q2-cut"]["state"]) == ("state", "incomplete")
    assert (train["q3-ignore"]["task"], train["q3-ignore"]["state"]) == ("state", "ignore")
    assert train["q1"]["wav"].endswith("q1.flac")


def test_duration_filter_and_trans_plus_response(corpus, tmp_path):
    dev = read_rows(prepare(corpus, tmp_path / "save")["dev"])
    assert set(dev) == {"1-2-0001"}
    row = dev["1-2-0001"]
    assert (row["wrd"], row["response"], row["task"]) == ("SHORT ONE", "A reply.", "qa")


def test_skip_if_done_and_redo_on_changed_options(corpus, tmp_path):
    save = tmp_path / "save"
    paths = prepare(corpus, save)
    options = dict(data_folder=str(corpus), train_splits=["train-a", "train-b"], dev_splits=["dev"],
                   test_splits=["dev"], max_duration=5.0)
    from src.data_prep import PrepOptions
    assert is_prepared(save, PrepOptions(**options))
    paths["train"].write_text("ID,duration,wav,wrd,task,state,response\n")  # would be rewritten if re-prepared
    prepare(corpus, save)
    assert read_rows(paths["train"]) == {}
    prepare(corpus, save, min_duration=1.15)  # changed option: prepared again
    assert set(read_rows(paths["train"])) == {"19-198-0001", "asr-7", "q1"}


def test_lowercase_transcripts_for_real_librispeech(corpus, tmp_path):
    train = read_rows(prepare(corpus, tmp_path / "save", lowercase_transcripts=True)["train"])
    assert train["19-198-0000"]["wrd"] == train["19-198-0000"]["response"] == "hello world"
    assert train["q1"]["response"] == "Paris is the capital."  # responses keep their case


def test_text_without_audio_is_a_clear_error(corpus, tmp_path):
    (corpus / "train-a" / "19" / "198" / "19-198.trans.txt").write_text("19-198-0000 HI\n19-198-0099 GONE\n")
    with pytest.raises(FileNotFoundError, match="19-198-0099"):
        prepare(corpus, tmp_path / "save")


def test_malformed_line_names_the_file(corpus, tmp_path):
    bad = corpus / "train-a" / "19" / "198" / "19-198.trans.txt"
    bad.write_text("19-198-0000\n")
    with pytest.raises(ValueError, match="19-198.trans.txt:1"):
        prepare(corpus, tmp_path / "save")


SAMPLE = pathlib.Path(__file__).resolve().parent / "data" / "corpus"


@pytest.mark.skipif(not (SAMPLE / "train.csv").is_file(), reason="committed sample corpus not present")
def test_folders_of_the_committed_sample_give_its_own_manifests(tmp_path):
    """Reading the corpus maker's folders reproduces the manifests it wrote (docs/corpus.md contract)."""
    paths = prepare_manifests(tmp_path, data_folder=str(SAMPLE), train_splits=["train"],
                              dev_splits=["valid"], test_splits=["test"])
    for split in ("train", "valid", "test"):
        ours, theirs = read_rows(paths[split]), read_rows(SAMPLE / f"{split}.csv")
        assert set(ours) == set(theirs)
        for utt_id, row in theirs.items():
            for column in ("wrd", "task", "state", "response"):
                assert ours[utt_id][column] == row[column], (utt_id, column)
            assert float(ours[utt_id]["duration"]) == pytest.approx(float(row["duration"]), abs=2e-3)
            assert pathlib.Path(ours[utt_id]["wav"]) == (SAMPLE / row["wav"]).resolve()


def test_manifest_reader_resolves_paths_and_filters_tasks():
    from src.stages import read_manifest
    dataset = read_manifest(SAMPLE / "train.csv", tasks=["asr", "qa"])
    with open(SAMPLE / "train.csv", newline="") as stream:
        expected = sum(row["task"] in ("asr", "qa") for row in csv.DictReader(stream))
    assert len(dataset) == expected < 5  # the state rows are left out
    with dataset.output_keys_as(["wav", "duration", "task"]):
        for item in dataset:
            assert pathlib.Path(item["wav"]).is_file() and isinstance(item["duration"], float)
            assert item["task"] in ("asr", "qa")


@pytest.mark.parametrize("content,complaint", [
    ("ID,duration,wav,task\nx,1.0,a.flac,asr\n", "missing column"),
    ("ID,duration,wav,wrd,task,state,response\nx,1.0,a.flac,hi,asr,maybe,hi\n", "has state 'maybe'"),
    ("ID,duration,wav,wrd,task,state,response\nx,1.0,a.flac,hi,asr,empty,hi\n", "no rows with task"),
    ("ID,duration,wav,wrd,task,state,response\nx,,a.flac,hi,asr,empty,hi\n", "has duration ''"),
    ("ID,duration,wav,wrd,task,state,response\n", "no rows"),
    ("", "missing column"),
])
def test_manifest_reader_errors_name_the_file(tmp_path, content, complaint):
    from src.stages import read_manifest
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=complaint) as error:
        read_manifest(path, tasks=["qa"] if "no rows" in complaint else None)
    assert "bad.csv" in str(error.value)


def test_manifest_reader_skips_clips_shorter_than_one_adapter_position(tmp_path):
    """The audio loader refuses them; skipping at start-up keeps them from stopping training mid-epoch."""
    from src.stages import read_manifest
    header = "ID,duration,wav,wrd,task,state,response\n"
    path = tmp_path / "short.csv"
    path.write_text(header + "short,0.15,a.flac,hi,asr,empty,hi\nlong,1.0,b.flac,hi,asr,empty,hi\n")
    dataset = read_manifest(path)
    with dataset.output_keys_as(["id"]):
        assert [item["id"] for item in dataset] == ["long"]
    path.write_text(header + "short,0.15,a.flac,hi,asr,empty,hi\n")
    with pytest.raises(ValueError, match="no rows"):
        read_manifest(path)
