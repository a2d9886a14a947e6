"""Validation/test statistics, accumulated as sums over the batches of a stage.

Under DDP every process validates the whole set (SpeechBrain does not shard valid/test), so no reduction is
needed; the main process's numbers are the ones logged and stored with the checkpoint. (The training loss is
not reduced either: the logged one is the main process's share of the batches.)

Fixes spec §8.10/§8.13: accuracy counts only labelled positions (never the -100 padding), perplexity is
exp(mean plain NLL) without label smoothing, and the state-token accuracy is kept separately.
"""
import math

import torch

from src.objectives import IGNORE_INDEX, unsmoothed_nll

_SUM_KEYS = ("nll", "tokens", "correct", "state_correct", "states")


class TeacherForcedStats:
    """Running sums over batches: NLL, labelled tokens, argmax hits, state-token hits.

    Summaries: `PPL` (exp of the mean NLL per labelled token), `ACC` (next-token argmax accuracy over labelled
    positions), `STATE_ACC` (argmax accuracy on the state token only; absent when the stage has none).
    """

    def __init__(self):
        self.sums = dict.fromkeys(_SUM_KEYS, 0.0)

    @torch.no_grad()
    def append(self, logits, labels, state_mask):
        """Add one batch: logits (B, L, V) aligned with labels (B, L) and the state-token mask (B, L)."""
        nll, tokens = unsmoothed_nll(logits, labels)
        labelled = labels != IGNORE_INDEX
        hits = (logits.argmax(dim=-1) == labels) & labelled  # (B, L)
        state = state_mask & labelled
        for key, value in (("nll", nll), ("tokens", tokens), ("correct", hits.sum()),
                           ("state_correct", (hits & state).sum()), ("states", state.sum())):
            self.sums[key] += float(value)

    def summarize(self):
        """Dict of PPL, ACC and (if any state token was seen) STATE_ACC."""
        tokens = max(self.sums["tokens"], 1.0)
        summary = {
            "PPL": math.exp(min(self.sums["nll"] / tokens, 50.0)),
            "ACC": self.sums["correct"] / tokens,
        }
        if self.sums["states"]:
            summary["STATE_ACC"] = self.sums["state_correct"] / self.sums["states"]
        return summary


@torch.no_grad()
def greedy_decode(runtime, prompt_embeds, max_new_tokens, eos_id=0):
    """Greedy continuation of one prompt (1, L, H) with a recurrent runtime; ids without the EOS.

    Greedy rather than sampled (the reference sampled, spec §8.10) so test scores are reproducible.
    """
    state = runtime.new_state(1)
    logits = runtime.prefill(state, prompt_embeds)  # (1, V)
    ids = []
    for _ in range(max_new_tokens):
        next_id = int(logits.argmax(dim=-1))
        if next_id == eos_id:
            break
        ids.append(next_id)
        logits = runtime.step(state, runtime.embed(torch.tensor([[next_id]], device=prompt_embeds.device)))
    return ids
