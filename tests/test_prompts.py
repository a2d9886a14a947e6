"""Prompt choice per stage and utterance id, state labels, and the layout strings (spec §2, paper App. A/B)."""
import random

import pytest

from src import prompts as P


def test_counts_match_paper_and_reference():
    assert (len(P.STAGE1_SENTENCES), len(P.ASR_SENTENCES), len(P.QA_SENTENCES)) == (5, 6, 7)
    assert (len(P.INCOMPLETE_REPLIES), len(P.IGNORE_REPLIES)) == (6, 10)


def test_inference_prompt_is_first_qa_sentence():
    assert P.INFERENCE_PROMPT == "<|user|>\nPlease answer the questions in the user's input speech.\n<|beginofspeech|>"


def test_suffixes():
    assert P.suffix_for(1) == P.suffix_for(2) == "<|endofspeech|><|endofuser|>\n<|assistant|>\n"
    assert P.suffix_for(3) == P.suffix_for(4) == "<|endofspeech|>"
    with pytest.raises(ValueError, match="stage"):
        P.suffix_for(5)


@pytest.mark.parametrize("utterance_id, expected", [
    ("qa-0001", P.RESPONSE), ("asr-77", P.RESPONSE), ("qa-0001-cut", P.INCOMPLETE), ("gs-12-ignore", P.IGNORE),
    ("cutting-edge", P.RESPONSE), ("ignore-me", P.RESPONSE),
])
def test_state_token_from_id(utterance_id, expected):
    assert P.state_token_for(utterance_id) == expected


def test_instruction_families_per_stage():
    rng = random.Random(0)
    assert all(P.instruction_for(1, "asr-1", rng) in P.STAGE1_SENTENCES for _ in range(20))
    for stage in (2, 3, 4):
        assert all(P.instruction_for(stage, "asr-1", rng) in P.ASR_SENTENCES for _ in range(20))
        assert all(P.instruction_for(stage, "qa-1", rng) in P.QA_SENTENCES for _ in range(20))
    with pytest.raises(ValueError, match="stage"):
        P.instruction_for(0, "qa-1", rng)


def test_instruction_draw_is_per_sample_and_reproducible():
    draws = [P.instruction_for(2, "qa-1", random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = random.Random(1)
    assert len({P.instruction_for(2, f"qa-{i}", rng) for i in range(50)}) == len(P.QA_SENTENCES)


def test_state_token_ids_follow_added_order():
    assert [P.STATE_TOKEN_IDS[t] for t in P.STATE_TOKENS] == [50277, 50278, 50279]
