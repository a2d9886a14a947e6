"""Model work a duplex conversation asks for: small requests that ``duplex.scheduler`` executes batched.

A session never calls the model. Its per-slice logic is a generator that yields one of these requests (or a
tuple of compute requests that may run in the same round) and receives the result::

    speech = yield Encode(wav)                                      # (1, P, H), P may be 0
    state = yield Fork(speaker_state)                               # a new branch
    (probe, logits), speaker_logits = yield (Prefill(listener, (prefix, speech, marker), fork_at=k),
                                             Step(speaker_state, token))
    token = yield Sample(logits, config, generator)                 # with the session's own generator

so one scheduler can run the work of 1 or N conversations together: every ``Encode`` of a round in one encoder
pass, every ``Prefill`` in one variable-length pass, every ``Step`` in one decode step. ``Fork``, ``NewState``,
``Release`` and ``Sample`` are cheap (row copies, bookkeeping, a choice from logits already computed): they are
answered before the round's model work, batched (one argmax for all greedy choices), without costing a round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Encode:
    """Speech embeddings of ``wav`` (N,) float32 16 kHz, N > 0 -> (1, P, H); P is 0 for a slice too short for
    one position."""

    wav: torch.Tensor


@dataclass(frozen=True, eq=False)
class Prefill:
    """Feed a chunk onto ``state`` (one row), continuing from it; result: fp32 logits (1, V) of its last position.

    ``pieces``: the chunk, in order: tuples of token ids and/or (1, P, H) / (P, H) embeddings (empty pieces
    are skipped; the whole chunk must not be empty). With ``fork_at`` = k (0 < k < chunk length) the request is
    a probe: ``state`` keeps only the first k positions, a new branch takes the whole chunk, and the result is
    (new branch, its logits (1, V)).
    """

    state: object
    pieces: tuple
    fork_at: int | None = None


@dataclass(frozen=True, eq=False)
class Step:
    """Feed one token id onto ``state``; result: fp32 logits (1, V) (one decode step)."""

    state: object
    token: int


@dataclass(frozen=True, eq=False)
class Fork:
    """A new branch with the content of ``state``; result: the new state."""

    state: object


@dataclass(frozen=True, eq=False)
class NewState:
    """A new branch with the empty context; result: the new state."""


@dataclass(frozen=True, eq=False)
class Release:
    """``state`` is no longer used (its pool row is free again); result: None."""

    state: object


@dataclass(frozen=True, eq=False)
class Sample:
    """Choose a token from ``logits`` (1, V) as ``duplex.sampling.sample`` does with ``generator`` (the
    session's own stream); ``among``: only these ids (``sample_among``, the state-token probe). Result: int."""

    logits: torch.Tensor
    config: object  # SamplingConfig
    generator: object  # torch.Generator
    among: tuple[int, ...] | None = None


COMPUTE = (Encode, Prefill, Step)  # model passes: one batched pass per kind and round
CHEAP = (Fork, NewState, Release, Sample)  # answered between rounds


def chunk_length(pieces: tuple) -> int:
    """Positions of a ``Prefill`` chunk (ids count one each, embeddings one per row)."""
    return sum(_piece_length(piece) for piece in pieces)


def _piece_length(piece) -> int:
    if isinstance(piece, torch.Tensor):
        if piece.dim() == 3 and piece.shape[0] == 1:
            return piece.shape[1]
        if piece.dim() == 2:
            return piece.shape[0]
        raise ValueError(f"Prefill: an embeddings piece must be (1, P, H) or (P, H); got {tuple(piece.shape)}.")
    return len(piece)
