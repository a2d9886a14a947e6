"""Recurrent runtime of a Mamba-1 LM over explicit ``MambaState``s: exact chunked prefill and steps.

Why not transformers' own forward with a cache: no transformers version can add a multi-token chunk
to a live Mamba state (4.x reads only the first token, 5.x restarts the scan from zero; see
``../shared/spec/kernels_and_limits.md`` §0). The duplex engine adds each speech slice to a live
state, so the mixer math is written here once, continuing from the state:

    RMSNorm (residual in fp32) -> in_proj -> causal conv from the conv state (SiLU) -> x_proj ->
    dt_proj + softplus -> selective scan from the SSM state -> * SiLU(z) -> out_proj;  norm_f -> lm_head

with transformers' ``MambaForCausalLM`` weights read in place (never copied), so one set of weights
serves any number of branches. A single-token ``step`` is a chunk of length 1; a GPU backend
(``duplex/cuda_runtime.py``) replaces ``prefill``/``step`` behind the same ``Runtime`` protocol.

The batched operations the scheduler (``duplex/scheduler.py``) runs over any set of branches are defined here:
``prefill_many`` (chunks of different lengths onto their rows in one pass, right-padded; a padded position
changes nothing: its time step is 0, so the SSM state stays, and each row's conv state is taken at its own
end; optional probe forks), ``step_many`` (one token for many rows), ``fork_many`` / ``release_many``.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from duplex.state import MambaState
from modules.selective_scan import selective_scan_ref


class Runtime(Protocol):
    """What the duplex session needs from an LM backend (see docs/DESIGN.md)."""

    config: object

    def new_state(self, batch_size: int = 1) -> MambaState: ...

    def fork(self, state: MambaState) -> MambaState: ...

    def release(self, state: MambaState) -> None: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def prefill(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor: ...

    def prefill_all_logits(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor: ...

    def step(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor: ...

    def prefill_and_fork(self, state: MambaState, embeds: torch.Tensor,
                         fork_at: int) -> tuple[MambaState, torch.Tensor]: ...

    def prefill_fork_and_step(self, state: MambaState, embeds: torch.Tensor, fork_at: int, other: MambaState,
                              other_embeds: torch.Tensor) -> tuple[MambaState, torch.Tensor, torch.Tensor]: ...

    # batched over branches (duplex/scheduler.py): every state is one row
    def prefill_many(self, states: list[MambaState], chunks: list[torch.Tensor],
                     fork_at: list[int | None] | None = None) -> tuple[torch.Tensor, list[MambaState | None]]: ...

    def step_many(self, states: list[MambaState], embeds: torch.Tensor) -> torch.Tensor: ...

    def fork_many(self, states: list[MambaState]) -> list[MambaState]: ...

    def release_many(self, states: list[MambaState]) -> None: ...


def check_many(states, chunks, fork_at) -> list[int | None]:
    """Validate ``prefill_many``'s arguments (one row per state, (L_i, H) chunks, forks inside); ``fork_at``."""
    fork_at = [None] * len(states) if fork_at is None else list(fork_at)
    if not len(states) == len(chunks) == len(fork_at):
        raise ValueError(f"prefill_many: {len(states)} states, {len(chunks)} chunks and {len(fork_at)} fork "
                         "positions; give one of each per branch.")
    for i, (state, chunk, at) in enumerate(zip(states, chunks, fork_at)):
        if state.batch_size != 1:
            raise ValueError(f"prefill_many: state {i} has {state.batch_size} rows; pass one branch (row) each.")
        if chunk.dim() != 2 or chunk.shape[0] < 1:
            raise ValueError(f"prefill_many: chunk {i} must be (L >= 1, H); got {tuple(chunk.shape)}.")
        if at is not None and not 0 < at < chunk.shape[0]:
            raise ValueError(f"prefill_many: fork_at {at} of chunk {i} must be inside it (1..{chunk.shape[0] - 1}).")
    return fork_at


def prefill_many_by_definition(runtime, states, chunks, fork_at=None):
    """``prefill_many`` composed of batched plain prefills: every row takes its chunk up to its fork position
    (all of it without one); the forked rows are forked; the forks take the rest. Returns (logits (B, V) of
    each row's last position, the fork's for forked rows; list of forks or None). The reference for backends
    that fork inside the pass (the GPU one)."""
    fork_at = check_many(states, chunks, fork_at)
    heads = [chunk if at is None else chunk[:at] for chunk, at in zip(chunks, fork_at)]
    logits = runtime.prefill_rows(states, heads)  # (B, V)
    forks: list[MambaState | None] = [None] * len(states)
    forked = [i for i, at in enumerate(fork_at) if at is not None]
    if forked:
        new = runtime.fork_many([states[i] for i in forked])
        logits[forked] = runtime.prefill_rows(new, [chunks[i][fork_at[i]:] for i in forked])
        for i, state in zip(forked, new):
            forks[i] = state
    return logits, forks


def prefill_then_fork(runtime, state: MambaState, embeds: torch.Tensor, fork_at: int):
    """``prefill_and_fork`` by its definition: ``state`` takes ``embeds[:, :fork_at]``; a fork of it takes the
    rest; returns (fork, the fork's last logits). The reference for backends that do it in one pass."""
    if embeds.dim() != 3 or not 0 < fork_at < embeds.shape[1]:
        raise ValueError(f"prefill_and_fork: fork_at must be inside the chunk (1..L-1); got {fork_at} for "
                         f"embeds of shape {tuple(embeds.shape)}.")
    runtime.prefill(state, embeds[:, :fork_at])
    fork = runtime.fork(state)
    return fork, runtime.prefill(fork, embeds[:, fork_at:])


def prefill_fork_then_step(runtime, state: MambaState, embeds: torch.Tensor, fork_at: int, other: MambaState,
                           other_embeds: torch.Tensor):
    """``prefill_fork_and_step`` by its definition: ``runtime.prefill_and_fork`` then ``runtime.step`` of
    ``other`` (a different branch); returns (fork, fork's logits, other's logits)."""
    fork, logits = runtime.prefill_and_fork(state, embeds, fork_at)
    return fork, logits, runtime.step(other, other_embeds)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MambaRMSNorm: normalise in fp32, cast back to the input dtype, scale."""
    input_dtype = hidden.dtype
    h32 = hidden.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(input_dtype)


def _causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, ends: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv of a chunk continuing from ``conv_state`` (updated in place), then SiLU.

    x: (B, D, L); conv_state: (B, D, K) holds the last K inputs (zeros = start of sequence). ``ends`` (B,):
    each row's real length; its new conv state is the K inputs before its own end (padding is never kept).
    """
    seq_len, kernel = x.shape[-1], conv_state.shape[-1]
    window = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)  # (B, D, K + L)
    if ends is None:
        conv_state.copy_(window[:, :, -kernel:])
    else:
        taps = (ends[:, None] + torch.arange(kernel, device=ends.device)[None, :])  # (B, K) window positions
        conv_state.copy_(torch.gather(window, 2, taps[:, None, :].expand(-1, window.shape[1], -1)))
    out = F.conv1d(window.to(weight.dtype), weight, bias, groups=x.shape[1])  # (B, D, L + 1)
    return F.silu(out[:, :, -seq_len:]).to(x.dtype)  # (B, D, L)


class TorchMambaRuntime:
    """Pure-torch recurrent runtime over a transformers ``MambaForCausalLM`` (CPU-correct reference).

    Example
    -------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> lm = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                                   state_size=4, expand=2, conv_kernel=4)).eval()
    >>> rt = TorchMambaRuntime(lm)
    >>> state = rt.new_state()
    >>> logits = rt.prefill(state, rt.embed(torch.tensor([[1, 2, 3]])))
    >>> tuple(logits.shape), state.seqlen
    ((1, 50), [3])
    """

    def __init__(self, hf_model):
        self.model = hf_model
        self.config = hf_model.config
        self.backbone = hf_model.backbone
        self.lm_head = hf_model.lm_head
        first_mixer = self.backbone.layers[0].mixer
        self.d_inner = first_mixer.intermediate_size
        self.d_state = first_mixer.ssm_state_size
        self.d_conv = first_mixer.conv_kernel_size
        self.dt_rank = first_mixer.time_step_rank

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_state(self, batch_size: int = 1) -> MambaState:
        """Zero state (empty context) for ``batch_size`` rows on the model's device."""
        return MambaState.zeros(len(self.backbone.layers), batch_size, self.d_inner, self.d_conv,
                                self.d_state, dtype=self.dtype, device=self.device)

    def fork(self, state: MambaState) -> MambaState:
        """A new branch with the content of ``state`` (a pooled backend hands out a pool row instead)."""
        return state.clone()

    def release(self, state: MambaState) -> None:
        """A branch is no longer used; nothing to do here (a pooled backend frees its rows)."""

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> input embeddings (B, L, H)."""
        return self.backbone.embeddings(ids.to(self.device))  # (B, L, H)

    @torch.no_grad()
    def prefill(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor:
        """Feed a chunk (B, L, H), L >= 1, continuing exactly from ``state``; logits (B, V) of the last position."""
        hidden = self._backbone(state, embeds)  # (B, L, H) fp32
        return self._logits(hidden[:, -1:])[:, 0]  # (B, V)

    @torch.no_grad()
    def prefill_all_logits(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor:
        """As ``prefill`` but return the logits of every position (B, L, V) (teacher forcing, tests)."""
        return self._logits(self._backbone(state, embeds))  # (B, L, V)

    def prefill_and_fork(self, state: MambaState, embeds: torch.Tensor,
                         fork_at: int) -> tuple[MambaState, torch.Tensor]:
        """``state`` takes the first ``fork_at`` positions of ``embeds`` (B, L, H); a new branch continues from
        there with the rest; returns (branch, its last logits (B, V)). The session's state-token probe:
        speech on the listener, ``<|endofspeech|>`` on a fork (the GPU backend does both in one pass)."""
        return prefill_then_fork(self, state, embeds, fork_at)

    def prefill_fork_and_step(self, state: MambaState, embeds: torch.Tensor, fork_at: int, other: MambaState,
                              other_embeds: torch.Tensor) -> tuple[MambaState, torch.Tensor, torch.Tensor]:
        """``prefill_and_fork(state, embeds, fork_at)`` and ``step(other, other_embeds)`` (the speaker's next
        token while the listener takes its slice); returns (fork, fork's logits, other's logits). The GPU
        backend does both in one pass over the weights."""
        return prefill_fork_then_step(self, state, embeds, fork_at, other, other_embeds)

    # ------------------------------------------------------------------ batched over branches
    def prefill_many(self, states: list[MambaState], chunks: list[torch.Tensor],
                     fork_at: list[int | None] | None = None) -> tuple[torch.Tensor, list[MambaState | None]]:
        """Chunk i (L_i, H) onto ``states[i]`` (one row each) in one right-padded pass; with ``fork_at[i]`` = k
        the state keeps the first k positions and a new branch takes all of it (the probe). Returns (fp32
        logits (B, V) of each row's last position, the fork's where forked; the forks, None elsewhere)."""
        return prefill_many_by_definition(self, states, chunks, fork_at)

    @torch.no_grad()
    def prefill_rows(self, states: list[MambaState], chunks: list[torch.Tensor]) -> torch.Tensor:
        """Chunk i (L_i, H) onto ``states[i]``, all rows in one pass (right-padded to the longest; a padded
        position has time step 0 and the conv state is taken at each row's own end, so padding changes
        nothing); logits (B, V) of each row's last real position."""
        lengths = [chunk.shape[0] for chunk in chunks]
        embeds = torch.nn.utils.rnn.pad_sequence([c.to(self.device, self.dtype) for c in chunks],
                                                 batch_first=True)  # (B, L, H)
        batch = states[0] if len(states) == 1 else MambaState.cat(states)
        ragged = len(set(lengths)) > 1
        hidden = self._backbone(batch, embeds, lengths if ragged else None)  # (B, L, H)
        last = hidden[torch.arange(len(states)), torch.tensor(lengths) - 1]  # (B, H)
        if len(states) > 1:
            for i, state in enumerate(states):
                state.copy_(batch.row(i))
        return self._logits(last[:, None])[:, 0]  # (B, V)

    def step_many(self, states: list[MambaState], embeds: torch.Tensor) -> torch.Tensor:
        """One token for several branches at once (rows of ``embeds`` (B, 1, H) follow ``states``' rows)."""
        if embeds.dim() != 3 or embeds.shape[1] != 1:
            raise ValueError(f"step_many takes one token per row (B, 1, H); got {tuple(embeds.shape)}.")
        if embeds.shape[0] != sum(s.batch_size for s in states):
            raise ValueError(f"step_many: {embeds.shape[0]} input rows for {sum(s.batch_size for s in states)} "
                             "state rows.")
        if len(states) == 1:
            return self.prefill(states[0], embeds)
        batch = MambaState.cat(states)
        logits = self.prefill(batch, embeds)  # (B, V)
        start = 0
        for state in states:
            state.copy_(batch.rows(start, start + state.batch_size))
            start += state.batch_size
        return logits

    def fork_many(self, states: list[MambaState]) -> list[MambaState]:
        """A new branch per state (copies)."""
        return [self.fork(state) for state in states]

    def release_many(self, states: list[MambaState]) -> None:
        for state in states:
            self.release(state)

    def step(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor:
        """Feed one token (B, 1, H); logits (B, V). The GPU backend swaps this for fused kernels."""
        if embeds.dim() != 3 or embeds.shape[1] != 1:
            raise ValueError(f"TorchMambaRuntime.step takes one token (B, 1, H); got {tuple(embeds.shape)}. "
                             "Use prefill for chunks.")
        return self.prefill(state, embeds)

    def _check_input(self, state: MambaState, embeds: torch.Tensor) -> None:
        hidden = self.config.hidden_size
        if embeds.dim() != 3 or embeds.shape[-1] != hidden or embeds.shape[1] < 1:
            raise ValueError(f"TorchMambaRuntime: embeds must be (B, L >= 1, H={hidden}); got "
                             f"{tuple(embeds.shape)}. Skip the call for an empty chunk.")
        if embeds.shape[0] != state.batch_size:
            raise ValueError(f"TorchMambaRuntime: {embeds.shape[0]} input rows for a state of "
                             f"{state.batch_size} rows.")

    def _backbone(self, state: MambaState, embeds: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """All blocks over the chunk, updating ``state`` in place; returns the fp32 residual stream.

        ``lengths`` (one per row): row i takes only its first lengths[i] positions (right padding)."""
        self._check_input(state, embeds)
        hidden = embeds.to(device=self.device, dtype=self.dtype)  # (B, L, H)
        ends = None if lengths is None else torch.tensor(lengths, device=self.device)  # (B,)
        for layer_idx, block in enumerate(self.backbone.layers):
            residual = hidden.float() if self.config.residual_in_fp32 else hidden
            normed = _rms_norm(hidden.to(block.norm.weight.dtype), block.norm.weight,
                               block.norm.variance_epsilon)  # (B, L, H)
            hidden = residual + self._mixer(block.mixer, normed, state.conv[layer_idx], state.ssm[layer_idx], ends)
        if lengths is None:
            state.advance(embeds.shape[1])
        else:
            state.set_seqlen([n + length for n, length in zip(state.seqlen, lengths)])
        return hidden

    def _mixer(self, mixer, hidden: torch.Tensor, conv_state: torch.Tensor,
               ssm_state: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
        """One Mamba-1 mixer over a chunk from (conv_state, ssm_state), both updated in place; ``ends`` (B,):
        each row's real length (positions beyond it are padding and leave the state as it was)."""
        x, gate = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, D, L) each
        x = _causal_conv(x, conv_state, mixer.conv1d.weight, mixer.conv1d.bias, ends)  # (B, D, L)
        dt, B, C = torch.split(mixer.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state],
                               dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
        dt = mixer.dt_proj.weight @ dt.transpose(1, 2)  # (B, D, L), bias added inside the scan
        bias, softplus = mixer.dt_proj.bias, True
        if ends is not None:  # time step 0 on padding: exp(0 * A) = 1 and no input, the SSM state stays
            real = torch.arange(dt.shape[-1], device=dt.device)[None, :] < ends[:, None]  # (B, L)
            dt = F.softplus(dt.float() + bias.float()[None, :, None]) * real[:, None, :]  # (B, D, L)
            bias, softplus = None, False
        y, last = selective_scan_ref(x, dt, -torch.exp(mixer.A_log.float()), B.transpose(1, 2),
                                     C.transpose(1, 2), D=mixer.D, z=gate, delta_bias=bias,
                                     delta_softplus=softplus, initial_state=ssm_state,
                                     return_last_state=True)  # (B, D, L), (B, D, N)
        ssm_state.copy_(last)
        return mixer.out_proj(y.transpose(1, 2).to(hidden.dtype))  # (B, L, H)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the residual stream (B, L, H) -> fp32 logits (B, L, V)."""
        norm_f = self.backbone.norm_f
        normed = _rms_norm(hidden, norm_f.weight, norm_f.variance_epsilon)
        return self.lm_head(normed.to(self.lm_head.weight.dtype)).float()  # (B, L, V)
