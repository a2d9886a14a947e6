"""Label windows per stage: which positions carry loss (state token, response, EOS) and which are -100.

Rows go through the stage's real data pipeline (src/stages.py) and the one sequence builder (src/sequence.py).
"""
import pytest
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataset import DynamicItemDataset

from modules.tokenizer import load_tokenizer
from src import prompts
from src.sequence import IGNORE_INDEX, build_sequences
from src.stages import PromptDraws, TextIds, add_pipelines

ROWS = {  # id -> (task, state, response); wav is never read here
    "asr-1-0-0000": ("asr", "empty", "the cat sat"),
    "1-1-0001": ("qa", "respond", "Two plus two is four."),
    "1-3-0002-cut": ("state", "incomplete", "It seems like your question got cut off."),
    "1-4-0003-ignore": ("state", "ignore", "I didn't get that."),
}
EXPECTED_STATE = {"empty": 50277, "respond": 50277, "incomplete": 50278, "ignore": 50279}
SPEECH_ROWS = (3, 5, 2, 4)  # different speech lengths per sample


@pytest.fixture(scope="module")
def tokenizers():
    return {1: load_tokenizer(1), 3: load_tokenizer(3)}


def stage_batch(stage, tokenizer, train=False):
    data = {utt: {"wav": "unused.flac", "duration": 1.0, "task": t, "state": s, "response": r}
            for utt, (t, s, r) in ROWS.items()}
    dataset = add_pipelines(DynamicItemDataset(data), TextIds(tokenizer, stage), PromptDraws(0, train=train))
    dataset.set_output_keys(["id", "task", "state", "prefix_ids", "suffix_ids", "state_id", "response_ids"])
    return PaddedBatch([dataset[i] for i in range(len(dataset))])


def build(stage, batch, text_ids, embed=None):
    embed = embed or torch.nn.Embedding(50280, 4)
    speech = torch.zeros(len(batch.id), max(SPEECH_ROWS), 4)  # (B, P, H)
    with_state = stage >= 3
    return build_sequences(embed, batch.prefix_ids, speech, torch.tensor(SPEECH_ROWS), batch.suffix_ids,
                           response_ids=batch.response_ids,
                           state_ids=batch.state_id.tolist() if with_state else None,
                           assistant_ids=text_ids.assistant_ids if with_state else ())


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_label_window(stage, tokenizers):
    tokenizer = tokenizers[1 if stage <= 2 else 3]
    text_ids = TextIds(tokenizer, stage)
    batch = stage_batch(stage, tokenizer)
    sequence = build(stage, batch, text_ids)
    suffix = text_ids.encode(prompts.suffix_for(stage))
    for b, utt in enumerate(batch.id):
        labels = sequence.labels[b]
        response = text_ids.encode(ROWS[utt][2]) + [0]  # reply + EOS
        last_suffix = len(batch.prefix_ids[b]) + SPEECH_ROWS[b] + len(suffix) - 1  # this sample's own lengths
        assert (labels[:last_suffix] == IGNORE_INDEX).all(), "prompt and speech never carry loss"
        if stage <= 2:
            expected = response
            assert not sequence.state_mask[b].any()
        else:
            expected = [EXPECTED_STATE[ROWS[utt][1]]] + [IGNORE_INDEX] * len(text_ids.assistant_ids) + response
            assert sequence.state_mask[b].nonzero().flatten().tolist() == [last_suffix]
        window = labels[last_suffix:last_suffix + len(expected)].tolist()
        assert window == expected
        assert (labels[last_suffix + len(expected):] == IGNORE_INDEX).all(), "padding carries no loss"
        assert sequence.response_mask[b].sum() == len(response)


def test_stage3_state_token_is_predicted_from_the_last_endofspeech_token(tokenizers):
    text_ids = TextIds(tokenizers[3], 3)
    batch = stage_batch(3, tokenizers[3])
    embed = torch.nn.Embedding(50280, 4)
    sequence = build(3, batch, text_ids, embed)
    end_of_speech_last = text_ids.encode(prompts.END_OF_SPEECH)[-1]
    with torch.no_grad():
        expected_input = embed(torch.tensor(end_of_speech_last))  # (H,)
        for b in range(len(batch.id)):
            position = int(sequence.state_mask[b].nonzero())
            assert torch.equal(sequence.inputs_embeds[b, position], expected_input)
            assert int(sequence.labels[b, position]) == EXPECTED_STATE[ROWS[batch.id[b]][1]]


@pytest.mark.parametrize("stage,task,family", [
    (1, "asr", prompts.STAGE1_SENTENCES), (2, "asr", prompts.ASR_SENTENCES), (2, "qa", prompts.QA_SENTENCES),
    (3, "state", prompts.QA_SENTENCES), (4, "asr", prompts.ASR_SENTENCES)])
def test_instruction_family_follows_stage_and_task(stage, task, family, tokenizers):
    text_ids = TextIds(tokenizers[1 if stage <= 2 else 3], stage)
    options = {tuple(text_ids.encode(prompts.user_prompt(sentence))) for sentence in family}
    batch = stage_batch(stage, text_ids.tokenizer, train=True)
    for b, utt_task in enumerate(batch.task):
        if utt_task == task:
            assert tuple(batch.prefix_ids[b]) in options


def test_eval_prompts_are_fixed_per_utterance(tokenizers):
    first = stage_batch(2, tokenizers[1]).prefix_ids
    assert stage_batch(2, tokenizers[1]).prefix_ids == first
