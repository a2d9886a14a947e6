"""The one sequence builder: splice speech embeddings into text embeddings and build the label window.

Per sample the LM input is (spec §2)

    prefix ids | speech rows | suffix ids | [state id | assistant ids] | response ids + EOS

right-padded to the longest sample. `labels[b, t]` is the target of the logits at position t (next-token
targets, already shifted), -100 where no loss is taken. Targets exist only for the state token (predicted from
the last suffix position, i.e. the last token of "<|endofspeech|>") and for the response + EOS. The speech,
the prompts and the "\\n<|assistant|>\\n" tokens never carry loss. `state_mask` and `response_mask` say which
labels are which, so that the paper's L_state + L_response can be taken separately (src/objectives.py).

True per-sample speech lengths are used (the reference recovered them from round(relative length x max)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

IGNORE_INDEX = -100
SPEECH = -1  # placeholder id of a speech position while the layout is assembled


@dataclass
class SequenceBatch:
    inputs_embeds: torch.Tensor  # (B, L, H) right-padded with zeros
    labels: torch.Tensor  # (B, L) long; next-token target of position t, or -100
    state_mask: torch.Tensor  # (B, L) bool; labels that are the state token
    response_mask: torch.Tensor  # (B, L) bool; labels that are response tokens or the closing EOS
    lengths: torch.Tensor  # (B,) long; real (unpadded) length of each row
    speech_start: torch.Tensor  # (B,) long; position of the first speech row (= prefix length)


def build_sequences(
    embed: Callable[[torch.Tensor], torch.Tensor],
    prefix_ids: Sequence[Sequence[int]],
    speech: torch.Tensor,
    speech_lens: torch.Tensor,
    suffix_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]] | None = None,
    state_ids: Sequence[int] | None = None,
    assistant_ids: Sequence[int] = (),
    eos_id: int = 0,
) -> SequenceBatch:
    """Assemble a batch for one LM pass.

    Arguments
    ---------
    embed : token ids (B, L) -> embeddings (B, L, H), e.g. `MambaLM.embed`.
    prefix_ids : per sample, the ids before the speech (the user prompt).
    speech : (B, P, H) adapter output, padded; `speech_lens` (B,) says how many rows of each are real.
    suffix_ids : per sample (or one list for all), the ids after the speech: "<|endofspeech|>" (stages 3-4,
        inference) or "<|endofspeech|><|endofuser|>\\n<|assistant|>\\n" (stages 1-2).
    response_ids : per sample, the reply without EOS; None builds the prompt alone (inference).
    state_ids : per sample, the state token id (stages 3-4), or None (stages 1-2, inference).
    assistant_ids : ids of "\\n<|assistant|>\\n", placed after the state token (stages 3-4) without loss.
    eos_id : appended after each response and used as its last target.
    """
    batch = speech.shape[0]
    if speech_lens.shape != (batch,):
        raise ValueError(f"speech_lens must have shape ({batch},), got {tuple(speech_lens.shape)}")
    if batch and (int(speech_lens.max()) > speech.shape[1] or int(speech_lens.min()) < 0):
        raise ValueError(f"speech_lens {speech_lens.tolist()} must lie in [0, {speech.shape[1]}] (speech rows)")
    if len(prefix_ids) != batch:
        raise ValueError(f"got {len(prefix_ids)} prefixes for a batch of {batch} speech rows")
    suffix_ids = _per_sample(suffix_ids, batch)
    rows = [_layout(list(prefix_ids[b]), int(speech_lens[b]), list(suffix_ids[b]),
                    None if state_ids is None else state_ids[b], list(assistant_ids),
                    None if response_ids is None else list(response_ids[b]), eos_id)
            for b in range(batch)]
    return _assemble(embed, rows, speech, speech_lens)


@dataclass
class _Row:
    ids: list[int]  # token ids, SPEECH at speech positions
    targets: list[int]  # per position: the id this position's logits must predict, or IGNORE_INDEX
    kinds: list[str]  # per target: "state", "response" or ""
    speech_start: int


def _layout(prefix, n_speech, suffix, state, assistant, response, eos_id) -> _Row:
    """One sample's ids and its shifted targets."""
    if not suffix:
        raise ValueError("suffix_ids must not be empty: the state token / reply is predicted from its last token")
    ids = prefix + [SPEECH] * n_speech + suffix
    kinds = [""] * len(ids)  # kind of the token AT each position (shifted into a target below)
    if state is not None:
        ids += [state] + assistant
        kinds += ["state"] + [""] * len(assistant)
    if response is not None:
        ids += response + [eos_id]
        kinds += ["response"] * (len(response) + 1)
    targets = [ids[t + 1] if kinds[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return _Row(ids, targets, kinds[1:] + [""], len(prefix))


def _assemble(embed, rows: list[_Row], speech: torch.Tensor, speech_lens: torch.Tensor) -> SequenceBatch:
    batch, width = len(rows), max(len(r.ids) for r in rows)
    device = speech.device
    ids = torch.full((batch, width), 0, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    is_speech = torch.zeros(batch, width, dtype=torch.bool)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    state_mask = torch.zeros(batch, width, dtype=torch.bool)
    response_mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row.ids)
        row_ids = torch.tensor(row.ids)
        is_speech[b, :n] = row_ids == SPEECH
        ids[b, :n] = row_ids.clamp(min=0)
        labels[b, :n] = torch.tensor(row.targets)
        valid[b, :n] = True
        state_mask[b, :n] = torch.tensor([k == "state" for k in row.kinds])
        response_mask[b, :n] = torch.tensor([k == "response" for k in row.kinds])
    ids, is_speech, valid = ids.to(device), is_speech.to(device), valid.to(device)
    text = embed(ids)  # (B, L, H)
    positions = torch.arange(speech.shape[1], device=device)
    speech_rows = speech[positions[None, :] < speech_lens.to(device)[:, None]]  # (sum P_b, H), row-major
    inputs = text.masked_scatter(is_speech[..., None], speech_rows.to(text.dtype))  # (B, L, H)
    inputs = inputs * valid[..., None].to(inputs.dtype)  # zero right padding
    return SequenceBatch(
        inputs_embeds=inputs,
        labels=labels.to(device),
        state_mask=state_mask.to(device),
        response_mask=response_mask.to(device),
        lengths=valid.sum(dim=1),
        speech_start=torch.tensor([r.speech_start for r in rows], device=device),
    )


def _per_sample(ids, batch):
    """Accept one id list shared by the batch or one per sample."""
    if len(ids) > 0 and isinstance(ids[0], int):
        return [list(ids)] * batch
    if len(ids) != batch:
        raise ValueError(f"got {len(ids)} suffixes for a batch of {batch}")
    return ids
