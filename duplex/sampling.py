"""Next-token choice from logits: temperature, top-k, top-p (nucleus) or greedy, with an explicit generator.

Same filter order and tie rules as transformers' sampling (temperature -> top-k -> top-p, at least one
token kept), which is what the reference used through ``generate``; but pure functions with a
caller-owned ``torch.Generator``, so a conversation replays exactly from its seed and two branches can
draw from separate streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token. ``temperature == 0`` or ``greedy`` means argmax."""

    temperature: float = 1.0  # logits are divided by it (0 = greedy)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0 = no limit)
    greedy: bool = False  # argmax, ignoring the other fields

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig: temperature must be >= 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig: top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig: top_k must be >= 0 (0 disables it), got {self.top_k}.")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties at the k-th are kept). (B, V)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches ``top_p`` (at least one). (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # (B, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1] = False  # the most likely token always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V); returns (B,) int64.

    Example
    -------
    >>> logits = torch.tensor([[0.0, 5.0, 1.0]])
    >>> sample(logits, SamplingConfig(greedy=True)).tolist()
    [1]
    >>> g = torch.Generator().manual_seed(0)
    >>> sample(logits, SamplingConfig(temperature=1.0, top_k=1), g).tolist()
    [1]
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be (B, V); got {tuple(logits.shape)}.")
    logits = logits.float()
    if config.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / config.temperature, config.top_k), config.top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def sample_among(logits: torch.Tensor, candidates, config: SamplingConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one of the ``candidates`` token ids per row of ``logits`` (B, V), as ``sample`` does on their logits
    alone (the state-token probe: the reference sampled the whole vocabulary). Returns (B,) int64 token ids.

    Example
    -------
    >>> sample_among(torch.tensor([[9.0, 1.0, 2.0, 0.0]]), [1, 3], SamplingConfig(greedy=True)).tolist()
    [1]
    """
    ids = torch.as_tensor(candidates, dtype=torch.long, device=logits.device)  # (C,)
    return ids[sample(logits[:, ids], config, generator)]  # (B,)
