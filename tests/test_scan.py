"""Selective scan reference: equals a naive per-step loop, chunking with initial_state is exact, dispatch."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from modules import selective_scan
from modules.bimamba import BiMamba
from modules.selective_scan import select_scan_backend, selective_scan_ref, selective_scan_with_state


def _random_scan_args(batch=2, dim=6, n_state=4, length=150, seed=0):
    """Random scan inputs in mamba-ssm's layout; length > SCAN_CHUNK exercises the internal chunking."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=gen),
        delta=torch.randn(batch, dim, length, generator=gen) * 0.5,
        A=-torch.rand(dim, n_state, generator=gen) * 4,
        B=torch.randn(batch, n_state, length, generator=gen),
        C=torch.randn(batch, n_state, length, generator=gen),
        D=torch.randn(dim, generator=gen),
        z=torch.randn(batch, dim, length, generator=gen),
        delta_bias=torch.randn(dim, generator=gen) * 0.1,
        delta_softplus=True,
    )


def _naive_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Element-by-element recurrence in float64, written independently of the reference."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    y = torch.zeros(batch, dim, length, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(length):
                dt = delta[b, d, t] + delta_bias[d]
                dt = F.softplus(dt) if delta_softplus else dt
                h = torch.exp(dt * A[d]) * h + dt * B[b, :, t] * u[b, d, t]
                y[b, d, t] = (h * C[b, :, t]).sum() + D[d] * u[b, d, t]
    return y * F.silu(z)


def _slice_time(args, start, stop):
    """The scan arguments restricted to time steps [start, stop)."""
    sliced = ("u", "delta", "B", "C", "z")
    return {k: (v[..., start:stop] if k in sliced and v is not None else v) for k, v in args.items()}


def test_reference_matches_naive_loop():
    args = _random_scan_args(batch=2, dim=3, length=70)
    torch.testing.assert_close(selective_scan_ref(**args).double(), _naive_scan(**args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [1, 37, 64, 149])
def test_chunked_with_initial_state_equals_whole(split):
    args = _random_scan_args(length=150)
    whole, whole_state = selective_scan_ref(**args, return_last_state=True)
    first, state = selective_scan_ref(**_slice_time(args, 0, split), return_last_state=True)
    second, final_state = selective_scan_ref(**_slice_time(args, split, 150), initial_state=state,
                                             return_last_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_state, whole_state, rtol=1e-5, atol=1e-5)


def test_many_small_chunks_equal_whole():
    """Token-by-token continuation (the LM decode pattern) reproduces the parallel scan."""
    args = _random_scan_args(length=20)
    whole = selective_scan_ref(**args)
    state, pieces = None, []
    for t in range(20):
        y, state = selective_scan_ref(**_slice_time(args, t, t + 1), initial_state=state, return_last_state=True)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=-1), whole, rtol=1e-5, atol=1e-5)


def test_nonzero_initial_state_changes_output():
    args = _random_scan_args(length=10)
    zero_start = selective_scan_ref(**args)
    warm_start = selective_scan_ref(**args, initial_state=torch.ones(2, 6, 4))
    assert not torch.allclose(zero_start, warm_start)


def test_gradients_match_naive_loop():
    args = _random_scan_args(batch=1, dim=2, n_state=3, length=12)
    for key in ("u", "delta", "B"):
        args[key].requires_grad_(True)
    selective_scan_ref(**args).sum().backward()
    ref_grads = [args[k].grad.clone() for k in ("u", "delta", "B")]
    for key in ("u", "delta", "B"):
        args[key].grad = None
    _naive_scan(**args).sum().backward()
    for got, key in zip(ref_grads, ("u", "delta", "B")):
        torch.testing.assert_close(got, args[key].grad, rtol=1e-4, atol=1e-4)


def test_low_precision_input_keeps_dtype_and_fp32_state():
    args = _random_scan_args(length=8)
    for key in ("u", "delta", "B", "C", "z"):
        args[key] = args[key].bfloat16()
    y, state = selective_scan_ref(**args, return_last_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_empty_sequence_returns_initial_state():
    args = _slice_time(_random_scan_args(length=5), 0, 0)
    h0 = torch.randn(2, 6, 4)
    y, state = selective_scan_ref(**args, initial_state=h0, return_last_state=True)
    assert y.shape == (2, 6, 0)
    torch.testing.assert_close(state, h0)


@pytest.mark.parametrize("bad", ["u_blD", "A_rows", "B_const", "state"])
def test_bad_shapes_raise_readable_errors(bad):
    args = _random_scan_args(length=5)
    if bad == "u_blD":
        args["u"] = args["u"].transpose(1, 2)
    elif bad == "A_rows":
        args["A"] = args["A"][:3]
    elif bad == "B_const":
        args["B"] = torch.randn(6, 4)
    else:
        args["initial_state"] = torch.zeros(2, 6, 5)
    with pytest.raises(ValueError, match="selective_scan_ref"):
        selective_scan_ref(**args)


def test_backend_is_reference_on_cpu_and_on_cuda_without_mamba_ssm(monkeypatch):
    selective_scan._backend_for_device_type.cache_clear()
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import mamba_ssm...` raise ImportError
    try:
        fn_cpu, reason_cpu = select_scan_backend("cpu")
        fn_cuda, reason_cuda = select_scan_backend(torch.device("cuda"))
    finally:
        selective_scan._backend_for_device_type.cache_clear()
    assert fn_cpu is selective_scan_ref and "not CUDA" in reason_cpu
    assert fn_cuda is selective_scan_ref and "mamba_ssm" in reason_cuda


def test_backend_uses_mamba_ssm_on_cuda_when_importable(monkeypatch):
    def fake_fn(*args, **kwargs):
        return None

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = fake_fn
    for name, module in (("mamba_ssm", types.ModuleType("mamba_ssm")),
                         ("mamba_ssm.ops", types.ModuleType("mamba_ssm.ops")),
                         ("mamba_ssm.ops.selective_scan_interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    selective_scan._backend_for_device_type.cache_clear()
    try:
        fn_cuda, reason = select_scan_backend("cuda:0")
        fn_cpu, _ = select_scan_backend("cpu")
    finally:
        selective_scan._backend_for_device_type.cache_clear()
    assert fn_cuda is fake_fn and "selective_scan_fn" in reason
    assert fn_cpu is selective_scan_ref


# mamba-ssm's own tolerances for selective_scan_fn vs selective_scan_ref (tests/ops/test_selective_scan.py)
_TOLERANCES = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}


@pytest.mark.cuda
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_reference_on_both_bimamba_directions(itype):
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    torch.manual_seed(0)
    mixer = BiMamba(d_model=512, d_state=16).cuda()
    hidden = torch.randn(2, 76, 512, device="cuda")
    with torch.no_grad():
        xz = mixer.in_proj(hidden).transpose(1, 2)  # (B, 2*d_inner, L)
        for backward in (False, True):
            args = mixer.scan_inputs(xz.flip(-1) if backward else xz, backward=backward)
            for key in ("u", "delta", "B", "C", "z"):
                args[key] = args[key].to(itype)
            out, state = interface.selective_scan_fn(**args, return_last_state=True)
            out_ref, state_ref = selective_scan_ref(**args, return_last_state=True)
            torch.testing.assert_close(out, out_ref, **_TOLERANCES[itype])
            torch.testing.assert_close(state.float(), state_ref, **_TOLERANCES[itype])


@pytest.mark.cuda
def test_bimamba_forward_same_on_fused_and_reference_backends():
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    torch.manual_seed(0)
    mixer = BiMamba(d_model=512, d_state=16).cuda()
    hidden = torch.randn(2, 76, 512, device="cuda")
    lengths = torch.tensor([76, 50], device="cuda")
    with torch.no_grad():
        fused = mixer(hidden, lengths=lengths, scan_fn=interface.selective_scan_fn)
        reference = mixer(hidden, lengths=lengths, scan_fn=selective_scan_ref)
    torch.testing.assert_close(fused, reference, **_TOLERANCES[torch.float32])


def test_reference_stays_fp32_under_autocast():
    """Training runs under bf16 autocast; the scan's own math must not be downcast by it."""
    args = _random_scan_args(length=30)
    plain = selective_scan_ref(**args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = selective_scan_ref(**args)
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def _zero_start_only(**kwargs):
    """Stands in for a fused kernel: mamba-ssm's selective_scan_fn has no initial_state argument."""
    assert "initial_state" not in kwargs
    return selective_scan_ref(**kwargs)


@pytest.mark.parametrize("with_gate", [True, False])
def test_closed_form_initial_state_correction_equals_reference(with_gate):
    args = _random_scan_args(length=40)
    if not with_gate:
        args["z"] = None
    _, h_first = selective_scan_ref(**_slice_time(args, 0, 25), return_last_state=True)
    second = _slice_time(args, 25, 40)
    expected, expected_state = selective_scan_ref(**second, initial_state=h_first, return_last_state=True)
    got, got_state = selective_scan_with_state(_zero_start_only, **second, initial_state=h_first)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state, expected_state, rtol=1e-5, atol=1e-5)


def test_scan_with_state_handles_empty_chunk_and_missing_state():
    args = _random_scan_args(length=6)
    h0 = torch.randn(2, 6, 4)
    y, state = selective_scan_with_state(_zero_start_only, **_slice_time(args, 0, 0), initial_state=h0)
    assert y.shape == (2, 6, 0)
    torch.testing.assert_close(state, h0)
    y, state = selective_scan_with_state(_zero_start_only, **args)
    torch.testing.assert_close(y, selective_scan_ref(**args))


@pytest.mark.cuda
def test_fused_kernel_continues_a_state_with_closed_form_correction():
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    torch.manual_seed(0)
    mixer = BiMamba(d_model=512, d_state=16).cuda()
    with torch.no_grad():
        xz = mixer.in_proj(torch.randn(2, 76, 512, device="cuda")).transpose(1, 2)  # (B, 2*d_inner, L)
        args = mixer.scan_inputs(xz, backward=False)
        whole, whole_state = selective_scan_ref(**args, return_last_state=True)
        _, h_first = selective_scan_ref(**_slice_time(args, 0, 50), return_last_state=True)
        got, got_state = selective_scan_with_state(interface.selective_scan_fn, **_slice_time(args, 50, 76),
                                                   initial_state=h_first)
    torch.testing.assert_close(got, whole[..., 50:], **_TOLERANCES[torch.float32])
    torch.testing.assert_close(got_state, whole_state, **_TOLERANCES[torch.float32])
