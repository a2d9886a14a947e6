"""src.corpus.merge: two corpora made apart (espeak-ng, and flite with speaker ids from 5000) become one corpus
that meets every promise of docs/corpus.md; a pack merges like its folder; a merge killed half-way is undone and
redone to the same result; bad pairs are refused before anything is written."""
import csv
import hashlib
import pathlib
import re
import shutil

import pytest

from duplex.script import load_script
from src.corpus import merge as corpus_merge
from src.corpus.__main__ import main as corpus_main
from src.corpus.pack import main as corpus_pack
from tests.test_corpus_build import TEXT_POOL, check_corpus, check_text_files, needs_engines

pytestmark = needs_engines


def make(out: pathlib.Path, engine: str, first_speaker: int, seed: int) -> pathlib.Path:
    corpus_main(["--out", str(out), "--utterances", "15", "--speakers", "4", "--seed", str(seed),
                 "--engines", engine, "--heldout", "none", "--first-speaker", str(first_speaker),
                 "--conversations", "1", "--text-root", "none", "--text-pool", str(TEXT_POOL)])
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return make(root / "base", "espeak", 1000, 5), make(root / "neural", "flite", 5000, 6)


def tree_digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def rows(path: pathlib.Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def fresh_copy(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def test_merged_corpus_is_one_corpus(pair, tmp_path):
    base, neural = pair
    into = fresh_copy(base, tmp_path)
    record = corpus_merge.merge(into, neural, log=lambda message: None)
    merged_rows = check_corpus(into)  # every audio file, speaker- and voice-disjoint splits, columns
    check_text_files(into, merged_rows)
    for manifest in corpus_merge.manifest_names(neural):
        assert rows(into / manifest) == rows(base / manifest) + rows(neural / manifest), manifest
    assert rows(into / "speakers.csv") == rows(base / "speakers.csv") + rows(neural / "speakers.csv")
    assert {r["engine"] for r in rows(into / "speakers.csv")} == {"espeak", "flite"}
    assert sorted(int(r["speaker"]) for r in rows(neural / "speakers.csv")) == [5000, 5001, 5002, 5003]
    assert record["status"] == "done" and record["speakers"] == 4
    assert record["rows"]["train.csv"] == len(rows(neural / "train.csv"))
    scripts = sorted((into / "conversations").glob("*.yaml"))
    assert [p.name for p in scripts] == ["conversation-000.yaml", "neural-conversation-000.yaml"]
    for script in scripts:  # every audio path of both scripts resolves (the added ones renamed with a prefix)
        audio = [event.path for event in load_script(script) if event.kind == "audio"]
        assert audio and all(pathlib.Path(script.parent, path).is_file() for path in audio), script
    assert "## Merged in: neural" in (into / "README.md").read_text()
    assert tree_digest(neural) == tree_digest(pair[1])  # a folder is copied, not taken
    before = tree_digest(into)
    corpus_merge.merge(into, neural, log=lambda message: None)  # again: nothing to do
    assert tree_digest(into) == before


def test_a_pack_merges_like_its_folder(pair, tmp_path):
    base, neural = pair
    from_folder = fresh_copy(base, tmp_path / "a")
    corpus_merge.merge(from_folder, neural, log=lambda message: None)
    archive = tmp_path / "neural.tar"
    corpus_pack(["pack", str(neural), str(archive), "--jobs", "2"])
    from_pack = fresh_copy(base, tmp_path / "b")
    corpus_merge.main([str(from_pack), str(archive)])
    assert not list(from_pack.glob(".incoming-*")) and not list(from_pack.glob(".premerge-*"))
    folder_files, pack_files = tree_digest(from_folder), tree_digest(from_pack)
    assert sorted(folder_files) == sorted(pack_files)
    for name in folder_files:  # manifests and text files equal; audio is an Opus copy
        if name.endswith(".csv") or name.endswith(".txt"):
            assert folder_files[name] == pack_files[name], name
    check_corpus(from_pack)


def test_a_merge_killed_half_way_is_undone_and_redone(pair, tmp_path, monkeypatch):
    base, neural = pair
    clean = fresh_copy(base, tmp_path / "clean")
    corpus_merge.merge(clean, neural, log=lambda message: None)
    into = fresh_copy(base, tmp_path / "killed")
    real_write = corpus_merge.write_csv
    written = []

    def dies_on_the_third(path, table, columns):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path)
        real_write(path, table, columns)

    monkeypatch.setattr(corpus_merge, "write_csv", dies_on_the_third)
    with pytest.raises(OSError, match="No space"):
        corpus_merge.merge(into, neural, log=lambda message: None)
    assert corpus_merge.Merge(into, "neural").record()["status"] == "started"
    assert rows(into / written[0].name) != rows(base / written[0].name)  # half-merged
    monkeypatch.setattr(corpus_merge, "write_csv", real_write)
    messages = []
    corpus_merge.merge(into, neural, log=messages.append)
    assert any("undoing the unfinished merge" in m for m in messages)
    assert tree_digest(into) == tree_digest(clean)


def test_bad_pairs_are_refused_before_any_write(pair, tmp_path):
    base, neural = pair
    into = fresh_copy(base, tmp_path / "into")
    before = tree_digest(into)
    same_ids = tmp_path / "same_ids"
    shutil.copytree(base, same_ids)
    with pytest.raises(corpus_merge.MergeError, match="--first-speaker 2000"):
        corpus_merge.merge(into, same_ids, log=lambda message: None)
    crossing = fresh_copy(neural, tmp_path / "crossing")
    table = rows(crossing / "speakers.csv")
    train_voice = next(r for r in rows(base / "speakers.csv") if r["split"] == "train")
    test_speaker = next(r for r in table if r["split"] == "test")
    test_speaker.update(engine=train_voice["engine"], voice=train_voice["voice"])
    corpus_merge.write_csv(crossing / "speakers.csv", table, list(table[0]))
    with pytest.raises(corpus_merge.MergeError, match=re.escape(f"voice {train_voice['engine']}:{train_voice['voice']}")):
        corpus_merge.merge(into, crossing, log=lambda message: None)
    with pytest.raises(corpus_merge.MergeError, match="no train.csv"):
        corpus_merge.merge(into, tmp_path, log=lambda message: None)
    with pytest.raises(corpus_merge.MergeError, match="not found"):
        corpus_merge.merge(into, tmp_path / "absent.tar", log=lambda message: None)
    corpus_pack(["pack", str(neural), str(tmp_path / "whole.tar")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "whole.tar").read_bytes()[:5000])  # a transfer that stopped early
    with pytest.raises(corpus_merge.MergeError, match="not a whole pack"):
        corpus_merge.merge(into, cut, log=lambda message: None)
    assert tree_digest(into) == before


def test_if_present_skips_a_pack_that_was_not_carried(pair, tmp_path, capsys):
    into = fresh_copy(pair[0], tmp_path)
    before = tree_digest(into)
    corpus_merge.main([str(into), str(tmp_path / "absent.tar"), "--if-present"])
    assert "not here" in capsys.readouterr().out
    assert tree_digest(into) == before
    with pytest.raises(SystemExit, match="not found"):
        corpus_merge.main([str(into), str(tmp_path / "absent.tar")])


def test_the_speedrun_step_merges_the_carried_pack(pair, tmp_path):
    """hparams/speedrun/h200.yaml's `neural` step, its templates filled as the driver fills them, merges
    CARRY/neural/neural.tar into OUT/work/corpus; without the pack it leaves the corpus as it is."""
    import subprocess
    import sys

    from src import speedrun
    config = speedrun.load_config(speedrun.REPO / "hparams" / "speedrun" / "h200.yaml")
    order = [s.name for s in config.steps]
    assert order.index("corpus-rest") < order.index("neural") < min(order.index("lm"), order.index("asr"))
    step = config.steps[order.index("neural")]
    run = speedrun.Run(tmp_path / "out", carry=tmp_path / "carry")
    shutil.copytree(pair[0], run.work / "corpus")
    values = speedrun.template_values(run, config, step, "cpu")
    command = [sys.executable, *(speedrun.fill(arg, values) for arg in step.run)]
    before = tree_digest(run.work / "corpus")
    subprocess.run(command, cwd=speedrun.REPO, check=True, capture_output=True)
    assert tree_digest(run.work / "corpus") == before
    corpus_pack(["pack", str(pair[1]), str(tmp_path / "carry" / "neural" / "neural.tar"), "--jobs", "2"])
    subprocess.run(command, cwd=speedrun.REPO, check=True, capture_output=True)
    assert corpus_merge.Merge(run.work / "corpus", "neural").record()["status"] == "done"
    check_corpus(run.work / "corpus")


def test_the_speedrun_corpus_steps_parse_and_leave_the_neural_engines_out(tmp_path):
    """Both corpus steps of h200.yaml are valid src.corpus command lines, use the same options (corpus-rest resumes
    corpus), and name only fast engines, so that no voice can be in both the corpus and the neural pack."""
    from src import speedrun
    from src.corpus.__main__ import parse_args
    config = speedrun.load_config(speedrun.REPO / "hparams" / "speedrun" / "h200.yaml")
    run = speedrun.Run(tmp_path / "out", carry=tmp_path / "carry")
    parsed = {}
    for step in (s for s in config.steps if s.run[:2] == ["-m", "src.corpus"]):
        values = speedrun.template_values(run, config, step, "cpu")
        parsed[step.name] = vars(parse_args([speedrun.fill(arg, values) for arg in step.run[2:]]))
    assert set(parsed) == {"corpus", "corpus-rest"}
    first, rest = parsed["corpus"], parsed["corpus-rest"]
    assert rest["resume"] and {k: v for k, v in rest.items() if k not in ("resume", "time_budget")} == \
        {k: v for k, v in first.items() if k not in ("resume", "time_budget")}
    assert set(first["engines"]).isdisjoint({"kokoro", "piper"}) and first["first_speaker"] < 5000
