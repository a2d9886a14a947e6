"""Stage hand-off (`init_from`): stage 1 from a ConMamba ASR checkpoint, non-strict, encoder keys only."""
import torch

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
