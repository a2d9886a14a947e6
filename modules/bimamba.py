"""Bidirectional Mamba block ("BiMamba v2", as in Vim / Mamba-ASR) used inside every ConMamba layer.

Both directions share the input projection (x and gate z) and the output projection; each direction has
its own causal depthwise conv, x/dt projections, A and D. The backward direction runs the same causal
machinery on the time-reversed sequence and is reversed back, and the two outputs are averaged before
``out_proj``. Unlike the reference's non-fused path, the backward direction is computed on every
backend: the scan backend is only the recurrence (see ``modules/selective_scan.py``).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.selective_scan import select_scan_backend


def _init_dt_proj(dt_proj, dt_rank, dt_min, dt_max, dt_init_floor, dt_scale):
    """Initialise like mamba-ssm: small uniform weight, bias = softplus^-1 of dt ~ logU[dt_min, dt_max]."""
    bound = dt_rank ** -0.5 * dt_scale
    nn.init.uniform_(dt_proj.weight, -bound, bound)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)  # (d_inner,)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
    dt_proj.bias._no_reinit = True


def _log_a_init(d_inner, d_state):
    """S4D-real initialisation: A = -(1..N) for every channel, stored as log(1..N)."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
    log_a = nn.Parameter(torch.log(a))
    log_a._no_weight_decay = True
    return log_a


def reverse_valid_frames(x, lengths):
    """Reverse each row's first ``lengths[b]`` time steps of (B, C, L) ``x``, leaving padding in place.

    With ``lengths=None`` the whole time axis is flipped (the reference behaviour). Applying it twice
    is the identity, so the same call undoes it.
    """
    if lengths is None:
        return x.flip(-1)
    steps = torch.arange(x.shape[-1], device=x.device)  # (L,)
    lengths = lengths.to(x.device).clamp(max=x.shape[-1]).view(-1, 1)  # (B, 1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (B, L)
    return x.gather(-1, index.unsqueeze(1).expand_as(x))


def scan_inputs(xz, conv1d, x_proj, dt_proj, log_a, skip, dt_rank, d_state):
    """One Mamba direction's selective-scan arguments from ``xz`` (B, 2*d_inner, L) in its own time order:
    causal depthwise conv + SiLU on x, x/dt projections; z is the gate. Shared by ``BiMamba`` (each direction)
    and ``CausalMamba``. Returns mamba-ssm's keyword names (u, delta, A, B, C, D, z, delta_bias, delta_softplus).
    """
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
    x = F.silu(conv1d(x)[..., :length])  # causal: keep the first L outputs of the padded conv
    x_dbl = x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
    dt, b_mat, c_mat = x_dbl.split([dt_rank, d_state, d_state], dim=-1)
    delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L), bias added inside the scan
    return dict(u=x.contiguous(), delta=delta.contiguous(), A=-torch.exp(log_a.float()),
                B=b_mat.transpose(1, 2).contiguous(), C=c_mat.transpose(1, 2).contiguous(),
                D=skip.float(), z=z.contiguous(), delta_bias=dt_proj.bias.float(), delta_softplus=True)


def _direction_params(d_inner, d_state, d_conv, dt_rank, conv_bias, dt_min, dt_max, dt_init_floor, dt_scale):
    """One scan direction's (conv1d, x_proj, dt_proj, A_log, D), created and initialised as mamba-ssm does, in
    that order (the random draws follow it). BiMamba makes two sets, CausalMamba one."""
    conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
    x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
    _init_dt_proj(dt_proj, dt_rank, dt_min, dt_max, dt_init_floor, dt_scale)
    a_log = _log_a_init(d_inner, d_state)
    skip = nn.Parameter(torch.ones(d_inner))
    skip._no_weight_decay = True
    return conv1d, x_proj, dt_proj, a_log, skip


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer with reference parameter names (``conv1d``/``conv1d_b``, ``A_log``/``A_b_log``...).

    Parameters
    ----------
    d_model : int
        Model width (input and output size).
    d_state : int
        SSM state size N.
    d_conv : int
        Causal depthwise conv kernel.
    expand : int
        d_inner = expand * d_model.
    dt_rank : int or "auto"
        Rank of the dt projection; "auto" = ceil(d_model / 16).
    dt_min, dt_max, dt_init_floor, dt_scale : float
        mamba-ssm dt initialisation.
    conv_bias, bias : bool
        Bias of the depthwise convs and of in/out projections.

    Example
    -------
    >>> mixer = BiMamba(d_model=16, d_state=4)
    >>> mixer(torch.randn(2, 7, 16)).shape
    torch.Size([2, 7, 16])
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4, dt_scale=1.0, conv_bias=True, bias=False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        for names in (("conv1d", "x_proj", "dt_proj", "A_log", "D"),
                      ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")):
            params = _direction_params(self.d_inner, d_state, d_conv, self.dt_rank, conv_bias, dt_min, dt_max,
                                       dt_init_floor, dt_scale)
            for name, value in zip(names, params):
                setattr(self, name, value)

    def direction_params(self, backward):
        """The per-direction modules and parameters: (conv1d, x_proj, dt_proj, A_log, D)."""
        if backward:
            return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    def scan_inputs(self, xz, backward):
        """Arguments of the selective scan for one direction, given ``xz`` (B, 2*d_inner, L) in its time order.

        Returns a dict with mamba-ssm's keyword names (u, delta, A, B, C, D, z, delta_bias, delta_softplus).
        """
        return scan_inputs(xz, *self.direction_params(backward), dt_rank=self.dt_rank, d_state=self.d_state)

    def forward(self, hidden_states, lengths=None, scan_fn=None):
        """Mix (B, L, d_model) -> (B, L, d_model) in both time directions.

        Parameters
        ----------
        hidden_states : torch.Tensor
            (B, L, d_model) input.
        lengths : torch.Tensor, optional
            (B,) valid frames per row. When given, the backward direction starts at each row's last
            valid frame instead of in the padding (the reference always started at the padded end).
        scan_fn : callable, optional
            Override the scan backend (tests compare backends); default ``select_scan_backend``.
        """
        if scan_fn is None:
            scan_fn, _ = select_scan_backend(hidden_states.device)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        y_fwd = scan_fn(**self.scan_inputs(xz, backward=False))  # (B, d_inner, L)
        xz_rev = reverse_valid_frames(xz, lengths)  # (B, 2*d_inner, L)
        y_bwd = reverse_valid_frames(scan_fn(**self.scan_inputs(xz_rev, backward=True)), lengths)
        return self.out_proj((0.5 * (y_fwd + y_bwd)).transpose(1, 2))  # (B, L, d_model)


class CausalMamba(nn.Module):
    """One-direction (causal) Mamba mixer with mamba-ssm's parameter names (``in_proj``, ``conv1d``, ``x_proj``,
    ``dt_proj``, ``A_log``, ``D``, ``out_proj``): the self- and cross-mixers of the Mamba ASR decoder
    (modules/asr_decoder.py). Same initialisation and scan backends as ``BiMamba``.

    Example
    -------
    >>> mixer = CausalMamba(d_model=16, d_state=4)
    >>> x = torch.randn(1, 7, 16)
    >>> torch.allclose(mixer(x)[:, :4], mixer(x[:, :4]), atol=1e-6)  # output at t sees only inputs <= t
    True
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4, dt_scale=1.0, conv_bias=True, bias=False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _direction_params(
            self.d_inner, d_state, d_conv, self.dt_rank, conv_bias, dt_min, dt_max, dt_init_floor, dt_scale)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states, scan_fn=None):
        """(B, L, d_model) -> (B, L, d_model); position t depends on inputs 0..t only."""
        if scan_fn is None:
            scan_fn, _ = select_scan_backend(hidden_states.device)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        y = scan_fn(**scan_inputs(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D,
                                  dt_rank=self.dt_rank, d_state=self.d_state))  # (B, d_inner, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)
