"""The one sequence builder: splice speech embeddings into text embeddings and build the label window.

Per sample the LM input is (spec §2)

    prefix ids | speech rows | suffix ids | [state id | assistant ids] | response ids + EOS

right-padded to the longest sample. `labels[b, t]` is the target of the logits at position t (next-token
targets, already shifted), -100 where no loss is taken. Targets exist only for the state token (predicted from
the last suffix position, i.e. the last token of "<|endofspeech|>") and for the response + EOS. The speech,
the prompts and the "\\n<|assistant|>\\n" tokens never carry loss. `state_mask` and `response_mask` say which
labels are which, so that the paper's L_state + L_response can be taken separately (src/objectives.py).

True per-sample speech lengths are used (the reference recovered them from round(relative length x max)).

Multi-turn samples (stages 3-4, `context`): the current turn follows earlier turns laid out exactly as the duplex
engine keeps a conversation in its speaker state (duplex/session.py, `listener_context: conversation`):

    turn 1:   prompt | speech | "<|endofspeech|><|endofuser|>\n<|assistant|>\n" | reply as said + EOS
    turn k:   join | prompt | speech | (same head) | reply as said + EOS
    current:  join | prefix | speech | suffix | state | assistant | response + EOS

"join" is "\n". An earlier reply that ended is followed by its EOS (the engine feeds a sampled EOS); one that was
interrupted is cut where the next turn began and closed with EOS the same way (the engine's "<eos><|user|>"
join), so both look alike. Earlier turns are always answered ones (an ignored turn leaves no trace in the
engine's state; a forced reply also goes through <|endofuser|>). Only the current turn's state token and reply
carry loss.
"""
from __future__ import annotations

import dataclasses
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
    speech_start: torch.Tensor  # (B,) long; position of the current turn's first speech row
    speech: torch.Tensor | None = None  # (B, P, H) the current turn's adapter output the rows were built from
    speech_lens: torch.Tensor | None = None  # (B,) long; real rows of `speech`


@dataclass(frozen=True)
class EarlierTurn:
    """A turn before the current one of a multi-turn sample; never carries loss."""

    prompt_ids: tuple[int, ...]  # its user prompt, "<|user|>\n{sentence}\n<|beginofspeech|>"
    speech: int  # its row in `context_speech`
    reply_ids: tuple[int, ...]  # the reply as far as it was said before the next turn began (EOS is added)


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
    context: Sequence[Sequence[EarlierTurn]] | None = None,
    context_speech: torch.Tensor | None = None,
    context_speech_lens: torch.Tensor | None = None,
    join_ids: Sequence[int] = (),
    reply_head_ids: Sequence[int] = (),
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
    context : per sample, the earlier turns (multi-turn stages 3-4; see the module docstring), or None.
    context_speech, context_speech_lens : (C, Q, H) and (C,): the adapter output of every earlier turn's audio,
        indexed by `EarlierTurn.speech`.
    join_ids : ids of "\\n", between an EOS and the next user prompt.
    reply_head_ids : ids of "<|endofspeech|><|endofuser|>\\n<|assistant|>\\n", before an earlier reply.
    """
    batch = speech.shape[0]
    if speech_lens.shape != (batch,):
        raise ValueError(f"speech_lens must have shape ({batch},), got {tuple(speech_lens.shape)}")
    if batch and (int(speech_lens.max()) > speech.shape[1] or int(speech_lens.min()) < 0):
        raise ValueError(f"speech_lens {speech_lens.tolist()} must lie in [0, {speech.shape[1]}] (speech rows)")
    if len(prefix_ids) != batch:
        raise ValueError(f"got {len(prefix_ids)} prefixes for a batch of {batch} speech rows")
    suffix_ids = _per_sample(suffix_ids, batch)
    context = _checked_context(context, batch, context_speech, context_speech_lens, join_ids, reply_head_ids)
    rows = []
    for b in range(batch):
        head = _context_ids(context[b], context_speech_lens, list(join_ids), list(reply_head_ids), eos_id)
        rows.append(_layout(head + list(prefix_ids[b]), int(speech_lens[b]), list(suffix_ids[b]),
                            None if state_ids is None else state_ids[b], list(assistant_ids),
                            None if response_ids is None else list(response_ids[b]), eos_id))
    pieces = [[context_speech[turn.speech, :int(context_speech_lens[turn.speech])] for turn in context[b]]
              + [speech[b, :int(speech_lens[b])]] for b in range(batch)]  # speech rows in position order
    return dataclasses.replace(_assemble(embed, rows, pieces, speech.device), speech=speech, speech_lens=speech_lens)


def _checked_context(context, batch, context_speech, context_speech_lens, join_ids, reply_head_ids):
    """Per-sample lists of earlier turns ([] when single-turn), checked against the context speech."""
    if context is None:
        return [[] for _ in range(batch)]
    if len(context) != batch:
        raise ValueError(f"got context for {len(context)} samples in a batch of {batch}")
    used = [turn.speech for turns in context for turn in turns]
    if not used:
        return [list(turns) for turns in context]
    if context_speech is None or context_speech_lens is None:
        raise ValueError("earlier turns need context_speech and context_speech_lens (their audio's adapter output)")
    if not join_ids or not reply_head_ids:
        raise ValueError("earlier turns need join_ids (\"\\n\") and reply_head_ids (the answered turn's head)")
    if min(used) < 0 or max(used) >= context_speech.shape[0]:
        raise ValueError(f"EarlierTurn.speech {sorted(set(used))} must index the {context_speech.shape[0]} rows "
                         "of context_speech")
    return [list(turns) for turns in context]


def _context_ids(turns, context_speech_lens, join, reply_head, eos_id) -> list[int]:
    """The ids (SPEECH at speech positions) of the earlier turns and the join before the current prompt."""
    ids = []
    for turn in turns:
        ids += (join if ids else []) + list(turn.prompt_ids) + [SPEECH] * int(context_speech_lens[turn.speech])
        ids += reply_head + list(turn.reply_ids) + [eos_id]
    return ids + (join if ids else [])


@dataclass
class _Row:
    ids: list[int]  # token ids, SPEECH at speech positions
    targets: list[int]  # per position: the id this position's logits must predict, or IGNORE_INDEX
    kinds: list[str]  # per target: "state", "response" or ""
    speech_start: int  # position of the current turn's first speech row


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
    return _Row(ids, targets, kinds[1:] + [""], len(prefix))  # prefix includes any earlier turns


def _assemble(embed, rows: list[_Row], speech_pieces: list[list[torch.Tensor]], device) -> SequenceBatch:
    """Embed the ids and fill the SPEECH positions, per row in position order, from `speech_pieces`."""
    batch, width = len(rows), max(len(r.ids) for r in rows)
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
    speech_rows = torch.cat([p for pieces in speech_pieces for p in pieces])  # (sum of speech rows, H), row-major
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


def flatten_context(turns, wavs):
    """A batch's earlier turns as `build_sequences` takes them, and their audio as one padded batch.

    turns : per sample, a list of (prompt_ids, reply_ids) of its earlier turns, oldest first;
    wavs : per sample, the matching list of (N,) waveforms.
    Returns (context: per sample [EarlierTurn], audio (C, N_max), relative lengths (C,)), with
    `EarlierTurn.speech` indexing the rows of the audio batch; the audio is None when no sample has context.
    """
    context, flat = [], []
    for sample_turns, sample_wavs in zip(turns, wavs):
        if len(sample_turns) != len(sample_wavs):
            raise ValueError(f"{len(sample_turns)} earlier turns but {len(sample_wavs)} waveforms in one sample")
        context.append([EarlierTurn(tuple(prompt), len(flat) + i, tuple(reply))
                        for i, (prompt, reply) in enumerate(sample_turns)])
        flat += list(sample_wavs)
    if not flat:
        return context, None, None
    longest = max(w.shape[0] for w in flat)
    audio = torch.stack([torch.nn.functional.pad(w, (0, longest - w.shape[0])) for w in flat])  # (C, N_max)
    lengths = torch.tensor([w.shape[0] / longest for w in flat])  # (C,) relative, SpeechBrain's convention
    return context, audio, lengths


def _per_sample(ids, batch):
    """Accept one id list shared by the batch or one per sample."""
    if len(ids) > 0 and isinstance(ids[0], int):
        return [list(ids)] * batch
    if len(ids) != batch:
        raise ValueError(f"got {len(ids)} suffixes for a batch of {batch}")
    return ids
