"""Stage hand-off (`init_from`): stage 1 from a ConMamba ASR checkpoint, non-strict, encoder keys only; stage 3
from the stage-2 average with the vocabulary grown; a wrong previous-stage folder is a clear error."""
import pytest
import torch

from modules.checkpoint import EMBEDDING_KEY, LM_HEAD_KEY, CheckpointMismatchError, save_reference_checkpoint
from modules.model import TINY_YAML, load_model_hparams
from src.handoff import load_previous_stage


def tiny(seed):
    return load_model_hparams(TINY_YAML, {"seed": seed, "num_state_tokens": 1})


def write_asr_checkpoint(folder, donor):
    """A Mamba-ASR-like model.ckpt: CNN + encoder keys, plus decoder / seq_lin / ctc_lin keys that must be ignored
    (their indices 2 and 3 collide with our adapter and LM) and the unused positional buffers."""
    state = {k: v for k, v in donor["model"].state_dict().items() if k.startswith(("0.", "1."))}
    state.update({"1.decoder.layers.0.w.weight": torch.ones(3, 3), "2.w.weight": torch.ones(7, 64),
                  "3.w.weight": torch.ones(5000, 64), "1.positional_encoding.inv_freq": torch.ones(32)})
    ckpt = folder / "CKPT+2024-01-01+00-00-00+00"
    ckpt.mkdir(parents=True)
    torch.save(state, ckpt / "model.ckpt")


def test_stage1_takes_encoder_keys_only(tmp_path):
    donor, model = tiny(1), tiny(2)
    write_asr_checkpoint(tmp_path / "asr", donor)
    before = {k: v.clone() for k, v in model["model"].state_dict().items()}
    init_from = {"folder": str(tmp_path / "asr"), "prefixes": ["0.", "1.custom_src_module.", "1.encoder."],
                 "load_normalizer": False}
    load_previous_stage(init_from, model["model"], model["normalizer"])
    after, source = model["model"].state_dict(), donor["model"].state_dict()
    for key, value in after.items():
        if key.startswith(("0.", "1.")):
            assert torch.equal(value, source[key]), key
        else:  # adapter and LM untouched
            assert torch.equal(value, before[key]), key
    assert any(not torch.equal(before[k], source[k]) for k in after if k.startswith("1."))
    assert model["normalizer"].count == 0  # statistics re-estimated in stage 1


def stage2_checkpoints(save, count=2):
    """`count` stage-2 checkpoints (1 state token) with different weights and normaliser statistics."""
    models = [load_model_hparams(TINY_YAML, {"seed": 10 + k, "num_state_tokens": 1}) for k in range(count)]
    for k, parts in enumerate(models):
        normalizer = parts["normalizer"]
        normalizer.count, normalizer.glob_mean, normalizer.glob_std = 5 + k, torch.full((80,), float(k)), torch.ones(80)
        save_reference_checkpoint(parts["model"], save, normalizer=normalizer)
    return [parts["model"].state_dict() for parts in models]


def test_stage3_starts_from_the_average_with_two_new_tied_rows(tmp_path):
    states = stage2_checkpoints(tmp_path / "save")
    stage3 = load_model_hparams(TINY_YAML, {"seed": 3, "num_state_tokens": 3})
    folders = load_previous_stage({"folder": str(tmp_path / "save"), "grow_vocabulary": True},
                                  stage3["model"], stage3["normalizer"])
    assert len(folders) == 2
    loaded = stage3["model"].state_dict()
    for key, first in states[0].items():
        average = (first + states[1][key]) / 2 if first.is_floating_point() else first
        if key in (EMBEDDING_KEY, LM_HEAD_KEY):
            assert torch.allclose(loaded[key][:50278], average), key  # old rows: the average
            assert loaded[key].shape[0] == 50280
        else:
            assert torch.allclose(loaded[key], average), key
    lm = stage3["model"].lm.model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # still one matrix: new rows drawn once
    new_rows = loaded[EMBEDDING_KEY][50278:]  # (2, H)
    assert not torch.equal(new_rows[0], new_rows[1]) and 0 < new_rows.std() < 0.05
    assert stage3["normalizer"].count == 6 and torch.equal(stage3["normalizer"].glob_mean, torch.ones(80))  # newest


def test_stage2_given_a_stage3_folder_says_which_configuration_fits(tmp_path):
    stage3 = load_model_hparams(TINY_YAML, {"seed": 3, "num_state_tokens": 3})
    save_reference_checkpoint(stage3["model"], tmp_path / "save", normalizer=stage3["normalizer"])
    stage2 = tiny(4)
    with pytest.raises(CheckpointMismatchError, match="stage-3/4 checkpoint"):
        load_previous_stage({"folder": str(tmp_path / "save")}, stage2["model"], stage2["normalizer"])


# ---- stage records: the next stage and a reused output folder are checked (issue #17) --------------------------
import pathlib  # noqa: E402

import yaml  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402

from src.handoff import HandoffError, check_handoff, stage_record  # noqa: E402
from tests.training_corpus import write_corpus  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def stage_hparams(stage, tmp_path, overrides=""):
    text = f"data_folder: {tmp_path}\noutput_folder: {tmp_path / f'out{stage}'}\n{overrides}"
    if stage > 1:
        text += f"previous_output_folder: {tmp_path / 'previous'}\n"
    with open(ROOT / "hparams" / "tiny" / f"train_stage{stage}.yaml") as handle:
        return load_hyperpyyaml(handle, text)


def fake_manifest(tmp_path, text="ID,duration,wav,wrd,task,state,response\n"):
    path = tmp_path / "train.csv"
    path.write_text(text)
    return [path]


def record_for(stage, tmp_path, overrides=""):
    hparams = stage_hparams(stage, tmp_path, overrides)
    record = stage_record(hparams, ROOT / "hparams" / "tiny" / f"train_stage{stage}.yaml", overrides or None,
                          fake_manifest(tmp_path))
    return hparams, record


def write_record_checkpoint(save_folder, record):
    """A checkpoint folder holding only what check_handoff reads: CKPT.yaml and stage_record.ckpt."""
    folder = pathlib.Path(save_folder) / "CKPT+2026-01-01+00-00-00+00"
    folder.mkdir(parents=True)
    (folder / "CKPT.yaml").write_text("end-of-epoch: true\nunixtime: 0\n")
    (folder / "stage_record.ckpt").write_text(yaml.safe_dump(record))


def test_stage3_refuses_a_stage1_folder_unless_forced(tmp_path):
    _, stage1 = record_for(1, tmp_path)
    write_record_checkpoint(tmp_path / "previous" / "save", stage1)
    hparams, stage3 = record_for(3, tmp_path)
    assert stage3["vocab_size"] == 50280 and stage1["vocab_size"] == 50278 and stage3["stage"] == 3
    with pytest.raises(HandoffError, match="holds stage-1 checkpoints, but stage 3 starts from stage 2"):
        check_handoff(stage3, hparams)
    assert len(check_handoff(stage3, hparams, force=True)) == 1


def test_next_stage_refuses_a_different_network(tmp_path):
    _, stage2 = record_for(2, tmp_path)
    stage2["model"]["d_model"] = 32  # as if the previous stage had used another model YAML
    write_record_checkpoint(tmp_path / "previous" / "save", stage2)
    hparams, stage3 = record_for(3, tmp_path)
    with pytest.raises(HandoffError, match="different network: d_model: 32 -> 64"):
        check_handoff(stage3, hparams)


def test_the_right_previous_stage_passes(tmp_path):
    _, stage2 = record_for(2, tmp_path)
    write_record_checkpoint(tmp_path / "previous" / "save", stage2)
    hparams, stage3 = record_for(3, tmp_path)
    assert check_handoff(stage3, hparams) == []


@pytest.mark.slow
def test_reused_output_folder_with_new_data_is_refused_and_the_test_reports_its_checkpoints_epoch(tmp_path):
    """The issue: a new --data_folder with a used output folder loaded the old checkpoints and only tested."""
    from src.brain import DuplexBrain
    from src.stages import run_stage
    first, second = write_corpus(tmp_path / "a"), write_corpus(tmp_path / "b", seconds=1.6)
    out = tmp_path / "stage2"

    def argv(corpus, *extra):
        return [str(ROOT / "hparams" / "tiny" / "train_stage2.yaml"), f"--data_folder={corpus}",
                f"--output_folder={out}", "--device=cpu", "--noprogressbar", "--number_of_epochs=2",
                "--init_from={folder: null}", "--test_max_new_tokens=0", "--selection_key=epoch",
                "--selection_mode=min", *extra]

    run_stage(DuplexBrain, argv(first))  # the test picks epoch 1 (lowest `epoch`), the counter ends at 2
    log = (out / "train_log.txt").read_text()
    assert "Epoch loaded: 1 - test loss" in log and "Epoch loaded: 2" not in log
    tested = yaml.safe_load((out / "save" / "tested_checkpoints.yaml").read_text())
    epoch1 = [p.name for p in (out / "save").glob("CKPT+*") if "epoch: 1\n" in (p / "CKPT.yaml").read_text()]
    assert tested["checkpoints"] == epoch1

    with pytest.raises(HandoffError, match=r"already holds checkpoints of a run with different data \(manifest"):
        run_stage(DuplexBrain, argv(second))
    with pytest.raises(HandoffError, match="different configuration: overrides.lr_peak"):
        run_stage(DuplexBrain, argv(first, "--lr_peak=0.01"))
    run_stage(DuplexBrain, argv(second, "--force"))  # allowed when asked for: resumes (here: only tests)
    with pytest.raises(HandoffError, match="holds stage-2 checkpoints, but stage 4 starts from stage 3"):
        run_stage(DuplexBrain, [str(ROOT / "hparams" / "tiny" / "train_stage4.yaml"), f"--data_folder={first}",
                                f"--output_folder={tmp_path / 'stage4'}", f"--previous_output_folder={out}",
                                "--device=cpu", "--noprogressbar"])
