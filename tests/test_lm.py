"""MambaLM: local HF folder loading, vocabulary resize arithmetic (spec §1.7), tying, freezing, dtype."""
import pytest
import torch

from modules.lm import MambaLM, resize_vocabulary

TINY = dict(vocab_size=50280, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4)


def tied(lm):
    return lm.model.lm_head.weight is lm.model.get_input_embeddings().weight


def test_seeded_construction_is_reproducible():
    a, b = MambaLM(config=TINY, seed=3), MambaLM(config=TINY, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.lm_head.weight, MambaLM(config=TINY, seed=4).model.lm_head.weight)


def test_shrink_to_stage12_keeps_leading_rows_and_tie():
    full = MambaLM(config=TINY, seed=0)
    small = MambaLM(config=TINY, seed=0, vocab_size=50278)
    assert small.model.lm_head.weight.shape == (50278, 16) and small.config.vocab_size == 50278
    assert torch.equal(small.model.lm_head.weight, full.model.lm_head.weight[:50278])
    assert tied(small)


def test_growth_rows_drawn_once_for_the_tied_matrix():
    lm = MambaLM(config=TINY, seed=0, vocab_size=50278)
    old = lm.model.lm_head.weight.detach().clone()
    torch.manual_seed(0)
    resize_vocabulary(lm.model, 50280)
    weight = lm.model.get_input_embeddings().weight
    assert tied(lm) and weight.shape == (50280, 16)
    assert torch.equal(weight[:50278], old)
    new_rows = weight[50278:]
    torch.manual_seed(0)
    assert torch.equal(new_rows, torch.empty(2, 16).normal_(0.0, 0.01))  # exactly one N(0, 0.01^2) draw
    hidden = torch.randn(3, 16)
    assert torch.allclose(lm.model.lm_head(hidden)[:, 50278:], hidden @ new_rows.T)  # the head sees them too


def test_embed_and_forward_shapes():
    lm = MambaLM(config=TINY, seed=0).eval()
    embeds = lm.embed(torch.tensor([[1, 2, 3]]))
    assert embeds.shape == (1, 3, 16)
    assert lm(embeds).shape == (1, 3, 50280) and lm(embeds).dtype == torch.float32


def test_forward_is_causal():
    lm = MambaLM(config=TINY, seed=0).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] += 1.0
    assert torch.allclose(lm(x)[:, :4], lm(y)[:, :4], atol=1e-5)
    assert not torch.allclose(lm(x)[:, 4:], lm(y)[:, 4:])


def test_load_from_local_safetensors_folder(tmp_path):
    reference = MambaLM(config=TINY, seed=1)
    reference.model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    loaded = MambaLM(source=tmp_path, config=TINY, vocab_size=50278)
    assert torch.equal(loaded.model.lm_head.weight, reference.model.lm_head.weight[:50278]) and tied(loaded)
    with pytest.raises(ValueError, match="hidden_size: folder 16 vs configuration 32"):
        MambaLM(source=tmp_path, config={**TINY, "hidden_size": 32})


def test_missing_folder_is_a_readable_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and \\*.safetensors"):
        MambaLM(source=tmp_path)
    with pytest.raises(ValueError, match="source .* or config"):
        MambaLM()


def test_freeze_and_dtype():
    lm = MambaLM(config=TINY, seed=0, freeze=True, dtype="bfloat16")
    assert not any(p.requires_grad for p in lm.parameters())
    assert lm.model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        MambaLM(config=TINY, dtype="float99")


def test_meta_device_build_has_full_size_parameters():
    lm = MambaLM(config=dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2,
                             conv_kernel=4, time_step_rank=160), device="meta")
    assert sum(p.numel() for p in lm.parameters()) == 2_768_345_600  # spec §1.6, tied counted once
    assert lm.model.lm_head.weight.is_meta


def _spec_of(present):
    return lambda name: object() if name in present else None


@pytest.mark.parametrize("present, switched_off", [
    ({"mamba_ssm"}, True),  # mamba-ssm alone: its mamba_inner_fn would assert on causal-conv1d
    ({"mamba_ssm", "causal_conv1d"}, False),  # both: the fused path runs
    (set(), False),  # neither: transformers already falls back to PyTorch
])
def test_fused_training_path_is_switched_off_only_without_causal_conv1d(monkeypatch, present, switched_off):
    from transformers.models.mamba import modeling_mamba
    from modules import lm as lm_module
    original = modeling_mamba.mamba_inner_fn
    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", original)  # restored after the test
    assert lm_module.guard_fused_training_path(_spec_of(present)) is switched_off
    assert (modeling_mamba.mamba_inner_fn is not original) is switched_off


def test_training_forward_without_the_fused_path_equals_eval_forward(monkeypatch):
    """With the shortcut switched off, training mode takes the mixer's own path: the same logits as eval."""
    from transformers.models.mamba import modeling_mamba
    from modules import lm as lm_module

    def fused_path_that_must_not_run(*args, **kwargs):
        raise AssertionError("causal_conv1d_cuda is not available")  # what mamba-ssm alone does on an H200

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", fused_path_that_must_not_run)
    assert lm_module.guard_fused_training_path(_spec_of({"mamba_ssm"}))
    lm = MambaLM(config=dict(TINY, vocab_size=64), seed=0)
    embeds = torch.randn(2, 7, TINY["hidden_size"])  # (B, L, H)
    logits_train = lm.train()(embeds)
    logits_train.sum().backward()
    with torch.no_grad():
        logits_eval = lm.eval()(embeds)
    torch.testing.assert_close(logits_train.detach(), logits_eval)


@pytest.mark.parametrize("installed", [True, False])
def test_parallel_scan_is_on_exactly_when_mambapy_is_installed(installed):
    from modules import lm as lm_module
    lm = MambaLM(config=dict(TINY, vocab_size=64), seed=0)
    assert lm_module.use_parallel_scan(lm.model, _spec_of({"mambapy"} if installed else set())) is installed
    assert lm.model.config.use_mambapy is False  # a machine's packages are not written into the model's config
    assert all(layer.mixer.use_mambapy is installed for layer in lm.model.backbone.layers)


def test_parallel_scan_gives_the_step_by_step_loss_and_gradients():
    """mambapy's scan is only a faster schedule of the same recurrence: logits and every gradient agree with
    transformers' step-by-step loop (a length that is not a power of two: pscan pads it)."""
    pytest.importorskip("mambapy")
    from modules import lm as lm_module
    results = []
    for installed in (False, True):
        lm = MambaLM(config=dict(TINY, vocab_size=64), seed=0).train()
        assert lm_module.use_parallel_scan(lm.model, _spec_of({"mambapy"} if installed else set())) is installed
        embeds = torch.randn(3, 37, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))  # (B, L, H)
        logits = lm(embeds)  # (B, L, V)
        logits.square().mean().backward()
        results.append((logits.detach(), {name: p.grad for name, p in lm.named_parameters()}))
    (logits_loop, grads_loop), (logits_parallel, grads_parallel) = results
    torch.testing.assert_close(logits_parallel, logits_loop, rtol=1e-5, atol=1e-5)
    assert grads_loop.keys() == grads_parallel.keys()
    for name, grad in grads_loop.items():
        torch.testing.assert_close(grads_parallel[name], grad, rtol=1e-4, atol=1e-6, msg=name)
