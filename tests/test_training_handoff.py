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
