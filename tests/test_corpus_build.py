"""End-to-end corpus generation with the real TTS engines (flite and espeak-ng, installed by scripts/install_tts.sh),
the training recipes' data preparation on the result, and checks of the committed sample corpus."""
import csv
import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf
import yaml

from duplex.script import load_script
from src.corpus.__main__ import main as corpus_main
from src.corpus.build import MANIFEST_COLUMNS
from src.corpus.engines import SAMPLE_RATE, find_engines
from src.corpus.normalize import is_normalised
from src.data_prep import prepare_manifests
from src.prompts import STATE_TOKENS

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "corpus"
ENGINES = ["flite", "espeak"]


def missing_tools() -> list[str]:
    found = find_engines(ENGINES, log=lambda message: None)
    return [name for name in ENGINES if name not in found] + ([] if shutil.which("sox") else ["sox"])


needs_engines = pytest.mark.skipif(bool(missing_tools()), reason=f"TTS tools missing: {missing_tools()} "
                                   "(run `bash scripts/install_tts.sh` as root)")


TEXT_POOL = ROOT / "tests" / "data" / "text_pool.txt"


def corpus_args(out: pathlib.Path, seed: int = 11, extra=()) -> list[str]:
    return ["--out", str(out), "--utterances", "20", "--speakers", "5", "--seed", str(seed),
            "--valid-fraction", "0.2", "--test-fraction", "0.2", "--engines", *ENGINES, "--conversations", "1",
            "--augment", "0.3", "--multiturn", "0.5", "--text-root", "none", "--text-pool", str(TEXT_POOL), *extra]


def make_corpus(out: pathlib.Path, seed: int = 11, extra=()) -> pathlib.Path:
    corpus_main(corpus_args(out, seed, extra))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "synth")


def read_rows(path: pathlib.Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def check_corpus(root: pathlib.Path) -> list[dict]:
    """Every property docs/corpus.md promises, checked on a corpus folder; returns all manifest rows."""
    rows = []
    for split in [s for s in ("train", "valid", "test", "test-engine") if (root / f"{s}.csv").is_file()]:
        split_rows = read_rows(root / f"{split}.csv")
        assert split_rows, f"{split} is empty"
        assert list(split_rows[0]) == list(MANIFEST_COLUMNS)
        for row in split_rows:
            path = root / row["wav"]
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16"), path
            assert abs(info.frames / info.samplerate - float(row["duration"])) < 1e-3, path
            assert pathlib.Path(row["wav"]).parts[:3] == (split, row["wav"].split("/")[1], path.parent.name)
            assert path.stem == row["ID"]
            assert is_normalised(row["wrd"]), row
            assert row["response"] and "_" not in row["response"]
            audio, _ = sf.read(path, dtype="float32")
            assert 0.05 < np.abs(audio).max() <= 1.0, path  # audible, not clipped away
            rows.append({**row, "split": split})
        for task in ("asr", "qa", "state"):
            assert read_rows(root / f"{split}-{task}.csv") == [r for r in split_rows if r["task"] == task]
    speakers = {}
    for row in rows:
        speaker = row["wav"].split("/")[1]
        assert speakers.setdefault(speaker, row["split"]) == row["split"], f"speaker {speaker} in two splits"
    listed = read_rows(root / "speakers.csv")
    assert {r["speaker"]: r["split"] for r in listed if r["speaker"] in speakers} == speakers
    voices = {}
    for r in listed:
        assert voices.setdefault((r["engine"], r["voice"]), r["split"]) == r["split"], f"voice {r} in two splits"
    return rows


def check_text_files(root: pathlib.Path, rows: list[dict]) -> None:
    """LibriSpeech text files agree with the manifests."""
    for row in rows:
        folder = (root / row["wav"]).parent
        stem = f"{folder.parent.name}-{folder.name}"
        lines = dict(line.split(" ", 1) for line in (folder / f"{stem}.trans.txt").read_text().splitlines())
        assert lines[row["ID"]] == row["wrd"]
        if row["task"] != "asr":
            lines = dict(line.split(" ", 1) for line in (folder / f"{stem}.response.txt").read_text().splitlines())
            assert lines[row["ID"]] == row["response"]


@needs_engines
def test_generated_corpus_meets_the_format(corpus):
    rows = check_corpus(corpus)
    check_text_files(corpus, rows)
    assert {(r["task"], r["state"]) for r in rows} == {("asr", "empty"), ("qa", "respond"),
                                                       ("state", "incomplete"), ("state", "ignore")}
    card = (corpus / "README.md").read_text()
    for needle in ("seed: 11", "flite", "espeak", f"utterances: {len(rows)}", "hours", "text_pool.txt"):
        assert needle in card


@needs_engines
def test_engine_disjoint_split_broad_vocabulary_and_multi_turn_rows(corpus):
    """test-engine holds the held-out family (auto: flite) and no other split has a flite voice; read rows say
    sentences of the text pool; questions carry their answer key; earlier turns point at that speaker's audio."""
    from src.corpus.normalize import transcript
    from src.corpus.pools import file_sentences
    rows = check_corpus(corpus)
    engine_of = {r["speaker"]: r["engine"] for r in read_rows(corpus / "speakers.csv")}
    by_split = {}
    for row in rows:
        by_split.setdefault(row["split"], set()).add(engine_of[row["wav"].split("/")[1]])
    assert by_split["test-engine"] == {"flite"}
    assert all("flite" not in engines for split, engines in by_split.items() if split != "test-engine")
    assert (corpus / "test-engine-asr.csv").is_file() and (corpus / "test-engine-qa.csv").is_file()
    check_conversations(corpus, "conversations-engine")  # scripts from the held-out family's audio
    for script in (corpus / "conversations-engine").glob("*.yaml"):
        assert "answer:" in script.read_text()
    pool = {transcript(s) for s in file_sentences(TEXT_POOL)}
    read = [r for r in rows if "-4-" in r["ID"]]
    assert read and all(r["ID"].startswith("asr-") and r["wrd"] in pool for r in read)
    assert all(r["answer"] and transcript(r["answer"]) in transcript(r["response"]) for r in rows if r["task"] == "qa")
    with_context = [r for r in rows if r["context"]]
    assert with_context
    for row in with_context:
        for turn in json.loads(row["context"]):
            assert (corpus / turn["wav"]).is_file() and turn["wav"].split("/")[:2] == row["wav"].split("/")[:2]
            assert turn["reply"]


@needs_engines
def test_interrupted_build_resumes_to_the_same_corpus(corpus, tmp_path):
    """A build stopped by its time budget exits 3 and writes no manifest; --resume finishes it (in one process,
    where the fixture used two) into the very same files; a resume with other options is refused; a finished
    corpus with files deleted is repaired by --resume."""
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as stopped:
        corpus_main(corpus_args(out, extra=("--jobs", "1", "--time-budget", "0.000001")))
    assert stopped.value.code == 3 and not (out / "train.csv").exists() and (out / "corpus_plan.json").is_file()
    with pytest.raises(SystemExit, match="other options"):
        corpus_main(corpus_args(out, seed=12, extra=("--resume",)))
    corpus_main(corpus_args(out, extra=("--jobs", "1", "--resume")))
    audio = sorted(p.relative_to(corpus) for p in corpus.rglob("*.flac"))
    assert audio == sorted(p.relative_to(out) for p in out.rglob("*.flac"))
    assert all((out / p).read_bytes() == (corpus / p).read_bytes() for p in audio)
    for name in ("train.csv", "test-engine.csv", "speakers.csv"):
        assert (out / name).read_bytes() == (corpus / name).read_bytes(), name
    deleted = [p for p in audio if p.parts[0] == "train"][:3]
    for path in deleted:
        (out / path).unlink()
    corpus_main(corpus_args(out, extra=("--resume",)))
    assert all((out / p).read_bytes() == (corpus / p).read_bytes() for p in deleted)


@needs_engines
def test_same_seed_same_corpus_other_seed_differs(corpus, tmp_path):
    again = make_corpus(tmp_path / "again")
    for name in ("train.csv", "valid.csv", "test.csv", "speakers.csv"):
        assert (again / name).read_bytes() == (corpus / name).read_bytes(), name
    first = read_rows(corpus / "train.csv")[0]
    assert (again / first["wav"]).read_bytes() == (corpus / first["wav"]).read_bytes()
    other = make_corpus(tmp_path / "other", seed=12)
    assert (other / "train.csv").read_bytes() != (corpus / "train.csv").read_bytes()


@needs_engines
def test_refuses_a_non_empty_output_folder(corpus):
    with pytest.raises(SystemExit, match="new or empty folder"):
        corpus_main(["--out", str(corpus), "--utterances", "3"])
    with pytest.raises(SystemExit, match="--resume needs a corpus folder"):
        corpus_main(["--out", str(corpus / "train"), "--utterances", "3", "--resume"])


def check_conversations(root: pathlib.Path, folder: str = "conversations") -> None:
    scripts = sorted((root / folder).glob("*.yaml"))
    assert scripts
    for script in scripts:
        load_script(script)  # the duplex player reads it (strictly: no unknown keys, valid state tokens)
        spec = yaml.safe_load(script.read_text())
        slice_len = int(spec["slice_seconds"] * SAMPLE_RATE)
        assert any("silence" in e for e in spec["events"])
        for event in spec["events"]:
            if "audio" in event:
                info = sf.info(script.parent / event["audio"])
                assert info.samplerate == SAMPLE_RATE and info.frames % slice_len == 0
                assert len(event["expect"]) == info.frames // slice_len
                assert set(event["expect"]) <= set(STATE_TOKENS)


@needs_engines
def test_conversation_scripts(corpus):
    check_conversations(corpus)


def recipe_data_prep(stage: int) -> dict:
    """The `data_prep:` block of a training recipe YAML (tags such as !ref are not resolved; paths are replaced)."""
    loader = type("IgnoreTags", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda loader_, suffix, node: None)
    text = (ROOT / "hparams" / "tiny" / f"train_stage{stage}.yaml").read_text()
    return yaml.load(text, Loader=loader)["data_prep"]


@pytest.mark.parametrize("which", ["committed sample", "freshly generated"])
@pytest.mark.parametrize("stage", [1, 3])
def test_training_data_prep_accepts_the_corpus(stage, which, tmp_path, request):
    """The stage-1 and stage-3 recipes' preparation reads our folders back into the same rows we wrote."""
    if which == "committed sample":
        root = SAMPLE
    elif missing_tools():
        pytest.skip(f"TTS tools missing: {missing_tools()} (run `bash scripts/install_tts.sh` as root)")
    else:
        root = request.getfixturevalue("corpus")
    options = {**recipe_data_prep(stage), "data_folder": str(root)}
    options.pop("save_folder")
    paths = prepare_manifests(tmp_path / "manifests", **options)
    for split in ("train", "valid", "test"):
        ours = {r["ID"]: r for r in read_rows(root / f"{split}.csv")}
        theirs = {r["ID"]: r for r in read_rows(paths[split])}
        assert set(theirs) == set(ours), split
        for utt_id, row in theirs.items():
            for column in ("task", "state", "wrd", "response"):
                assert row[column] == ours[utt_id][column], (utt_id, column)
            assert float(row["duration"]) == pytest.approx(float(ours[utt_id]["duration"]), abs=1e-3)
            assert pathlib.Path(row["wav"]).resolve() == (root / ours[utt_id]["wav"]).resolve()


def test_committed_sample_corpus():
    rows = check_corpus(SAMPLE)
    check_text_files(SAMPLE, rows)
    check_conversations(SAMPLE)
    for split in ("train", "valid", "test"):
        assert {r["state"] for r in rows if r["split"] == split} == {"empty", "respond", "incomplete", "ignore"}
    assert any("-4-" in r["ID"] for r in rows) and any(r["context"] for r in rows)  # read and multi-turn rows
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert size < 1_000_000, f"committed sample grew to {size} bytes"


@pytest.mark.parametrize("engine_name", ["flite", "espeak", "festival", "piper"])
def test_each_installed_engine_speaks_every_voice_deterministically(engine_name):
    engine = find_engines([engine_name], log=lambda message: None).get(engine_name)
    if engine is None or not shutil.which("sox"):
        pytest.skip(f"{engine_name} or sox not installed (bash scripts/install_tts.sh --all)")
    from src.corpus.engines import Speaker
    for voice in engine.voices():
        normal = engine.synthesize("What is two plus two?", Speaker(1, engine_name, voice, 1.0, 0.0))
        assert normal.dtype == np.float32 and normal.ndim == 1
        assert 0.5 < len(normal) / SAMPLE_RATE < 5 and np.abs(normal).max() > 0.05, voice
        assert np.array_equal(normal, engine.synthesize("What is two plus two?",
                                                        Speaker(1, engine_name, voice, 1.0, 0.0))), voice
        fast = engine.synthesize("What is two plus two?", Speaker(1, engine_name, voice, 1.3, 0.0))
        assert len(fast) < len(normal), voice
        higher = engine.synthesize("What is two plus two?", Speaker(1, engine_name, voice, 1.0, 2.0))
        assert not np.array_equal(higher[:len(normal)], normal[:len(higher)]), voice


@needs_engines
@pytest.mark.skipif(not pathlib.Path("/usr/share/games/bsdgames/quiz/africa").is_file(),
                    reason="bsdgames quiz files missing: the sample's QA texts came from them")
def test_committed_sample_is_remade_by_its_recorded_command(tmp_path):
    """The data card's command regenerates the same utterances and texts (durations may move with engine versions)."""
    card = (SAMPLE / "README.md").read_text()
    command = card.split("- command: `", 1)[1].split("`", 1)[0].split()
    args = command[3:]  # after "python -m src.corpus"
    args[args.index("--out") + 1] = str(tmp_path / "again")
    corpus_main(args)
    for split in ("train", "valid", "test"):
        columns = ("ID", "wav", "wrd", "task", "state", "response", "answer", "context")
        ours = [{k: r[k] for k in columns} for r in read_rows(SAMPLE / f"{split}.csv")]
        again = [{k: r[k] for k in columns} for r in read_rows(tmp_path / "again" / f"{split}.csv")]
        assert again == ours, split


def test_sample_conversation_plays_in_the_duplex_script_reader():
    """Our scripts are read by duplex/script.py and every speech slice gets exactly our expectation."""
    from duplex.script import script_slices
    for path in sorted((SAMPLE / "conversations").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        slices = script_slices(load_script(path), spec["slice_seconds"])
        speech = [s for s in slices if s.wav is not None]
        expected = [token for event in spec["events"] if "audio" in event for token in event["expect"]]
        assert [s.expect for s in speech] == expected
        assert all(s.wav.numel() == int(spec["slice_seconds"] * SAMPLE_RATE) for s in speech)
        silent = sum(round(e["silence"] / spec["slice_seconds"]) for e in spec["events"] if "silence" in e)
        assert len(slices) - len(speech) == silent


@needs_engines
def test_wav_output_and_a_single_engine(tmp_path):
    out = tmp_path / "wav"
    corpus_main(["--out", str(out), "--utterances", "6", "--speakers", "3", "--engines", "espeak",
                 "--valid-fraction", "0.2", "--test-fraction", "0.2", "--audio-format", "wav", "--conversations", "0",
                 "--heldout", "none"])
    rows = check_corpus(out)
    assert all(r["wav"].endswith(".wav") for r in rows)
    assert {r["ID"] for r in rows} == {p.stem for p in out.rglob("*.wav")}
    assert not (out / "conversations").exists()
    assert {r["engine"] for r in read_rows(out / "speakers.csv")} == {"espeak"}
