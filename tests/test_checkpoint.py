"""Reference-layout checkpoints: round trip, averaging, strict key/shape checks, vocabulary growth, manifest."""
import pathlib

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from modules.checkpoint import (DROPPED_BUFFERS, EMBEDDING_KEY, LM_HEAD_KEY, CheckpointMismatchError,
                                find_checkpoints, load_reference_checkpoint, read_model_state,
                                save_reference_checkpoint)
from modules.model import FULL_YAML, build_model, load_model_hparams

MANIFEST = pathlib.Path(__file__).resolve().parent / "data" / "reference" / "upstream_model_ckpt_keys.tsv"


def tiny(**overrides):
    return load_model_hparams(overrides=overrides)


def trained_stats(net):
    """Give the normaliser statistics the way training does (train mode, epoch < 4)."""
    net["speech_encoder"].train()
    with torch.no_grad():
        net["speech_encoder"](torch.randn(2, 16000) * 0.1, torch.ones(2), epoch=1)
    net["speech_encoder"].eval()
    return net


def outputs(net, wav):
    net["model"].eval(), net["speech_encoder"].eval()
    with torch.no_grad():
        speech, _ = net["speech_encoder"](wav, torch.ones(wav.shape[0]))  # (B, P, H)
        return speech, net["model"].lm(speech)  # (B, P, V)


def test_round_trip_gives_identical_outputs(tmp_path):
    source = trained_stats(tiny(seed=1))
    folder = save_reference_checkpoint(source["model"], tmp_path, source["normalizer"], meta={"epoch": 3})
    target = tiny(seed=2)
    assert load_reference_checkpoint(target["model"], tmp_path, normalizer=target["normalizer"]) == [folder]
    wav = torch.randn(1, 24000) * 0.1
    for a, b in zip(outputs(source, wav), outputs(target, wav)):
        assert torch.equal(a, b)
    assert target["normalizer"].count == source["normalizer"].count > 0
    assert torch.equal(target["normalizer"].glob_mean, source["normalizer"].glob_mean)


def test_saved_layout_is_the_reference_one(tmp_path):
    net = tiny()
    folder = save_reference_checkpoint(net["model"], tmp_path, meta={"PPL": 12.5})
    state = torch.load(folder / "model.ckpt", weights_only=True)
    assert set(state) == set(net["model"].state_dict()) | set(DROPPED_BUFFERS)
    assert state["1.positional_encoding.inv_freq"].shape == (32,)
    assert state["1.positional_encoding_decoder.pe"].shape == (1, 2500, 64)
    assert state[EMBEDDING_KEY].data_ptr() == state[LM_HEAD_KEY].data_ptr()  # tied matrix stored once
    found = Checkpointer(tmp_path).find_checkpoints()  # SpeechBrain itself recognises the folder
    assert [c.path for c in found] == [folder] and found[0].meta["PPL"] == 12.5


def test_averaging_is_a_plain_mean_even_for_the_tied_matrix(tmp_path):
    net = tiny()
    first = {k: v.clone() for k, v in net["model"].state_dict().items()}
    save_reference_checkpoint(net["model"], tmp_path)
    with torch.no_grad():
        for p in net["model"].parameters():
            p.add_(1.0)
    save_reference_checkpoint(net["model"], tmp_path)
    assert len(find_checkpoints(tmp_path)) == 2
    averaged = read_model_state(tmp_path)
    for key in (EMBEDDING_KEY, LM_HEAD_KEY, "2.linear1.weight", "0.convblock_0.convs.conv_0.conv.weight"):
        assert torch.allclose(averaged[key], first[key] + 0.5), key  # SpeechBrain's in-place sum gives +1.0 here


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    net = tiny()
    folder = save_reference_checkpoint(net["model"], tmp_path)
    state = torch.load(folder / "model.ckpt", weights_only=True)
    del state["2.linear1.bias"]
    state["2.extra.weight"] = torch.zeros(1)
    state["2.linear2.weight"] = torch.zeros(3, 3)
    torch.save(state, folder / "model.ckpt")
    with pytest.raises(CheckpointMismatchError) as error:
        load_reference_checkpoint(tiny()["model"], folder)
    message = str(error.value)
    assert str(folder) in message
    assert "1 missing" in message and "2.linear1.bias" in message
    assert "1 unexpected" in message and "2.extra.weight" in message
    assert "1 mis-shaped" in message and "2.linear2.weight: checkpoint (3, 3) vs model (64, 128)" in message


def test_stage12_checkpoint_into_stage34_model(tmp_path):
    stage2 = tiny(num_state_tokens=1)
    save_reference_checkpoint(stage2["model"], tmp_path)
    with pytest.raises(CheckpointMismatchError, match="50278 rows but this configuration needs 50280: this is a "
                                                      "stage-1/2 checkpoint"):
        load_reference_checkpoint(tiny()["model"], tmp_path)
    stage3 = tiny()["model"]
    load_reference_checkpoint(stage3, tmp_path, grow_vocabulary=True, seed=0)
    weight = stage3.lm.model.get_input_embeddings().weight
    assert weight.shape[0] == 50280 and stage3.lm.model.lm_head.weight is weight
    assert torch.equal(weight[:50278], stage2["model"].lm.model.lm_head.weight)
    assert 0 < weight[50278:].abs().max() < 0.06


def test_prefixes_load_only_the_encoder_part(tmp_path):
    """Stage 1 starts from a Mamba-ASR checkpoint: CNN + encoder keys match, its decoder/heads are ignored."""
    asr = tiny(seed=5)
    folder = save_reference_checkpoint(asr["model"], tmp_path)
    state = torch.load(folder / "model.ckpt", weights_only=True)
    state = {k: v for k, v in state.items() if k.startswith(("0.", "1."))}
    state.update({"1.decoder.layers.0.w": torch.zeros(2), "2.w.weight": torch.zeros(5000, 64)})
    torch.save(state, folder / "model.ckpt")
    target = tiny(seed=6)["model"]
    adapter_before = target.adapter.linear1.weight.clone()
    load_reference_checkpoint(target, tmp_path, prefixes=("0.", "1.custom_src_module.", "1.encoder."))
    assert torch.equal(target.encoder.custom_src_module.layers[0].w.weight,
                       asr["model"].encoder.custom_src_module.layers[0].w.weight)
    assert torch.equal(target.adapter.linear1.weight, adapter_before)


def test_meta_model_is_filled_by_assignment(tmp_path):
    source = tiny(seed=1)
    save_reference_checkpoint(source["model"], tmp_path)
    target = tiny(lm_device="meta")["model"]
    assert target.lm.model.lm_head.weight.is_meta
    load_reference_checkpoint(target, tmp_path)
    lm = target.lm.model
    assert not any(p.is_meta for p in target.parameters()) and lm.lm_head.weight is lm.get_input_embeddings().weight
    assert torch.equal(lm.lm_head.weight, source["model"].lm.model.lm_head.weight)


def test_no_checkpoint_found_is_readable(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found.*CKPT"):
        load_reference_checkpoint(tiny()["model"], tmp_path)


def test_full_size_keys_and_shapes_match_the_reference_manifest():
    """Full-size model on the meta device: our keys + the 2 dropped buffers == the 1165 reference keys."""
    reference = {}
    for line in MANIFEST.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            reference[key] = tuple(int(n) for n in shape.split("x"))
    assert len(reference) == 1165
    with torch.device("meta"):
        model = build_model(FULL_YAML)
    ours = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert set(ours) | set(DROPPED_BUFFERS) == set(reference)
    assert not set(ours) & set(DROPPED_BUFFERS)
    assert {k: s for k, s in ours.items() if reference[k] != s} == {}
    assert reference["1.positional_encoding.inv_freq"] == (256,)
    assert reference["1.positional_encoding_decoder.pe"] == (1, 2500, 512)


def test_reference_normalizer_file_with_speaker_dicts_loads(tmp_path):
    """SpeechBrain 1.0 (the reference) also stored speaker dictionaries; only the global statistics matter."""
    net = tiny()
    folder = save_reference_checkpoint(net["model"], tmp_path)
    mean, std = torch.linspace(-1, 1, 80), torch.linspace(1, 2, 80)
    torch.save({"count": 7, "glob_mean": mean, "glob_std": std, "spk_dict_mean": {}, "spk_dict_std": {},
                "spk_dict_count": {}}, folder / "normalizer.ckpt")
    target = tiny()
    load_reference_checkpoint(target["model"], tmp_path, normalizer=target["normalizer"])
    assert target["normalizer"].count == 7 and torch.equal(target["normalizer"].glob_std, std)
    feats = torch.randn(1, 10, 80)
    target["normalizer"].eval()
    assert torch.allclose(target["normalizer"](feats, torch.ones(1)), (feats - mean) / std, atol=1e-5)
