"""TorchMambaRuntime against transformers' own full forward (the ground truth) on a small random Mamba."""
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from duplex.runtime import TorchMambaRuntime

ATOL = 2e-5


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                         conv_kernel=4)
    return MambaForCausalLM(config).eval()


@pytest.fixture()
def runtime(hf_model):
    return TorchMambaRuntime(hf_model)


def _hf_forward(model, ids):
    """Full forward of the whole sequence: logits (B, L, V) and per-layer final (conv, ssm) states."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.cache_params
    layers = range(model.config.num_hidden_layers)
    conv = torch.stack([cache.get_conv_state(i, state_idx=0) for i in layers])  # (n_layer, B, D, K)
    ssm = torch.stack([cache.get_recurrent_state(i, state_idx=0) for i in layers])  # (n_layer, B, D, N)
    return out.logits, conv, ssm


def _assert_state_matches(state, conv, ssm):
    torch.testing.assert_close(state.conv, conv, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(state.ssm, ssm.float(), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("cuts", [(7, 8), (1, 2, 3), (5, 18, 19), (12,)])
def test_chunked_prefill_from_state_equals_full_forward(hf_model, runtime, cuts):
    ids = torch.randint(0, 1000, (2, 23), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_conv, ref_ssm = _hf_forward(hf_model, ids)
    state = runtime.new_state(2)
    embeds = runtime.embed(ids)  # (2, 23, 64)
    bounds = [0, *cuts, ids.shape[1]]
    chunks = [runtime.prefill_all_logits(state, embeds[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), ref_logits, atol=ATOL, rtol=1e-5)
    _assert_state_matches(state, ref_conv, ref_ssm)
    assert state.seqlen == [23, 23]


def test_token_by_token_steps_equal_full_forward(hf_model, runtime):
    ids = torch.randint(0, 1000, (1, 17), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_conv, ref_ssm = _hf_forward(hf_model, ids)
    state = runtime.new_state(1)
    embeds = runtime.embed(ids)
    first = runtime.prefill(state, embeds[:, :6])  # (1, V): last position only
    torch.testing.assert_close(first, ref_logits[:, 5], atol=ATOL, rtol=1e-5)
    for t in range(6, 17):
        logits = runtime.step(state, embeds[:, t:t + 1])
        torch.testing.assert_close(logits, ref_logits[:, t], atol=ATOL, rtol=1e-5)
    _assert_state_matches(state, ref_conv, ref_ssm)


def test_chunked_prefill_equals_token_steps(runtime):
    embeds = runtime.embed(torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3)))
    chunked, stepped = runtime.new_state(), runtime.new_state()
    runtime.prefill(chunked, embeds[:, :4])
    chunk_logits = runtime.prefill_all_logits(chunked, embeds[:, 4:])  # (1, 8, V)
    runtime.prefill(stepped, embeds[:, :4])
    step_logits = torch.stack([runtime.step(stepped, embeds[:, t:t + 1]) for t in range(4, 12)], dim=1)
    torch.testing.assert_close(chunk_logits, step_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.ssm, stepped.ssm, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.conv, stepped.conv, atol=1e-6, rtol=1e-6)


def test_one_token_prefill_equals_step(runtime):
    embeds = runtime.embed(torch.tensor([[5, 6, 7, 8]]))
    a, b = runtime.new_state(), runtime.new_state()
    runtime.prefill(a, embeds[:, :3])
    runtime.prefill(b, embeds[:, :3])
    assert torch.equal(runtime.prefill(a, embeds[:, 3:]), runtime.step(b, embeds[:, 3:]))
    assert a.equal(b)


def test_rows_of_a_batch_are_independent_branches(runtime):
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    batch = runtime.new_state(2)
    batched_logits = runtime.prefill(batch, runtime.embed(ids))  # (2, V)
    for row in range(2):
        alone = runtime.new_state(1)
        torch.testing.assert_close(runtime.prefill(alone, runtime.embed(ids[row:row + 1])),
                                   batched_logits[row:row + 1], atol=1e-6, rtol=1e-6)
    view = batch.row(1)  # writing through a view advances only that row of the parent
    runtime.step(view, runtime.embed(torch.tensor([[3]])))
    assert batch.seqlen == [9, 10]


def test_weights_are_read_in_place_and_never_modified(hf_model, runtime):
    assert runtime.lm_head.weight.data_ptr() == hf_model.lm_head.weight.data_ptr()
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    runtime.prefill(runtime.new_state(), runtime.embed(torch.tensor([[1, 2, 3]])))
    for key, value in hf_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_chunks_raise_clear_errors(runtime):
    state = runtime.new_state(1)
    with pytest.raises(ValueError, match="L >= 1"):
        runtime.prefill(state, torch.zeros(1, 0, 64))
    with pytest.raises(ValueError, match="rows"):
        runtime.prefill(state, torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="one token"):
        runtime.step(state, torch.zeros(1, 2, 64))
    assert state.seqlen == [0]


def test_bf16_weights_keep_an_fp32_ssm_state_and_track_the_fp32_model(hf_model):
    lm16 = MambaForCausalLM(hf_model.config).eval()
    lm16.load_state_dict(hf_model.state_dict())
    lm16.to(torch.bfloat16)
    rt16, rt32 = TorchMambaRuntime(lm16), TorchMambaRuntime(hf_model)
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(6))
    s16, s32 = rt16.new_state(), rt32.new_state()
    assert s16.conv.dtype == torch.bfloat16 and s16.ssm.dtype == torch.float32
    rt16.prefill(s16, rt16.embed(ids[:, :6]))
    logits16 = rt16.prefill_all_logits(s16, rt16.embed(ids[:, 6:]))
    logits32 = rt32.prefill_all_logits(s32, rt32.embed(ids))[:, 6:]
    assert logits16.dtype == torch.float32
    assert (logits16 - logits32).norm() / logits32.norm() < 0.05
