"""GPT-NeoX-20B tokenizer with DuplexMamba's added special tokens (spec §1.7).

Mamba-2.8B was trained with the GPT-NeoX-20B BPE (50,277 entries). DuplexMamba appends up to three special
tokens, whose ids are fixed by that order: `<|endofuser|>` = 50277 (all stages), then `<|incomplete|>` = 50278 and
`<|ignore|>` = 50279 (stages 3-4 and inference). Every other marker (`<|user|>`, `<|assistant|>`,
`<|beginofspeech|>`, `<|endofspeech|>`) is ordinary multi-token text. The vocabulary size of the LM follows:
50,278 rows in stages 1-2, 50,280 in stages 3-4 (`vocab_rows`).
"""
from __future__ import annotations

import pathlib

from transformers import PreTrainedTokenizerFast

DEFAULT_TOKENIZER_FILE = pathlib.Path(__file__).resolve().parent / "assets" / "gpt-neox-20b" / "tokenizer.json"
BASE_VOCAB_SIZE = 50277  # GPT-NeoX-20B entries before DuplexMamba's additions
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
ADDED_TOKENS = ("<|endofuser|>", "<|incomplete|>", "<|ignore|>")  # in id order: 50277, 50278, 50279


def vocab_rows(num_state_tokens: int) -> int:
    """LM embedding rows for a stage: 50278 with one added token (stages 1-2), 50280 with three (stages 3-4).

    Example
    -------
    >>> vocab_rows(1), vocab_rows(3)
    (50278, 50280)
    """
    _check_num_state_tokens(num_state_tokens)
    return BASE_VOCAB_SIZE + num_state_tokens


def load_tokenizer(num_state_tokens: int = 3, tokenizer_file: str | pathlib.Path | None = None) -> PreTrainedTokenizerFast:
    """Load the GPT-NeoX-20B tokenizer and add the first `num_state_tokens` of `ADDED_TOKENS` as special tokens.

    `<|endoftext|>` (id 0) is bos, eos, unk and pad; nothing is prepended (the file's post-processor adds no BOS),
    padding is on the right. Raises ValueError when the file does not yield the expected ids, e.g. a different
    base vocabulary, so that a wrong tokenizer never silently shifts the state-token ids.
    """
    _check_num_state_tokens(num_state_tokens)
    path = pathlib.Path(tokenizer_file) if tokenizer_file is not None else DEFAULT_TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found; it ships in modules/assets/gpt-neox-20b/ "
                                f"(see SOURCE.md there for how to re-extract it)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), padding_side="right")
    _check_base_vocabulary(tokenizer, path)
    tokenizer.add_special_tokens({
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "sep_token": ADDED_TOKENS[0],
        "additional_special_tokens": list(ADDED_TOKENS[1:num_state_tokens]),
    })
    check_added_tokens(tokenizer, num_state_tokens, source=str(path))
    return tokenizer


def check_added_tokens(tokenizer, num_state_tokens: int = 3, source: str = "tokenizer") -> None:
    """Raise ValueError unless `tokenizer` maps the added tokens to 50277, 50278, 50279 (as many as needed).

    Called wherever a tokenizer enters from outside (inference, training) so that a tokenizer without the added
    tokens fails here with a readable message instead of producing wrong state tokens later.
    """
    problems = []
    for offset, token in enumerate(ADDED_TOKENS[:num_state_tokens]):
        expected = BASE_VOCAB_SIZE + offset
        got = tokenizer.convert_tokens_to_ids(token)
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        if got != expected or pieces != [expected]:
            problems.append(f"{token} -> {pieces} (id {got}), expected the single id {expected}")
    if problems:
        raise ValueError(f"{source}: tokenizer is missing DuplexMamba's added tokens or has other ids: "
                         + "; ".join(problems) + ". Load it with modules.tokenizer.load_tokenizer("
                         f"num_state_tokens={num_state_tokens}).")


def _check_base_vocabulary(tokenizer, path: pathlib.Path) -> None:
    """The added-token ids only come out right on top of exactly the 50,277-entry GPT-NeoX-20B vocabulary."""
    vocab = tokenizer.get_vocab()
    size = len(tokenizer) - sum(token in vocab for token in ADDED_TOKENS)  # a saved copy may hold them already
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if size != BASE_VOCAB_SIZE or eos_id != EOS_ID:
        raise ValueError(f"{path}: expected the GPT-NeoX-20B tokenizer ({BASE_VOCAB_SIZE} entries, "
                         f"{EOS_TOKEN} = {EOS_ID}) but found {size} entries and {EOS_TOKEN} = {eos_id}; "
                         f"use modules/assets/gpt-neox-20b/tokenizer.json")


def _check_num_state_tokens(num_state_tokens: int) -> None:
    if num_state_tokens not in (1, 3):
        raise ValueError(f"num_state_tokens must be 1 (stages 1-2) or 3 (stages 3-4, inference), "
                         f"got {num_state_tokens}")
