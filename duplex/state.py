"""Explicit recurrent state of a Mamba LM: the only thing a duplex branch owns.

A Mamba LM's whole context lives in a fixed-size state (per layer: the last ``d_conv`` inputs of the
causal conv and the (d_inner, d_state) SSM state), so a conversation branch is just a ``MambaState``.
Forking a branch is ``clone()``, rolling back or overwriting is ``copy_()``; neither touches weights.

Layout (shared with the GPU backend, ``duplex/cuda_runtime.py``): one contiguous tensor per kind with
the layer as leading dim, so fork/rollback is one ``copy_`` per kind and a CUDA graph can keep static
addresses::

    conv: (n_layer, B, d_inner, d_conv)   model dtype
    ssm:  (n_layer, B, d_inner, d_state)  float32 always (re-rounding it every step drifts in bf16)
    seqlen: list[int]                      tokens consumed per row, host side
"""
from __future__ import annotations

import torch


class MambaState:
    """Conv and SSM state of every layer for ``B`` rows, plus a per-row token counter.

    ``row(i)`` / ``rows(start, stop)`` return views: writing through a view (in-place runtime
    updates, ``copy_``, ``advance``) changes the parent, which is how several branches can be run as
    one batch and still be owned separately.

    Example
    -------
    >>> state = MambaState.zeros(n_layer=2, batch_size=1, d_inner=8, d_conv=4, d_state=4)
    >>> fork = state.clone(); _ = fork.ssm.add_(1.0); fork.advance(3)
    >>> bool(state.ssm.abs().sum() == 0), state.seqlen, fork.seqlen
    (True, [0], [3])
    >>> _ = state.copy_(fork); state.seqlen
    [3]
    """

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor, seqlen: list[int] | None = None,
                 *, _counts: list[int] | None = None, _rows: slice | None = None):
        if conv.dim() != 4 or ssm.dim() != 4 or conv.shape[:3] != ssm.shape[:3]:
            raise ValueError(f"MambaState: conv must be (n_layer, B, d_inner, d_conv) and ssm "
                             f"(n_layer, B, d_inner, d_state) with equal leading dims; got conv "
                             f"{tuple(conv.shape)}, ssm {tuple(ssm.shape)}.")
        if ssm.dtype != torch.float32:
            raise ValueError(f"MambaState: the SSM state must be float32 (got {ssm.dtype}); keep it in fp32 "
                             "and let the runtime cast on use.")
        self.conv = conv
        self.ssm = ssm
        batch = conv.shape[1]
        if _counts is None:
            counts = [0] * batch if seqlen is None else [int(n) for n in seqlen]
            if len(counts) != batch:
                raise ValueError(f"MambaState: seqlen has {len(counts)} entries for {batch} rows.")
            _counts, _rows = counts, slice(0, batch)
        self._counts = _counts  # shared with views of the same parent
        self._rows = _rows

    @classmethod
    def zeros(cls, n_layer: int, batch_size: int, d_inner: int, d_conv: int, d_state: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "MambaState":
        """Zero state = empty context (equals the zero padding of a full causal forward)."""
        conv = torch.zeros(n_layer, batch_size, d_inner, d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(n_layer, batch_size, d_inner, d_state, dtype=torch.float32, device=device)
        return cls(conv, ssm)

    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def seqlen(self) -> list[int]:
        """Tokens consumed so far, one count per row (a copy: use ``advance`` to change it)."""
        return self._counts[self._rows]

    def set_seqlen(self, counts: list[int]) -> None:
        """Set the per-row token counts (a runtime that wrote the rows' content itself)."""
        if len(counts) != self.batch_size:
            raise ValueError(f"MambaState.set_seqlen: {len(counts)} counts for {self.batch_size} rows.")
        self._counts[self._rows] = [int(n) for n in counts]

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` more tokens consumed by every row (called by the runtime)."""
        for i in range(*self._rows.indices(len(self._counts))):
            self._counts[i] += n_tokens

    def clone(self) -> "MambaState":
        """A fork: new buffers with the same content; later updates of either side never leak."""
        return MambaState(self.conv.clone(), self.ssm.clone(), list(self.seqlen))

    def copy_(self, src: "MambaState") -> "MambaState":
        """Overwrite this state in place with ``src`` (rollback / branch switch): one copy per kind."""
        if src.conv.shape != self.conv.shape or src.ssm.shape != self.ssm.shape:
            raise ValueError(f"MambaState.copy_: shapes differ (conv {tuple(src.conv.shape)} -> "
                             f"{tuple(self.conv.shape)}, ssm {tuple(src.ssm.shape)} -> {tuple(self.ssm.shape)}).")
        self.conv.copy_(src.conv)
        self.ssm.copy_(src.ssm)
        self._counts[self._rows] = src.seqlen
        return self

    def zero_(self) -> "MambaState":
        """Reset to the empty context in place."""
        self.conv.zero_()
        self.ssm.zero_()
        self._counts[self._rows] = [0] * self.batch_size
        return self

    def rows(self, start: int, stop: int) -> "MambaState":
        """View of rows ``start:stop`` sharing memory and counters with this state."""
        first, last, _ = self._rows.indices(len(self._counts))
        if not 0 <= start < stop <= last - first:
            raise IndexError(f"MambaState.rows({start}, {stop}) out of range for {last - first} rows.")
        view_rows = slice(first + start, first + stop)
        return MambaState(self.conv[:, start:stop], self.ssm[:, start:stop], _counts=self._counts,
                          _rows=view_rows)

    def row(self, i: int) -> "MambaState":
        """View of row ``i`` (batch size 1)."""
        return self.rows(i, i + 1)

    @classmethod
    def cat(cls, states: list["MambaState"]) -> "MambaState":
        """Stack branches into one batch (new buffers); ``rows`` of the result give them back."""
        conv = torch.cat([s.conv for s in states], dim=1)  # (n_layer, sum B, d_inner, d_conv)
        ssm = torch.cat([s.ssm for s in states], dim=1)  # (n_layer, sum B, d_inner, d_state)
        return cls(conv, ssm, [n for s in states for n in s.seqlen])

    def equal(self, other: "MambaState") -> bool:
        """Bit-identical content and counters (used by tests and sanity checks)."""
        return (self.seqlen == other.seqlen and torch.equal(self.conv, other.conv)
                and torch.equal(self.ssm, other.ssm))

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    def __repr__(self) -> str:
        n_layer, batch, d_inner, d_conv = self.conv.shape
        return (f"MambaState(n_layer={n_layer}, batch={batch}, d_inner={d_inner}, d_conv={d_conv}, "
                f"d_state={self.ssm.shape[-1]}, dtype={self.conv.dtype}, seqlen={self.seqlen})")
