"""Training losses: the paper's L = L_state + L_response (eq. 3-5) and the reference's single averaged CE.

Both take the logit window the label builder aligned with the targets: `logits[b, t]` predicts `labels[b, t]`,
and `labels` is -100 wherever no loss is wanted. `state_mask` marks the one state-token target per sample
(stages 3-4); it is all False in stages 1-2, where both modes reduce to eq. 2 (the response loss alone).

* `paper` (default): L_state = mean over samples of the state token's CE (eq. 3), L_response = mean over the
  response tokens (incl. EOS) of their CE (eq. 4), L = L_state + L_response (eq. 5). The state decision thus weighs
  as much as the whole reply, which is what eq. 5 says; eq. 4's sum over tokens is taken as a per-token mean so the
  loss scale (and the learning rates of spec §3) does not depend on reply length.
* `reference`: one label-smoothed CE averaged over every non-ignored position of the batch (spec §2), so the state
  token counts as one token among 1 + M. Kept to reproduce the released checkpoints' training.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_MODES = ("paper", "reference")


def token_cross_entropy(logits, labels, label_smoothing=0.0):
    """Per-position CE, 0 where the label is ignored."""
    flat = F.cross_entropy(
        logits.float().flatten(0, 1),  # (B*L, V)
        labels.flatten(),  # (B*L,)
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return flat.view(labels.shape)  # (B, L)


def masked_mean(values, mask):
    """Mean of `values` where `mask`; 0 (still differentiable) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def reference_loss(logits, labels, label_smoothing=0.1):
    """One CE averaged over all labelled positions (spec §2)."""
    per_token = token_cross_entropy(logits, labels, label_smoothing)  # (B, L)
    return masked_mean(per_token, labels != IGNORE_INDEX)


def paper_loss(logits, labels, state_mask, label_smoothing=0.1):
    """L_state + L_response (eq. 3-5); L_state is absent (0) when no sample carries a state token."""
    per_token = token_cross_entropy(logits, labels, label_smoothing)  # (B, L)
    labelled = labels != IGNORE_INDEX
    state_loss = masked_mean(per_token, state_mask & labelled)
    response_loss = masked_mean(per_token, labelled & ~state_mask)
    return state_loss + response_loss


def compute_loss(mode, logits, labels, state_mask, label_smoothing):
    """Dispatch on the YAML `loss_mode`; an unknown mode is a configuration error."""
    if mode == "paper":
        return paper_loss(logits, labels, state_mask, label_smoothing)
    if mode == "reference":
        return reference_loss(logits, labels, label_smoothing)
    raise ValueError(f"loss_mode {mode!r} is not one of {LOSS_MODES}; set it in the stage YAML.")


def unsmoothed_nll(logits, labels):
    """Summed plain NLL and token count, for a perplexity free of label smoothing (fixes spec §8.13)."""
    per_token = token_cross_entropy(logits, labels, 0.0)  # (B, L)
    labelled = labels != IGNORE_INDEX
    return per_token[labelled].sum(), labelled.sum()


def alignment_ctc_loss(speech, speech_lens, targets, token_embeddings, scale, blank_id=0):
    """CTC of the transcript's token ids against the adapter output read through the LM's token embeddings.

    Not in the paper (YAML `alignment_ctc`, stage 1 of the speedrun): a direct alignment signal for the speech
    encoder and adapter from the first step. Each LM position's speech row is scored against every token
    embedding by cosine similarity times `scale`, so the rows are drawn towards the directions of the tokens
    spoken there (the vectors the LM reads text as) without touching their norm; `blank_id` (EOS, never inside
    a transcript) is CTC's blank. The embeddings are taken as fixed (detached): the LM is frozen in stage 1, and
    a parameter used outside the wrapped forward would upset DDP. Rows with more tokens than positions cannot
    be aligned and give 0 (zero_infinity).

    speech (B, P, H), speech_lens (B,), targets: per row a list of token ids, token_embeddings (V, H).
    """
    rows = [b for b, ids in enumerate(targets) if ids]
    if not rows:
        return speech.sum() * 0.0  # differentiable zero: nothing to align in this batch
    directions = F.normalize(token_embeddings.detach().float(), dim=-1)  # (V, H)
    chosen = F.normalize(speech[rows].float(), dim=-1)  # (R, P, H)
    log_probs = (scale * chosen @ directions.T).log_softmax(dim=-1)  # (R, P, V)
    flat = torch.tensor([token for b in rows for token in targets[b]], dtype=torch.long, device=speech.device)
    target_lens = torch.tensor([len(targets[b]) for b in rows], dtype=torch.long, device=speech.device)
    return F.ctc_loss(log_probs.transpose(0, 1), flat, speech_lens[rows], target_lens, blank=blank_id,
                      reduction="mean", zero_infinity=True)
