"""Stage 1 -> 2 -> 3 -> 4 on the committed sample corpus (tests/data/corpus, 4 utterances per split) with the
tiny YAMLs on CPU, then inference on the result with CustomGenerator.py and the duplex engine: the commands of
docs/training.md's "Tiny chain", run exactly as written there."""
import csv
import pathlib

import pytest
import torch

from modules.checkpoint import EMBEDDING_KEY, find_checkpoints, read_model_state
from tests.doc_commands import checkout_view, documented_commands, run_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "corpus"
pytestmark = pytest.mark.slow  # five short epochs: about a minute on 2 cores


def normalizer_stats(folder):
    newest = find_checkpoints(folder)[-1]
    return torch.load(newest / "normalizer.ckpt", weights_only=False)


DOCUMENTED = documented_commands("docs/training.md", "tests/test_training_chain.py runs")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run the documented commands once for every test of this module: four stages, then the two inferences."""
    view = tmp_path_factory.mktemp("chain")
    with checkout_view(view):
        results = [run_command(tokens) for tokens in DOCUMENTED]
    brains = {stage: results[stage - 1] for stage in (1, 2, 3, 4)}
    return view / "results" / "tiny-chain", brains, results[4:]


def test_the_documented_chain_is_four_stages_then_two_inferences():
    scripts = [tokens[1] for tokens in DOCUMENTED]
    assert scripts == ["train_stage1.py", "train_stage2.py", "train_stage3.py", "train_stage4.py",
                       "CustomGenerator.py", "duplex_inference.py"]


def test_every_stage_saves_checkpoints(chain):
    out, _, _ = chain
    for stage in (1, 2, 3, 4):
        folders = find_checkpoints(out / f"stage{stage}" / "save")
        assert len(folders) == (2 if stage == 1 else 1), f"stage {stage}: one checkpoint per epoch expected"
        assert all((f / "normalizer.ckpt").is_file() for f in folders)


def test_vocabulary_grows_at_stage_3(chain):
    """Row counts only; that the old rows are the stage-2 average is tests/test_training_handoff.py."""
    out, _, _ = chain
    rows = {stage: read_model_state(out / f"stage{stage}" / "save")[EMBEDDING_KEY].shape[0] for stage in (1, 2, 3, 4)}
    assert rows == {1: 50278, 2: 50278, 3: 50280, 4: 50280}


def test_frozen_parts_do_not_move(chain):
    """Stage 2 trains adapter + LM only: its CNN/ConMamba weights equal stage 1's average; stage 4 leaves the LM."""
    out, _, _ = chain
    s1, s2 = (read_model_state(out / f"stage{k}" / "save") for k in (1, 2))
    s3, s4 = (read_model_state(out / f"stage{k}" / "save") for k in (3, 4))
    for key in s1:
        if key.startswith(("0.", "1.")):
            assert torch.equal(s1[key], s2[key]), key
        if key.startswith("2."):
            assert not torch.equal(s1[key], s2[key]), f"{key} should have been trained in stage 2"
    lm_keys = [key for key in s3 if key.startswith("3.")]
    assert lm_keys and all(torch.equal(s3[key], s4[key]) for key in lm_keys)
    assert any(not torch.equal(s3[key], s4[key]) for key in s3 if key.startswith("1."))


def test_normalizer_statistics_travel_to_later_stages(chain):
    """Stage 1 estimates the statistics; stages 2-4 (normaliser frozen) carry exactly those."""
    out, _, _ = chain
    first = normalizer_stats(out / "stage1" / "save")
    assert first["count"] > 0
    for stage in (2, 3, 4):
        stats = normalizer_stats(out / f"stage{stage}" / "save")
        assert stats["count"] == first["count"]
        assert torch.equal(stats["glob_mean"], first["glob_mean"])


def test_test_metrics_per_stage(chain):
    """Every stage scores greedy ASR transcripts (WER); stages 3-4 also the state token."""
    _, brains, _ = chain
    assert "STATE_ACC" not in brains[2].last_stage_stats
    assert 0.0 <= brains[4].last_stage_stats["STATE_ACC"] <= 1.0
    assert all(brains[stage].last_stage_stats["WER"] >= 0.0 for stage in (1, 2, 3, 4))
    with open(SAMPLE / "test.csv", newline="") as handle:
        asr_ids = sorted(row["ID"] for row in csv.DictReader(handle) if row["task"] == "asr")
    for stage in (1, 2, 3, 4):  # one greedy transcript per ASR row, none for QA/state rows
        assert sorted(score["key"] for score in brains[stage].wer_stats.scores) == asr_ids, stage


def test_documented_inference_commands_succeed(chain):
    out, _, exit_codes = chain
    assert exit_codes == [0, 0]
    assert '"type": "conversation"' in (out / "timeline.jsonl").read_text()


def test_final_checkpoint_loads_into_custom_generator(chain, capsys):
    CustomGenerator = pytest.importorskip("CustomGenerator")
    out, _, _ = chain
    wav = next((SAMPLE / "test").rglob("*.flac"))
    code = CustomGenerator.main([str(ROOT / "duplex" / "duplex_tiny.yaml"), "--wav_path", str(wav),
                                 "--checkpoint", str(out / "stage4" / "save"), "--device", "cpu"])
    assert code == 0
    assert "state token: <|" in capsys.readouterr().out


def test_inference_uses_the_statistics_estimated_in_stage_1(chain):
    from modules.model import load_inference_network
    out, _, _ = chain
    net = load_inference_network(ROOT / "duplex" / "duplex_tiny.yaml", checkpoint=out / "stage4" / "save",
                                 device="cpu")["net"]
    first = normalizer_stats(out / "stage1" / "save")
    assert torch.equal(net["normalizer"].glob_mean.cpu(), first["glob_mean"])
    assert torch.equal(net["normalizer"].glob_std.cpu(), first["glob_std"])


def test_each_stage_writes_its_test_transcripts(chain):
    """The greedy transcripts behind each stage's test WER are written beside its log, one entry per ASR row."""
    out, _, _ = chain
    for stage in (1, 2, 3, 4):
        text = (out / f"stage{stage}" / "wer_test.txt").read_text()
        assert text.startswith("%WER") and "asr-" in text
