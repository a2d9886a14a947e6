"""Validation/test statistics, accumulated as sums over the batches of a stage.

Under DDP every process validates the whole set (SpeechBrain does not shard valid/test), so no reduction is
needed; the main process's numbers are the ones logged and stored with the checkpoint. (The training loss is
not reduced either: the logged one is the main process's share of the batches.)

Fixes spec §8.10/§8.13: accuracy counts only labelled positions (never the -100 padding), perplexity is
exp(mean plain NLL) without label smoothing, and the state-token accuracy is kept separately.
"""
import math

import torch

from duplex.state import MambaState
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
def greedy_decode(runtime, prompts, max_new_tokens, eos_id=0):
    """Greedy continuations of several prompts at once, each (L_i, H); per prompt the ids without the EOS.

    Greedy rather than sampled (the reference sampled, spec §8.10) so test scores are reproducible. All rows
    are prefilled in one ragged pass and then step together (one LM pass per new token for the whole batch,
    not per row: a stage's test decodes hundreds of transcripts); a row that has said EOS keeps stepping, and
    what it says after is dropped. Row results equal decoding each prompt alone (tests/test_metrics.py).
    """
    states = [runtime.new_state(1) for _ in prompts]
    logits = runtime.prefill_rows(states, list(prompts))  # (R, V)
    state = states[0] if len(states) == 1 else MambaState.cat(states)
    ids = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for _ in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)  # (R,)
        for row, token in enumerate(next_ids.tolist()):
            finished[row] = finished[row] or token == eos_id
            if not finished[row]:
                ids[row].append(token)
        if all(finished):
            break
        logits = runtime.step(state, runtime.embed(next_ids[:, None]))  # (R, V)
    return ids
