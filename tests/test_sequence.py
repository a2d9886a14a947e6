"""The one sequence builder: splice layout, label window alignment, masks, real lengths, right padding."""
import pytest
import torch

from src.sequence import IGNORE_INDEX, build_sequences

H = 3
PREFIX = [[11, 12, 13], [21, 22]]
SUFFIX = [31, 32]  # stands for "<|endofspeech|>"
ASSISTANT = [41, 42, 43]  # stands for "\n<|assistant|>\n"
RESPONSES = [[51, 52], [61, 62, 63, 64]]
STATES = [50277, 50279]
EOS = 0


def value_embed(ids):
    """Embedding that shows which id sits where: every channel equals the id."""
    return ids[..., None].float().expand(*ids.shape, H)  # (B, L, H)


def speech_batch(lengths):
    """(B, P, H) speech rows with distinct negative values -(100 b + p + 1); padding rows hold junk 999."""
    rows = torch.full((len(lengths), max(lengths), H), 999.0)
    for b, n in enumerate(lengths):
        rows[b, :n] = -(100 * b + torch.arange(n, dtype=torch.float32) + 1)[:, None]
    return rows, torch.tensor(lengths)


def stage34_batch():
    speech, lens = speech_batch([4, 2])
    return build_sequences(value_embed, PREFIX, speech, lens, SUFFIX, RESPONSES, STATES, ASSISTANT, EOS)


def test_layout_places_text_and_speech_in_order():
    batch = stage34_batch()
    row1 = batch.inputs_embeds[1, :, 0].tolist()
    expected = [21, 22, -101, -102, 31, 32, 50279, 41, 42, 43, 61, 62, 63, 64, EOS]
    assert row1[:len(expected)] == expected
    assert batch.lengths.tolist() == [3 + 4 + 2 + 1 + 3 + 2 + 1, len(expected)]
    assert batch.speech_start.tolist() == [3, 2]


def test_padding_is_zero_and_right_side():
    batch = stage34_batch()
    n0, n1 = batch.lengths.tolist()
    assert batch.inputs_embeds.shape == (2, max(n0, n1), H)
    assert torch.all(batch.inputs_embeds[1, n1:] == 0) and torch.all(batch.labels[1, n1:] == IGNORE_INDEX)


def test_state_label_sits_at_last_endofspeech_position():
    batch = stage34_batch()
    for b, n_speech in enumerate([4, 2]):
        last_suffix = len(PREFIX[b]) + n_speech + len(SUFFIX) - 1
        assert batch.labels[b, last_suffix] == STATES[b]
        assert batch.state_mask[b].nonzero().flatten().tolist() == [last_suffix]


def test_labels_are_next_tokens_only_for_state_and_response():
    batch = stage34_batch()
    for b in range(2):
        ids = batch.inputs_embeds[b, :, 0].long()
        labelled = (batch.labels[b] != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(batch.labels[b, labelled], ids[labelled + 1])  # shifted targets
        targets = batch.labels[b, labelled].tolist()
        assert targets == [STATES[b]] + RESPONSES[b] + [EOS]  # never speech, prompt or assistant marker
        assert batch.response_mask[b].sum() == len(RESPONSES[b]) + 1
        assert not (batch.state_mask[b] & batch.response_mask[b]).any()


def test_stage12_has_no_state_label():
    speech, lens = speech_batch([3, 1])
    suffix = [31, 32, 50277, 41, 42, 43]  # "<|endofspeech|><|endofuser|>\n<|assistant|>\n"
    batch = build_sequences(value_embed, PREFIX, speech, lens, suffix, RESPONSES, eos_id=EOS)
    assert not batch.state_mask.any()
    first = len(PREFIX[0]) + 3 + len(suffix) - 1  # the reply is predicted from the last suffix token
    assert batch.labels[0, first] == RESPONSES[0][0]
    assert (batch.labels != IGNORE_INDEX).sum() == sum(len(r) + 1 for r in RESPONSES)


def test_inference_prompt_only():
    speech, lens = speech_batch([5])
    batch = build_sequences(value_embed, [PREFIX[0]], speech, lens, SUFFIX)
    assert batch.lengths.tolist() == [3 + 5 + 2]
    assert torch.all(batch.labels == IGNORE_INDEX)


def test_zero_speech_rows_and_bad_lengths():
    speech = torch.zeros(1, 0, H)
    batch = build_sequences(value_embed, [PREFIX[1]], speech, torch.tensor([0]), SUFFIX)
    assert batch.inputs_embeds[0, :, 0].tolist() == PREFIX[1] + SUFFIX
    with pytest.raises(ValueError, match="speech_lens"):
        build_sequences(value_embed, [PREFIX[1]], torch.zeros(1, 2, H), torch.tensor([3]), SUFFIX)
    with pytest.raises(ValueError, match="prefixes"):
        build_sequences(value_embed, PREFIX, torch.zeros(1, 2, H), torch.tensor([2]), SUFFIX)


def test_gradient_reaches_speech_rows():
    speech, lens = speech_batch([2, 2])
    speech.requires_grad_(True)
    batch = build_sequences(value_embed, PREFIX, speech, lens, SUFFIX, RESPONSES, STATES, ASSISTANT)
    batch.inputs_embeds.sum().backward()
    assert torch.all(speech.grad[:, :2] == 1)


def test_tiny_model_end_to_end_shapes():
    """3 s of audio -> 15 LM positions spliced between real prompt embeddings; logits over 50280 tokens."""
    from modules.model import load_model_hparams
    net = load_model_hparams()
    net["model"].eval()
    speech, lens = net["speech_encoder"](torch.randn(2, 48000) * 0.1, torch.tensor([1.0, 0.5]))
    assert speech.shape[1] == 15 and lens.tolist() == [15, 7]
    lm = net["model"].lm
    batch = build_sequences(lm.embed, PREFIX, speech, lens, SUFFIX, RESPONSES, STATES, ASSISTANT)
    assert batch.lengths.tolist() == [3 + 15 + 2 + 1 + 3 + 2 + 1, 2 + 7 + 2 + 1 + 3 + 4 + 1]
    logits = lm(batch.inputs_embeds)
    assert logits.shape == (*batch.labels.shape, 50280)
    assert torch.allclose(batch.inputs_embeds[0, 3:18], speech[0])


def test_multi_turn_layout_and_loss_only_on_the_current_turn():
    """Sample 0 follows two earlier turns (speech rows from context_speech 1 then 0), sample 1 has none; earlier
    turns are prompt | speech | head | reply + EOS, joined by "\\n", and carry no loss."""
    from src.sequence import EarlierTurn

    speech, lens = speech_batch([2, 1])
    context_speech = torch.full((2, 3, H), 999.0)
    context_speech[0, :3] = torch.tensor([-7.0, -8.0, -9.0])[:, None]
    context_speech[1, :1] = -6.0
    join, head = [90], [31, 32, 50277, 41, 42, 43]
    turns = [[EarlierTurn((71, 72), 1, (81, 82)), EarlierTurn((73,), 0, (83,))], []]
    batch = build_sequences(value_embed, PREFIX, speech, lens, SUFFIX, RESPONSES, STATES, ASSISTANT, EOS,
                            context=turns, context_speech=context_speech, context_speech_lens=torch.tensor([3, 1]),
                            join_ids=join, reply_head_ids=head)
    earlier = [71, 72, -6] + head + [81, 82, EOS] + join + [73, -7, -8, -9] + head + [83, EOS] + join
    current = PREFIX[0] + [-1, -2] + SUFFIX + [STATES[0]] + ASSISTANT + RESPONSES[0] + [EOS]
    row0 = batch.inputs_embeds[0, :, 0].tolist()
    assert row0[:int(batch.lengths[0])] == earlier + current
    assert int(batch.speech_start[0]) == len(earlier) + len(PREFIX[0])
    targets = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert targets == [STATES[0]] + RESPONSES[0] + [EOS]  # nothing of the earlier turns
    single = build_sequences(value_embed, PREFIX, speech, lens, SUFFIX, RESPONSES, STATES, ASSISTANT, EOS)
    n1 = int(single.lengths[1])
    assert torch.equal(batch.inputs_embeds[1, :n1], single.inputs_embeds[1, :n1])  # no context: unchanged
    with pytest.raises(ValueError, match="context_speech"):
        build_sequences(value_embed, PREFIX, speech, lens, SUFFIX, context=turns, join_ids=join,
                        reply_head_ids=head)
