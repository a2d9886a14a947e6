"""Golden: a multi-turn stage-3/4 training example is, token for token and speech row for speech row, what the
duplex engine has fed into its speaker state for the same turns (duplex/session.py with `listener_context:
conversation`): the interrupted answer closed with EOS, the answered turn, the "\\n" joins, the current question
heard over two slices. The example goes through the real data path: a manifest with a `context` column,
src/stages.py's pipelines, src/sequence.flatten_context and build_sequences."""
import csv
import json

import numpy as np
import pytest
import soundfile
import torch
from speechbrain.dataio.batch import PaddedBatch
from transformers import MambaConfig, MambaForCausalLM

from duplex.runtime import TorchMambaRuntime
from duplex.session import DuplexConfig, DuplexSession, TurnPrompts, TurnTokens
from modules.tokenizer import load_tokenizer
from src import prompts
from src.sequence import IGNORE_INDEX, build_sequences, flatten_context
from src.stages import TextIds, add_pipelines, read_manifest

SLICE = 48000  # 3 s at 16 kHz
FRAME = 3200  # fake encoder: one position per 200 ms
REPLIES = ["Paris is the capital of France.", "Seven.", "Mount Everest is the tallest mountain."]


class RecordingRuntime(TorchMambaRuntime):
    """A tiny random Mamba whose branches remember every row fed to them; the state-token probes answer from a
    script and the replies are forced to the scripted texts (so they are canonical tokenisations)."""

    def __init__(self, hf_model, tokenizer, probe_answers):
        super().__init__(hf_model)
        self.tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
        self.replies = [tokenizer.encode(text, add_special_tokens=False) for text in REPLIES]
        self.probe_answers = list(probe_answers)
        table = self.backbone.embeddings.weight.detach()
        self.id_of_row = {row.numpy().tobytes(): i for i, row in enumerate(table)}
        self.fed = {}  # id(state) -> rows fed
        self.alive = []  # keeps states alive so ids are never reused
        self.probes = []  # ids of each probe fork (listener + <|endofspeech|>) when its state token was chosen

    def rows(self, state):
        return self.fed.setdefault(id(state), [])

    def ids(self, rows):
        return [self.id_of_row.get(row.numpy().tobytes(), -1) for row in rows]  # -1: a speech row

    def new_state(self, batch_size=1):
        state = super().new_state(batch_size)
        self.alive.append(state)
        return state

    def fork(self, state):
        branch = super().fork(state)
        self.alive.append(branch)
        self.fed[id(branch)] = list(self.rows(state))
        return branch

    def prefill(self, state, embeds):
        self.rows(state).extend(embeds[0].detach().clone())
        logits = super().prefill(state, embeds)
        token = self._scripted(self.ids(self.rows(state)))
        if token is None:
            return logits
        forced = torch.full_like(logits, -1e4)
        forced[:, token] = 0.0
        return forced

    def _scripted(self, history):
        end_of_speech = list(self.tokens.end_of_speech)
        if history[-len(end_of_speech):] == end_of_speech:
            self.probes.append(list(history))
            return self.probe_answers.pop(0)
        marker = [self.tokens.respond] + list(self.tokens.assistant)
        starts = [i + len(marker) for i in range(len(history)) if history[i:i + len(marker)] == marker]
        if not starts:
            return None
        said = len(history) - starts[-1]
        reply = self.replies[len(starts) - 1]
        return reply[said] if said < len(reply) else self.tokens.eos


def fake_encoder(projection):
    def encode(wav):  # (N,) -> (1, N // FRAME, 32): frame means through a fixed projection
        frames = wav[: wav.numel() // FRAME * FRAME].reshape(-1, FRAME).mean(-1, keepdim=True)  # (P, 1)
        return (frames @ projection).unsqueeze(0)  # (1, P, 32)
    return encode


def write_audio(folder, name, seconds, seed):
    wav = (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    soundfile.write(folder / f"{name}.flac", wav, 16000, subtype="PCM_16")
    return folder / f"{name}.flac"


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=32, num_hidden_layers=2, state_size=8,
                                        expand=2, conv_kernel=4)).eval()


def play_engine(tiny_lm, tokenizer, audio, encode, last="respond"):
    """Question A answered; question B interrupts the answer after 4 tokens and is answered to EOS; after a
    pause, C over two slices: incomplete, then `last` (respond: answered; ignore: dropped)."""
    from src.audio import load_audio

    tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
    answers = [tokens.respond, tokens.respond, tokens.incomplete, getattr(tokens, last)]
    runtime = RecordingRuntime(tiny_lm, tokenizer, answers)
    session = DuplexSession(runtime, encode, tokenizer,
                            DuplexConfig(slice_seconds=3.0, tokens_per_slice=4, listener_context="conversation"))
    question_c = load_audio(audio["c"])
    slices = [load_audio(audio["a"]), load_audio(audio["b"]), None, question_c[:SLICE], question_c[SLICE:], None]
    for piece in slices:
        session.feed(piece)
    return runtime, session


def write_manifest(folder, said_first, state="respond", response=REPLIES[2]):
    """The current turn C after A, answered as far as the user let it, and B, answered in full."""
    path = folder / "multi.csv"
    context = [{"wav": "a.flac", "reply": said_first}, {"wav": "b.flac", "reply": REPLIES[1]}]
    task, suffix = ("qa", "") if state == "respond" else ("state", f"-{state}")
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["ID", "duration", "wav", "wrd", "task", "state", "response", "context"])
        writer.writerow([f"7-1-0001{suffix}", "6.0", "c.flac", "what is the tallest mountain", task, state, response,
                         json.dumps(context)])
    return path


def training_example(path, tokenizer, encode, embed, monkeypatch):
    """The stage-3 data path on the manifest, with the instruction fixed to the engine's (the first QA one)."""
    monkeypatch.setattr(prompts, "QA_SENTENCES", prompts.QA_SENTENCES[:1])
    text_ids = TextIds(tokenizer, 3)
    dataset = add_pipelines(read_manifest(path), text_ids, train=True, seed=0)
    batch = PaddedBatch([dataset[0]])
    wavs, wav_lens = batch.sig
    context, context_wavs, context_lens = flatten_context(batch.context_turns, batch.context_wavs)
    speech = encode(wavs[0])  # (1, P, H)
    context_speech = [encode(w[: round(float(n) * w.shape[0])])[0] for w, n in zip(context_wavs, context_lens)]
    lens = torch.tensor([s.shape[0] for s in context_speech])
    padded = torch.nn.utils.rnn.pad_sequence(context_speech, batch_first=True)  # (C, Q, H)
    sequence = build_sequences(embed, batch.prefix_ids, speech, torch.tensor([speech.shape[1]]), batch.suffix_ids,
                               batch.response_ids, batch.state_id.tolist(), text_ids.assistant_ids,
                               context=context, context_speech=padded, context_speech_lens=lens,
                               join_ids=text_ids.join_ids, reply_head_ids=text_ids.reply_head_ids)
    return sequence, text_ids


def test_multi_turn_example_equals_what_the_engine_fed(tiny_lm, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(num_state_tokens=3)
    audio = {"a": write_audio(tmp_path, "a", 3.0, 1), "b": write_audio(tmp_path, "b", 3.0, 2),
             "c": write_audio(tmp_path, "c", 6.0, 3)}
    encode = fake_encoder(torch.randn(1, 32, generator=torch.Generator().manual_seed(4)))
    runtime, session = play_engine(tiny_lm, tokenizer, audio, encode)
    assert [t.status for t in session.transcript] == ["answered", "interrupted", "answered", "complete",
                                                      "answered", "speaking"]
    first_said = tokenizer.decode(runtime.replies[0][:4])  # what was said of answer A when B began
    assert session.transcript[1].text == first_said == "Paris is the capital"
    engine_rows = runtime.rows(session._speaker.state)  # everything fed to the speaker: all three turns
    pending = session._speaker.pending  # the sampled, shown, not yet fed last reply token

    sequence, text_ids = training_example(write_manifest(tmp_path, first_said), tokenizer, encode,
                                          runtime.embed, monkeypatch)
    length = int(sequence.lengths[0])
    training_rows = sequence.inputs_embeds[0, :length]  # (L, H)
    engine_ids, training_ids = runtime.ids(engine_rows), runtime.ids(list(training_rows))
    assert training_ids[:len(engine_ids)] == engine_ids
    said = session._speaker.reply_ids  # reply C so far; its last token is pending (sampled, not yet fed)
    reply = runtime.replies[2]
    assert said == reply[:len(said)] and said[-1] == pending and len(said) == 8  # 2 slices x 4 tokens
    assert training_ids[len(engine_ids):] == reply[len(said) - 1:] + [tokenizer.eos_token_id]  # the rest + EOS
    assert torch.equal(training_rows[:len(engine_rows)], torch.stack(engine_rows))  # speech rows too
    assert engine_ids.count(-1) == 15 + 15 + 30  # speech positions of A, B and C

    # only the current turn's state token and reply carry loss
    labels = sequence.labels[0, :length]
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert [training_ids[i + 1] for i in labelled] == [tokens_respond(tokenizer)] + reply + [0]
    state_position = labelled[0]
    assert sequence.state_mask[0].nonzero().flatten().tolist() == [state_position]
    assert int(sequence.speech_start[0]) == state_position + 1 - 30 - len(text_ids.suffix_ids)
    assert runtime.probes[-1] == training_ids[:state_position + 1]  # what the state token was predicted from


def test_ignored_current_turn_matches_the_engines_listener(tiny_lm, tmp_path, monkeypatch):
    """C is background talk after the same two turns: the engine's listener (forked from the speaker) +
    <|endofspeech|> is exactly the training prefix before its <|ignore|> label, and the conversation the
    engine keeps (the speaker) is untouched by it."""
    tokenizer = load_tokenizer(num_state_tokens=3)
    audio = {"a": write_audio(tmp_path, "a", 3.0, 1), "b": write_audio(tmp_path, "b", 3.0, 2),
             "c": write_audio(tmp_path, "c", 6.0, 3)}
    encode = fake_encoder(torch.randn(1, 32, generator=torch.Generator().manual_seed(4)))
    runtime, session = play_engine(tiny_lm, tokenizer, audio, encode, last="ignore")
    assert [t.status for t in session.transcript][-1] == "ignored"
    first_said = tokenizer.decode(runtime.replies[0][:4])
    reply = prompts.IGNORE_REPLIES[0]
    sequence, _ = training_example(write_manifest(tmp_path, first_said, "ignore", reply), tokenizer, encode,
                                   runtime.embed, monkeypatch)
    training_ids = runtime.ids(list(sequence.inputs_embeds[0, :int(sequence.lengths[0])]))
    state_position = int(sequence.state_mask[0].nonzero()[0, 0])
    assert runtime.probes[-1] == training_ids[:state_position + 1]
    assert int(sequence.labels[0, state_position]) == tokenizer.convert_tokens_to_ids(prompts.IGNORE)
    speaker = runtime.ids(runtime.rows(session._speaker.state))
    assert training_ids[:len(speaker)] == speaker  # the earlier turns as the engine keeps them
    labelled = (sequence.labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert [training_ids[i + 1] for i in labelled[1:]] == tokenizer.encode(reply, add_special_tokens=False) + [0]


def tokens_respond(tokenizer):
    return tokenizer.convert_tokens_to_ids(prompts.RESPONSE)
