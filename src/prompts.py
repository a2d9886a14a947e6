"""Every prompt string, marker and canned reply of DuplexMamba (spec §2, paper Appendix A and B).

The sequence layouts these strings take part in:

- stages 1-2: user_prompt(sentence) | speech | STAGE12_SUFFIX | response + EOS
- stages 3-4: user_prompt(sentence) | speech | END_OF_SPEECH | state token | ASSISTANT_PROMPT | response + EOS
- inference:  INFERENCE_PROMPT | speech | END_OF_SPEECH -> state token, then ASSISTANT_PROMPT -> reply
- multi-turn stages 3-4 and the duplex engine: each earlier turn is user_prompt | speech | ANSWERED_TURN_HEAD |
  reply as said + EOS, turns joined by TURN_JOIN, then the current turn as in stages 3-4 (src/sequence.py)

`<|user|>`, `<|assistant|>`, `<|beginofspeech|>` and `<|endofspeech|>` are plain text (several BPE tokens each);
only the three state tokens are single added tokens (see modules/tokenizer.py). "\\n" is a real newline.
"""
from __future__ import annotations

import random

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
BEGIN_OF_SPEECH = "<|beginofspeech|>"
END_OF_SPEECH = "<|endofspeech|>"

# State tokens; the paper calls them <response>, <incomplete>, <ignore>.
RESPONSE = "<|endofuser|>"
INCOMPLETE = "<|incomplete|>"
IGNORE = "<|ignore|>"
STATE_TOKENS = (RESPONSE, INCOMPLETE, IGNORE)
STATE_TOKEN_IDS = {RESPONSE: 50277, INCOMPLETE: 50278, IGNORE: 50279}

ASSISTANT_PROMPT = f"\n{ASSISTANT}\n"
STAGE12_SUFFIX = f"{END_OF_SPEECH}{RESPONSE}{ASSISTANT_PROMPT}"  # speech end, response marker, assistant turn
STAGE34_SUFFIX = END_OF_SPEECH  # the state token is predicted right after it
ANSWERED_TURN_HEAD = STAGE12_SUFFIX  # before an earlier turn's reply in a conversation (always <|endofuser|>)
TURN_JOIN = "\n"  # between a reply's EOS and the next user prompt (the duplex engine's join)

# Stage 1 (alignment) instructions of the reference training script; they differ from paper A.1.
STAGE1_SENTENCES = (
    "Please transcribe this audio into text.",
    "What does this audio say? Please write it in text.",
    "Please generate the transcription of this speech.",
    "Please transcribe the following speech into text without punctuation.",
    "Listen to this speech and generate the corresponding text.",
)

# Paper Appendix A.1: ASR instructions used from stage 2 on (utterance ids starting "asr-").
ASR_SENTENCES = (
    "What does this audio say? Write it in lowercase without punctuation.",
    "Please convert this speech into text, all in lowercase and without punctuation.",
    "Generate the transcription for this audio without punctuation and keep it lowercase.",
    "Convert the spoken words into lowercase text without using any punctuation.",
    "Write the words you hear in this audio in lowercase, leaving out punctuation.",
    "Transcribe the speech in this audio to lowercase text with no punctuation.",
)

# Paper Appendix A.2: spoken-question instructions; the first one is the inference prompt.
QA_SENTENCES = (
    "Please answer the questions in the user's input speech.",
    "Listen to this speech and provide an appropriate answer.",
    "Please respond to the questions asked in the audio.",
    "Based on this audio, provide a clear and concise answer.",
    "Respond to the query presented in this audio message.",
    "Please provide a response to the question in the speaker's voice.",
    "Respond to the audio's question with the appropriate answer.",
)

# Paper Appendix B.1: replies trained for truncated questions (state <|incomplete|>).
INCOMPLETE_REPLIES = (
    "It seems like your question got cut off. Could you please provide the full question so I can assist you better?",
    "It looks like your message got cut off. Could you please provide more details or restate your question? "
    "I'm here to help!",
    "It looks like your message was cut off. Could you please provide more details or complete your question? "
    "I'm here to help with whatever you need.",
    "It looks like your question isn't complete. Could you please provide a bit more detail or context so I can "
    "assist you better?",
    "It seems that your message got cut off. Could you please share your question again? I'm here to help!",
    "It looks like part of your message is missing. Could you kindly share the full question or clarify it further? "
    "I'd be happy to help!",
)

# Paper Appendix B.2: replies trained for speech that needs no answer (state <|ignore|>).
IGNORE_REPLIES = (
    "I didn't get that, could you rephrase it?",
    "Sorry, could you explain that a bit more?",
    "Could you please elaborate on your question?",
    "Pardon me, but could you restate your question?",
    "I'm sorry, but I need a bit more context to understand.",
    "Apologies, I didn't quite catch what you meant.",
    "My apologies, I'm not sure I understood what you're asking.",
    "I'm sorry, could you clarify your question?",
    "I'm afraid I didn't fully understand your question.",
    "I'm not sure I follow\u2014could you provide more details?",
)


def user_prompt(sentence: str) -> str:
    """The text before the speech: "<|user|>\\n{sentence}\\n<|beginofspeech|>".

    Example
    -------
    >>> user_prompt("Hi.").split("\\n")
    ['<|user|>', 'Hi.', '<|beginofspeech|>']
    """
    return f"{USER}\n{sentence}\n{BEGIN_OF_SPEECH}"


INFERENCE_PROMPT = user_prompt(QA_SENTENCES[0])


def instruction_for(stage: int, utterance_id: str, rng: random.Random) -> str:
    """Draw the instruction sentence of one sample: stage 1 from STAGE1_SENTENCES; from stage 2 on, ASR
    sentences for ids starting "asr-" and QA sentences otherwise. Drawn per sample (the reference drew stage 1's
    per batch), from the caller's `rng` so runs are reproducible."""
    if stage == 1:
        return rng.choice(STAGE1_SENTENCES)
    if stage not in (2, 3, 4):
        raise ValueError(f"stage must be 1, 2, 3 or 4, got {stage}")
    return rng.choice(ASR_SENTENCES if utterance_id.startswith("asr-") else QA_SENTENCES)


def state_token_for(utterance_id: str) -> str:
    """The state label encoded in an utterance id: "-cut" -> <|incomplete|>, "-ignore" -> <|ignore|>,
    anything else (ASR samples included) -> <|endofuser|>.

    Example
    -------
    >>> state_token_for("qa-12-cut"), state_token_for("asr-3")
    ('<|incomplete|>', '<|endofuser|>')
    """
    if utterance_id.endswith("-cut"):
        return INCOMPLETE
    if utterance_id.endswith("-ignore"):
        return IGNORE
    return RESPONSE


def suffix_for(stage: int) -> str:
    """The text right after the speech: stages 1-2 close the user turn and open the assistant's, stages 3-4
    stop at <|endofspeech|> so that the state token follows."""
    if stage in (1, 2):
        return STAGE12_SUFFIX
    if stage in (3, 4):
        return STAGE34_SUFFIX
    raise ValueError(f"stage must be 1, 2, 3 or 4, got {stage}")
