"""Selective scan (the S6 recurrence of Mamba): a pure-torch reference and the CUDA-kernel dispatch.

The reference is the single source of truth for the recurrence on every device. It also accepts an
``initial_state`` so that a sequence can be scanned in chunks (the duplex LM runtime continues a live
state with each new speech slice); mamba-ssm's fused kernel cannot do that, so callers that need it
use the reference.

Recurrence, per batch row b, channel d and state index n (Δ = delta after bias/softplus)::

    h[t] = exp(Δ[t] * A[d, n]) * h[t-1] + Δ[t] * B[n, t] * u[t]
    y[t] = sum_n C[n, t] * h[t, n] + D[d] * u[t]        then  y[t] *= silu(z[t])  if z is given
"""
import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Time steps whose decay/input terms are materialised at once; bounds memory to
# (B, D, SCAN_CHUNK, N) floats whatever the sequence length.
SCAN_CHUNK = 64


def _check_shapes(u, delta, A, B, C, initial_state):
    """Raise a readable error when the scan inputs do not follow mamba-ssm's layout."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan_ref: u and delta must both be (B, D, L); got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}. Transpose (B, L, D) inputs with .transpose(1, 2).")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan_ref: A must be (D={dim}, N); got {tuple(A.shape)}.")
    n_state = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.shape != (batch, n_state, length):
            raise ValueError(f"selective_scan_ref: {name} must be (B={batch}, N={n_state}, L={length}); "
                             f"got {tuple(mat.shape)}. Only input-dependent (B, N, L) {name} is supported.")
    if initial_state is not None and initial_state.shape != (batch, dim, n_state):
        raise ValueError(f"selective_scan_ref: initial_state must be (B={batch}, D={dim}, N={n_state}); "
                         f"got {tuple(initial_state.shape)}. Pass the last_state of a previous scan.")


def _scan_chunk(state, delta, u, A, B, C):
    """Run the recurrence over one chunk of time steps; return outputs (B, D, l) and the new state."""
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (B, D, l, N)
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (B, D, l, N)
    readout = C.transpose(1, 2)  # (B, l, N)
    outputs = []
    # unbind, not decay[:, :, t]: autograd gives each indexed step a zero gradient of the whole chunk, which
    # made the backward pass about 3x slower on a CPU; unbind's backward is one stack
    for decay_t, drive_t, readout_t in zip(decay.unbind(2), drive.unbind(2), readout.unbind(1)):
        state = decay_t * state + drive_t  # (B, D, N)
        # elementwise product + sum, not einsum: autocast would run a matmul in bf16
        outputs.append((state * readout_t[:, None]).sum(-1))  # (B, D)
    return torch.stack(outputs, dim=-1), state  # (B, D, l), (B, D, N)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False):
    """Selective scan in pure torch, fp32 math, with mamba-ssm's argument order and semantics.

    Parameters
    ----------
    u, delta : torch.Tensor
        (B, D, L) input and time step (before ``delta_bias`` / softplus).
    A : torch.Tensor
        (D, N) state matrix (negative real, i.e. ``-exp(A_log)``).
    B, C : torch.Tensor
        (B, N, L) input-dependent input and output projections.
    D : torch.Tensor, optional
        (D,) skip connection.
    z : torch.Tensor, optional
        (B, D, L) gate; the output is multiplied by ``silu(z)``.
    delta_bias : torch.Tensor, optional
        (D,) added to ``delta`` before the optional softplus.
    delta_softplus : bool
        Apply softplus to ``delta`` (after the bias).
    initial_state : torch.Tensor, optional
        (B, D, N) state to continue from (zero when omitted). Scanning ``x1 ‖ x2`` equals scanning
        ``x2`` from the last state of ``x1``.
    return_last_state : bool
        Also return the final (B, D, N) fp32 state.

    Returns
    -------
    torch.Tensor or tuple
        (B, D, L) output in ``u``'s dtype, and the fp32 last state if requested.

    Example
    -------
    >>> u = torch.randn(1, 4, 6); A = -torch.rand(4, 3)
    >>> y, h = selective_scan_ref(u, torch.rand(1, 4, 6), A, torch.randn(1, 3, 6),
    ...                           torch.randn(1, 3, 6), return_last_state=True)
    >>> tuple(y.shape), tuple(h.shape)
    ((1, 4, 6), (1, 4, 3))
    """
    _check_shapes(u, delta, A, B, C, initial_state)
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))  # fp32 math whatever the input dtype
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]  # (B, D, L)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    state = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float()
    chunks = []
    for start in range(0, length, SCAN_CHUNK):
        window = slice(start, start + SCAN_CHUNK)
        y_chunk, state = _scan_chunk(state, delta[..., window], u[..., window], A, B[..., window],
                                     C[..., window])
        chunks.append(y_chunk)
    y = torch.cat(chunks, dim=-1) if chunks else u.new_zeros(batch, dim, 0)  # (B, D, L)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, state) if return_last_state else y


@functools.lru_cache(maxsize=None)
def _backend_for_device_type(device_type):
    """Pick and log the scan implementation for one device type (cached: logged once per process)."""
    if device_type != "cuda":
        choice = (selective_scan_ref, f"device type '{device_type}' is not CUDA: pure-torch reference scan")
    else:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            choice = (selective_scan_fn, "CUDA device and mamba_ssm importable: fused selective_scan_fn")
        except (ImportError, OSError, RuntimeError) as err:  # missing, or built for another CUDA/torch
            choice = (selective_scan_ref, f"CUDA device but mamba_ssm is unavailable ({err}): pure-torch "
                                          "reference scan (pip install mamba-ssm for the fused kernel)")
    logger.info("selective scan backend: %s", choice[1])
    return choice


def select_scan_backend(device):
    """Return ``(scan_fn, reason)``: mamba-ssm's fused kernel on CUDA when installed, else the reference.

    Both callables take mamba-ssm's arguments; only the reference accepts ``initial_state``.

    Example
    -------
    >>> fn, reason = select_scan_backend(torch.device("cpu"))
    >>> fn is selective_scan_ref
    True
    """
    return _backend_for_device_type(torch.device(device).type)


def selective_scan_with_state(scan_fn, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, initial_state=None):
    """Continue a scan from ``initial_state`` with any backend; returns ``(y, last_state)``.

    The reference takes the state directly. A fused kernel without an initial-state argument (mamba-ssm's
    ``selective_scan_fn``) scans from zero, and the contribution of h0 is added in closed form, since the
    recurrence is linear in h: with cumulative step S[t] = sum_{s<=t} Δ[s],
    ``y[t] += silu(z[t]) * sum_n C[n, t] * exp(A[d, n] * S[t]) * h0[d, n]`` and
    ``h[L] += exp(A * S[L]) * h0``. Costs one (B, D, L, N) elementwise pass; meant for short chunks.
    """
    args = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if scan_fn is selective_scan_ref:
        return selective_scan_ref(**args, initial_state=initial_state, return_last_state=True)
    if u.shape[-1] == 0:  # nothing to scan: kernels may reject empty input
        batch, dim, _ = u.shape
        state = u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state
        return u.new_zeros(u.shape), state.float()
    y_zero, last_zero = scan_fn(**args, return_last_state=True)  # (B, D, L), (B, D, N)
    if initial_state is None:
        return y_zero, last_zero
    step = delta.float() + (0 if delta_bias is None else delta_bias.float()[None, :, None])
    step = F.softplus(step) if delta_softplus else step  # (B, D, L)
    decay = torch.exp(A.float()[None, :, None, :] * step.cumsum(-1).unsqueeze(-1))  # (B, D, L, N)
    h0 = initial_state.float()  # (B, D, N)
    carried = (decay * h0.unsqueeze(2) * C.float().transpose(1, 2).unsqueeze(1)).sum(-1)  # (B, D, L)
    if z is not None:
        carried = carried * F.silu(z.float())
    y = (y_zero.float() + carried).to(y_zero.dtype)
    return y, last_zero.float() + decay[:, :, -1] * h0
