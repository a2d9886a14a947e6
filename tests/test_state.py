"""MambaState: forks, rollbacks and views never leak between branches and never touch the weights."""
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from duplex.runtime import TorchMambaRuntime
from duplex.state import MambaState


@pytest.fixture(scope="module")
def runtime():
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                         conv_kernel=4)
    return TorchMambaRuntime(MambaForCausalLM(config).eval())


def _ids(n, seed):
    return torch.randint(0, 200, (1, n), generator=torch.Generator().manual_seed(seed))


def test_fork_speculate_discard_leaves_original_bit_identical(runtime):
    main = runtime.new_state()
    runtime.prefill(main, runtime.embed(_ids(10, 0)))
    snapshot = (main.conv.clone(), main.ssm.clone(), main.seqlen)
    fork = main.clone()
    runtime.prefill(fork, runtime.embed(_ids(6, 1)))  # speculative chunk on the fork
    for token in (3, 4, 5):
        runtime.step(fork, runtime.embed(torch.tensor([[token]])))
    assert not torch.equal(fork.ssm, main.ssm)
    del fork
    assert torch.equal(main.conv, snapshot[0]) and torch.equal(main.ssm, snapshot[1])
    assert main.seqlen == snapshot[2] == [10]


def test_rollback_with_copy_restores_exact_continuation(runtime):
    state = runtime.new_state()
    runtime.prefill(state, runtime.embed(_ids(8, 2)))
    saved = state.clone()
    follow_up = runtime.embed(_ids(3, 3))
    expected = runtime.prefill(saved.clone(), follow_up)
    runtime.prefill(state, runtime.embed(_ids(5, 4)))  # the probe we want to undo
    state.copy_(saved)
    assert state.equal(saved)
    assert torch.equal(runtime.prefill(state, follow_up), expected)


def test_copy_keeps_buffers_in_place(runtime):
    state = runtime.new_state()
    conv_ptr, ssm_ptr = state.conv.data_ptr(), state.ssm.data_ptr()
    other = runtime.new_state()
    runtime.prefill(other, runtime.embed(_ids(4, 5)))
    state.copy_(other)
    assert (state.conv.data_ptr(), state.ssm.data_ptr()) == (conv_ptr, ssm_ptr)  # CUDA-graph friendly


def test_views_write_through_to_parent_and_cat_round_trips():
    parent = MambaState.zeros(n_layer=2, batch_size=3, d_inner=4, d_conv=4, d_state=2)
    view = parent.rows(1, 3)
    view.ssm.add_(1.0)
    view.advance(2)
    assert parent.seqlen == [0, 2, 2]
    assert parent.ssm[:, 0].abs().sum() == 0 and torch.all(parent.ssm[:, 1:] == 1)
    assert view.row(1).seqlen == [2]
    stacked = MambaState.cat([parent.row(2), parent.row(0)])
    assert stacked.seqlen == [2, 0] and stacked.row(0).equal(parent.row(2))
    with pytest.raises(IndexError):
        parent.rows(2, 5)


def test_layout_and_size_of_the_full_model_state():
    state = MambaState.zeros(n_layer=64, batch_size=1, d_inner=5120, d_conv=4, d_state=16,
                             dtype=torch.bfloat16, device="meta")
    assert state.conv.shape == (64, 1, 5120, 4) and state.conv.dtype == torch.bfloat16
    assert state.ssm.shape == (64, 1, 5120, 16) and state.ssm.dtype == torch.float32
    assert state.conv.is_contiguous() and state.ssm.is_contiguous()
    assert state.nbytes == 64 * 5120 * (4 * 2 + 16 * 4)  # 22.5 MiB per branch


def test_bad_states_are_rejected():
    with pytest.raises(ValueError, match="float32"):
        MambaState(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="leading dims"):
        MambaState(torch.zeros(1, 1, 2, 4), torch.zeros(1, 2, 2, 3))
    small = MambaState.zeros(1, 1, 2, 4, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        small.copy_(MambaState.zeros(1, 2, 2, 4, 3))
