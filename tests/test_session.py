"""DuplexSession state machine, driven by a scripted fake LM whose state is the literal token history.

The fake runtime's "state" is the list of everything fed to it, so a test can assert exactly what context
a reply was generated from (no <|endofspeech|> residue, correct turn joins) and that branches never leak.
State tokens and reply texts are chosen by the test per speech slice.
"""
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from duplex import events as ev
from duplex.runtime import TorchMambaRuntime, prefill_many_by_definition
from duplex.sampling import SamplingConfig
from duplex.session import DuplexConfig, DuplexSession, TurnPrompts, TurnTokens
from modules.tokenizer import load_tokenizer

SPECIALS = ("<|endoftext|>", "<|endofuser|>", "<|incomplete|>", "<|ignore|>")
EOS, RESPOND, INCOMPLETE, IGNORE = range(4)
VOCAB = 400
SAMPLES_PER_POSITION = 1600  # fake encoder: one LM position per 100 ms


class CharTokenizer:
    """Characters are ids 100 + ord(c) (ASCII), the four special strings are ids 0-3."""

    def encode(self, text, add_special_tokens=False):
        ids = []
        while text:
            special = next((s for s in SPECIALS if text.startswith(s)), None)
            if special:
                ids.append(SPECIALS.index(special))
                text = text[len(special):]
            else:
                ids.append(100 + ord(text[0]))
                text = text[1:]
        return ids

    def decode(self, ids):
        return "".join(SPECIALS[i] if i < 4 else chr(i - 100) for i in ids)


class HistoryState:
    """A branch state that is simply the list of inputs fed so far."""

    def __init__(self, history=()):
        self.history = list(history)

    batch_size = 1

    @property
    def seqlen(self):
        return [len(self.history)]

    def clone(self):
        return HistoryState(self.history)

    def copy_(self, src):
        self.history = list(src.history)
        return self


class ScriptedRuntime:
    """Fake LM: after <|endofspeech|> it predicts the state token chosen for the last speech slice; after the
    assistant prompt it spells the reply chosen for the question it answers, then EOS."""

    def __init__(self, tokens: TurnTokens, decisions: dict, replies: dict):
        self.tokens, self.decisions, self.replies = tokens, decisions, replies
        self.reply_contexts = []  # history at each reply start (what the reply was conditioned on)

    def new_state(self, batch_size=1):
        return HistoryState()

    def fork(self, state):
        return state.clone()

    def release(self, state):
        state.history = None  # any later use of a released branch fails loudly

    def embed(self, ids):
        return ids.float().unsqueeze(-1)  # (1, L, 1): the id itself

    def prefill(self, state, embeds):
        if embeds.shape[1] < 1:
            raise ValueError("empty prefill")
        state.history.extend(int(v) for v in embeds[0, :, 0].tolist())
        return self._logits(state.history)

    step = prefill

    # the batched operations the scheduler calls, one row at a time
    def prefill_many(self, states, chunks, fork_at=None):
        return prefill_many_by_definition(self, states, chunks, fork_at)

    def prefill_rows(self, states, chunks):
        return torch.cat([self.prefill(state, chunk[None]) for state, chunk in zip(states, chunks)])

    def step_many(self, states, embeds):
        return torch.cat([self.prefill(state, embeds[i:i + 1]) for i, state in enumerate(states)])

    def fork_many(self, states):
        return [self.fork(state) for state in states]

    def release_many(self, states):
        for state in states:
            self.release(state)

    def _logits(self, history):
        logits = torch.zeros(1, VOCAB)
        logits[0, self._next_token(history)] = 50.0
        return logits

    def _next_token(self, history):
        eos_speech, assistant = list(self.tokens.end_of_speech), list(self.tokens.assistant)
        if history[-len(eos_speech):] == eos_speech:
            return self.decisions[_last_speech_code(history)]
        start = _reply_start(history, [self.tokens.respond] + assistant)
        if start is None:
            return 100 + ord("?")  # anything: the session ignores prefill logits here
        if start == len(history):
            self.reply_contexts.append(list(history))
        reply = CharTokenizer().encode(self.replies[_last_speech_code(history[:start])])
        done = len(history) - start
        return reply[done] if done < len(reply) else EOS


def _last_speech_code(history):
    return -next(v for v in reversed(history) if v < 0)


def _reply_start(history, marker):
    """Index just after the last respond+assistant marker if no speech came after it, else None."""
    for i in range(len(history) - len(marker), -1, -1):
        if history[i:i + len(marker)] == marker:
            return i + len(marker) if all(v >= 0 for v in history[i:]) else None
    return None


def speech(code, seconds=1.0):
    """A fake speech slice whose encoding is `seconds * 10` positions all equal to -code."""
    return torch.full((int(16000 * seconds),), float(code))


def fake_encoder(wav):
    positions = wav.numel() // SAMPLES_PER_POSITION
    code = wav[0].item() if wav.numel() else 0.0
    return torch.full((1, positions, 1), -code)  # (1, P, 1)


PROMPTS = TurnPrompts(user="<U>", end_of_speech="<E>", assistant="\n<A>\n", respond=SPECIALS[1],
                      incomplete=SPECIALS[2], ignore=SPECIALS[3])
TOKENS = TurnTokens.from_tokenizer(CharTokenizer(), PROMPTS)


def make_session(decisions, replies, **config):
    runtime = ScriptedRuntime(TOKENS, decisions, replies)
    session = DuplexSession(runtime, fake_encoder, CharTokenizer(), DuplexConfig(**config), prompts=PROMPTS)
    return session, runtime


def run(session, slices):
    timeline = []
    for item in slices:
        timeline += session.feed(item)
    return timeline


def ids(text):
    return CharTokenizer().encode(text)


def speech_ids(code, seconds=1.0):
    return [-code] * int(seconds * 10)


def answer_context(*speech_parts):
    """<E> + respond + assistant prompt after the given speech ids."""
    return [v for part in speech_parts for v in part] + ids("<E>") + [RESPOND] + ids("\n<A>\n")


def all_text(timeline):
    return "".join(e.text for e in timeline)


def test_question_is_answered_from_exactly_prompt_and_speech():
    session, runtime = make_session({1: RESPOND}, {1: "Paris is the capital."})
    timeline = run(session, [speech(1)] + [None] * 8)
    first = timeline[0]
    assert first.state_token == "<|endofuser|>" and first.speech_positions == 10
    assert first.changes == [ev.LISTEN_START, ev.REPLY_START] and first.text == "Pari"
    assert all_text(timeline) == "Paris is the capital."
    assert ev.REPLY_END in timeline[5].changes and not session.speaking
    assert runtime.reply_contexts == [answer_context(ids("<U>"), speech_ids(1))]
    assert [e.state_token for e in timeline[1:]] == [None] * 8
    assert [e.start_s for e in timeline[:3]] == [0.0, 1.0, 4.0]  # silence slices last slice_seconds


def test_ignored_first_input_resets_to_the_start():
    session, runtime = make_session({2: IGNORE, 1: RESPOND}, {1: "Yes."})
    timeline = run(session, [speech(2), speech(1), None, None])
    assert timeline[0].changes == [ev.LISTEN_START, ev.IGNORED, ev.RESET] and timeline[0].text == ""
    assert runtime.reply_contexts == [answer_context(ids("<U>"), speech_ids(1))]  # no trace of speech 2
    assert all_text(timeline) == "Yes."


def test_interruption_takes_over_and_closes_the_old_reply():
    session, runtime = make_session({1: RESPOND, 3: RESPOND}, {1: "A long first answer.", 3: "Second."})
    timeline = run(session, [speech(1), None, speech(3), None, None])
    assert timeline[2].changes == [ev.LISTEN_START, ev.INTERRUPT, ev.REPLY_START]
    shown_first = timeline[0].text + timeline[1].text  # 8 characters shown, the last one not yet fed
    assert shown_first == "A long f"
    old_context = answer_context(ids("<U>"), speech_ids(1))
    expected = old_context + ids(shown_first) + [EOS] + ids("\n") + answer_context(ids("<U>"), speech_ids(3))
    assert runtime.reply_contexts[1] == expected
    assert timeline[2].text + timeline[3].text + timeline[4].text == "Second."
    assert "interrupted" in session.conversation_text()


def test_false_interruption_leaves_the_reply_token_for_token_unchanged():
    replies = {1: "An answer that takes several slices to finish."}
    plain, _ = make_session({1: RESPOND}, replies)
    interrupted, _ = make_session({1: RESPOND, 4: IGNORE}, replies)
    reference = run(plain, [speech(1)] + [None] * 14)
    with_noise = run(interrupted, [speech(1), None, speech(4), None] + [None] * 11)
    assert with_noise[2].changes == [ev.LISTEN_START, ev.IGNORED]  # no reset: the conversation is kept
    assert [e.text for e in with_noise] == [e.text for e in reference]
    assert all_text(with_noise) == replies[1]


def test_incomplete_keeps_listening_across_slices_without_marker_residue():
    session, runtime = make_session({5: INCOMPLETE, 6: INCOMPLETE, 7: RESPOND}, {7: "Done."})
    timeline = run(session, [speech(5), speech(6), speech(7, 0.5), None, None])
    assert [e.state_token for e in timeline[:3]] == ["<|incomplete|>", "<|incomplete|>", "<|endofuser|>"]
    assert timeline[0].changes == [ev.LISTEN_START] and timeline[1].changes == []
    assert session.listening is False and all_text(timeline) == "Done."
    parts = ids("<U>"), speech_ids(5), speech_ids(6), speech_ids(7, 0.5)
    assert runtime.reply_contexts == [answer_context(*parts)]


def test_silence_after_speech_forces_a_reply():
    session, runtime = make_session({5: INCOMPLETE}, {5: "Forced."})
    timeline = run(session, [speech(5), None, None])
    assert timeline[1].changes == [ev.REPLY_START, ev.FORCED_REPLY] and timeline[1].state_token is None
    assert runtime.reply_contexts == [answer_context(ids("<U>"), speech_ids(5))]
    assert all_text(timeline) == "Forced."


def test_without_forced_reply_silence_keeps_listening_until_finish():
    session, runtime = make_session({5: INCOMPLETE}, {5: "At the end."}, force_reply_on_silence=False)
    timeline = run(session, [speech(5), None, None])
    assert session.listening and all_text(timeline) == ""
    final = session.finish()
    assert final[0].input == "final" and final[0].changes[:2] == [ev.REPLY_START, ev.FORCED_REPLY]
    assert all_text(final) == "At the end." and ev.REPLY_END in final[-1].changes
    assert [e.slice_index for e in final] == list(range(3, 3 + len(final)))


def test_final_round_completes_the_running_reply():
    session, _ = make_session({1: RESPOND}, {1: "This reply is finished by finish()."})
    timeline = run(session, [speech(1)])
    final = session.finish()
    assert all_text(timeline + final) == "This reply is finished by finish()."
    assert session.finish() == [] and not session.speaking


def test_second_turn_joins_after_the_fed_eos():
    session, runtime = make_session({1: RESPOND, 2: RESPOND}, {1: "One.", 2: "Two."})
    run(session, [speech(1), None, speech(2), None])
    first = answer_context(ids("<U>"), speech_ids(1))
    assert runtime.reply_contexts[1] == first + ids("One.") + [EOS] + ids("\n") + answer_context(
        ids("<U>"), speech_ids(2))


def test_length_cap_truncates_the_reply_and_ends_finish():
    session, runtime = make_session({1: RESPOND}, {1: "x" * 500}, max_branch_tokens=40)
    timeline = run(session, [speech(1), None])
    final = session.finish()
    context_len = len(answer_context(ids("<U>"), speech_ids(1)))
    assert len(all_text(timeline + final)) == 40 - context_len + 1  # the last sampled token is shown, not fed
    assert ev.REPLY_TRUNCATED in final[-1].changes and not session.speaking
    assert "truncated" in session.conversation_text()


def test_empty_and_too_short_slices_are_harmless():
    session, runtime = make_session({5: INCOMPLETE, 1: RESPOND}, {1: "Ok."})
    timeline = run(session, [torch.zeros(0), speech(9, 0.05)])
    assert [e.speech_positions for e in timeline] == [0, 0]
    assert [e.state_token for e in timeline] == [None, None] and not session.listening
    run(session, [speech(5)])
    short = run(session, [speech(9, 0.05)])[0]  # an open turn is neither probed nor forced by it
    assert short.changes == [] and session.listening
    assert all_text(run(session, [speech(1), None])) == "Ok."


@pytest.mark.parametrize("bad, message", [
    (torch.full((16000,), float("nan")), "NaN or infinite"),
    (torch.ones(16000, dtype=torch.int16), "float samples"),
    (torch.zeros(2, 16000), "mono"),
])
def test_bad_slices_are_refused_and_leave_the_session_untouched(bad, message):
    session, _ = make_session({1: RESPOND}, {1: "Fine."})
    with pytest.raises(ValueError, match=message):
        session.feed(bad)
    assert not session.listening and session.transcript == []
    assert all_text(run(session, [speech(1), None])) == "Fine."  # the conversation still works
    assert [e.slice_index for e in session.feed(None)] == [2]  # the refused slice took no index


def test_config_from_dict_rejects_unknown_keys_and_builds_sampling():
    config = DuplexConfig.from_dict({"tokens_per_slice": 2, "reply_sampling": {"temperature": 0.5, "top_k": 5}})
    assert config.reply_sampling == SamplingConfig(temperature=0.5, top_k=5)
    with pytest.raises(ValueError, match="tokens_per_slce"):
        DuplexConfig.from_dict({"tokens_per_slce": 2}, source="duplex/duplex.yaml")
    with pytest.raises(ValueError, match="duplex.yaml: duplex.state_sampling"):
        DuplexConfig.from_dict({"state_sampling": {"temprature": 1.0}}, source="duplex/duplex.yaml")


@pytest.mark.parametrize("values, message", [
    ({"tokens_per_slice": "four"}, r"duplex\.tokens_per_slice must be of type int \(like 4\), got 'four'"),
    ({"tokens_per_slice": 2.5}, "tokens_per_slice must be of type int"),
    ({"force_reply_on_silence": "yes"}, "force_reply_on_silence must be of type bool"),
    ({"reply_sampling": "greedy"}, "reply_sampling must be of type SamplingConfig"),
    ({"tokens_per_slice": 0}, r"duplex\.yaml: duplex block: DuplexConfig: .*tokens_per_slice"),
])
def test_config_values_of_the_wrong_type_or_range_name_the_file(values, message):
    with pytest.raises(ValueError, match=message):
        DuplexConfig.from_dict(values, source="duplex/duplex.yaml")
    assert DuplexConfig.from_dict({"slice_seconds": 2, "max_branch_tokens": 64}).slice_seconds == 2


def test_tokenizer_without_state_tokens_is_refused():
    with pytest.raises(ValueError, match="one token"):
        TurnTokens.from_tokenizer(load_tokenizer(num_state_tokens=1), TurnPrompts.default())


def make_tiny_lm():
    """A random Mamba with the real vocabulary size, so the real tokenizer and prompts can drive it."""
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=32, num_hidden_layers=2, state_size=8,
                                        expand=2, conv_kernel=4)).eval()


@pytest.fixture(scope="module")
def tiny_lm():
    return make_tiny_lm()


def test_same_seed_same_timeline_on_a_real_tiny_mamba(tiny_lm):
    runtime, tokenizer = TorchMambaRuntime(tiny_lm), load_tokenizer()
    projection = torch.randn(1, 32)

    def encoder(wav):  # (N,) -> (1, N // 3200, 32): a deterministic stand-in for the speech encoder
        frames = wav[: wav.numel() // 3200 * 3200].reshape(-1, 3200).mean(-1, keepdim=True)
        return (frames @ projection).unsqueeze(0)

    def timeline(seed):
        config = DuplexConfig(seed=seed, max_branch_tokens=80, state_tokens_only=False)  # random LM: forced reply
        session = DuplexSession(runtime, encoder, tokenizer, config)
        wav = torch.randn(16000 * 2, generator=torch.Generator().manual_seed(5))
        events = run(session, [wav, wav[:8000], None, torch.zeros(0), None]) + session.finish()
        replies = "".join(turn.text for turn in session.transcript if turn.role == "assistant")
        assert all_text(events) == replies  # streamed pieces add up to the decoded replies
        return [e.to_json() for e in events], session.conversation_text()

    first = timeline(11)
    assert first == timeline(11)
    assert first != timeline(12)
    assert any(e["text"] for e in first[0]) and "Assistant" in first[1]


class ForcedProbe:
    """Runtime mixin: a real tiny Mamba whose state-token probes answer from a script (in order), so real
    sampling can be checked under an ignored interruption."""

    def __init__(self, hf_model, end_of_speech_ids, probe_answers, **kwargs):
        super().__init__(hf_model, **kwargs)
        self.marker = self.embed(torch.tensor([end_of_speech_ids]))
        self.probe_answers = list(probe_answers)

    def prefill_many(self, states, chunks, fork_at=None):
        """A probe is a forked row whose fork took exactly <|endofspeech|>; its logits are the scripted answer."""
        logits, forks = super().prefill_many(states, chunks, fork_at)
        for i, at in enumerate(fork_at or []):
            tail = None if at is None else chunks[i][at:].to(self.marker)  # (E, H)
            if tail is not None and tail.shape == self.marker[0].shape and torch.equal(tail, self.marker[0]):
                logits[i] = -1e4
                logits[i, self.probe_answers.pop(0)] = 0.0
        return logits, forks


class ForcedProbeRuntime(ForcedProbe, TorchMambaRuntime):
    pass


def test_ignored_interruption_keeps_a_sampled_real_reply_unchanged(tiny_lm):
    tokenizer = load_tokenizer()
    tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
    encoder = lambda wav: torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(int(wav.numel())))

    def texts(slices, answers):
        runtime = ForcedProbeRuntime(tiny_lm, list(tokens.end_of_speech), answers)
        session = DuplexSession(runtime, encoder, tokenizer, DuplexConfig(seed=3, max_branch_tokens=200))
        return [e.text for e in run(session, slices)]

    plain = texts([torch.zeros(16000)] + [None] * 6, [tokens.respond])
    noisy = texts([torch.zeros(16000), None, torch.zeros(8000)] + [None] * 4, [tokens.respond, tokens.ignore])
    assert noisy == plain and "".join(plain)


class OffScriptProbeRuntime(ScriptedRuntime):
    """After <|endofspeech|> the top token is an ordinary character, with <|ignore|> the best state token."""

    def _logits(self, history):
        logits = super()._logits(history)
        if history[-len(self.tokens.end_of_speech):] == list(self.tokens.end_of_speech):
            logits.zero_()
            logits[0, 100 + ord("z")], logits[0, IGNORE] = 50.0, 10.0
        return logits


@pytest.mark.parametrize("restricted, expected", [(True, ("<|ignore|>", False)), (False, ("z", True))])
def test_probe_restricted_to_state_tokens_or_any_token_meaning_incomplete(restricted, expected):
    runtime = OffScriptProbeRuntime(TOKENS, {1: RESPOND}, {})
    session = DuplexSession(runtime, fake_encoder, CharTokenizer(), DuplexConfig(state_tokens_only=restricted),
                            prompts=PROMPTS)
    event = session.feed(speech(1))[0]
    assert (event.state_token, session.listening) == expected


def test_every_branch_is_given_back_to_a_pooled_runtime(tiny_lm):
    from duplex.cuda_runtime import CudaMambaRuntime  # on CPU: reference math with pool semantics

    tokenizer = load_tokenizer()
    tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
    answers = [tokens.respond, tokens.ignore, tokens.incomplete, tokens.respond]
    pooled = type("PooledForcedProbe", (ForcedProbe, CudaMambaRuntime), {})
    probed = pooled(tiny_lm, list(tokens.end_of_speech), answers, max_rows=3, kernels="torch")
    encoder = lambda wav: torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(int(wav.numel())))
    session = DuplexSession(probed, encoder, tokenizer, DuplexConfig(seed=0, max_branch_tokens=120))
    wav = torch.zeros(16000)
    changes = [e.changes for e in run(session, [wav, None, wav, wav, None, wav, None])]
    assert changes[2] == [ev.LISTEN_START, ev.IGNORED]
    assert changes[4] == [ev.INTERRUPT, ev.REPLY_START, ev.FORCED_REPLY]
    assert changes[5] == [ev.LISTEN_START, ev.INTERRUPT, ev.REPLY_START]
    session.finish()
    assert probed.free_rows == 2  # only the speaker's row is still held
    session.close()
    assert probed.free_rows == 3


@pytest.mark.cuda
def test_gpu_backend_plays_the_same_greedy_conversation(tiny_lm):
    gpu_lm = MambaForCausalLM(tiny_lm.config).eval()
    gpu_lm.load_state_dict(tiny_lm.state_dict())
    assert play_scripted_conversation("gpu", gpu_lm.cuda())[0] == play_scripted_conversation("torch", tiny_lm)[0]


@pytest.mark.slow
def test_fused_kernels_play_the_same_greedy_conversation_under_the_interpreter():
    """The GPU backend's kernels (Triton interpreter, CPU) in a whole session: one-pass probes with the
    speaker's token riding along, an ignored interruption, forced replies."""
    pytest.importorskip("triton")
    from tests.test_cuda_runtime import run_interpreted
    run_interpreted("check_interpreted_conversation", module="tests.test_session")


def check_interpreted_conversation(kernels):
    lm = make_tiny_lm()
    events, state = play_scripted_conversation(kernels, lm)
    want_events, want_state = play_scripted_conversation("torch", lm)
    assert events == want_events
    torch.testing.assert_close(state, want_state)


def play_scripted_conversation(backend, model):
    """A greedy conversation with scripted probes (respond, ignore, respond); (state token, text, changes)
    per event, and the SSM state of the last speaker (after an ignored interruption fed its token in the
    listener's pass). ``backend``: "torch" (the reference runtime), "gpu" (the GPU backend as it picks) or
    "triton" (the GPU backend's kernels, eager: works under Triton's interpreter)."""
    from duplex.cuda_runtime import CudaMambaRuntime

    tokenizer = load_tokenizer()
    tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
    answers = [tokens.respond, tokens.ignore, tokens.respond]
    greedy = SamplingConfig(greedy=True)
    config = DuplexConfig(seed=0, max_branch_tokens=90, state_sampling=greedy, reply_sampling=greedy)
    encoder = lambda wav: torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(int(wav.numel())))
    slices = [torch.zeros(16000), None, torch.zeros(8000), torch.zeros(12000), None]
    runtime_class, options = {"torch": (TorchMambaRuntime, {}), "gpu": (CudaMambaRuntime, {}),
                              "triton": (CudaMambaRuntime, {"kernels": "triton", "use_graphs": False})}[backend]
    runtime = type("Probed", (ForcedProbe, runtime_class), {})(model, list(tokens.end_of_speech), answers, **options)
    session = DuplexSession(runtime, encoder, tokenizer, config)
    events = run(session, slices) + session.finish()
    return [(e.state_token, e.text, e.changes) for e in events], session._speaker.state.ssm.clone()


def test_listener_context_none_hears_each_turn_on_the_empty_state():
    """`listener_context: none`: an interruption is answered from its own prompt and speech alone (the
    conversation is not in its context), and a false interruption still leaves the running reply unchanged."""
    session, runtime = make_session({1: RESPOND, 3: RESPOND}, {1: "A long first answer.", 3: "Second."},
                                    listener_context="none")
    timeline = run(session, [speech(1), None, speech(3), None, None])
    assert timeline[2].changes == [ev.LISTEN_START, ev.INTERRUPT, ev.REPLY_START]
    assert runtime.reply_contexts == [answer_context(ids("<U>"), speech_ids(1)),
                                      answer_context(ids("<U>"), speech_ids(3))]
    replies = {1: "An answer that takes several slices to finish."}
    plain, _ = make_session({1: RESPOND}, replies, listener_context="none")
    interrupted, _ = make_session({1: RESPOND, 4: IGNORE}, replies, listener_context="none")
    reference = run(plain, [speech(1)] + [None] * 14)
    with_noise = run(interrupted, [speech(1), None, speech(4), None] + [None] * 11)
    assert with_noise[2].changes == [ev.LISTEN_START, ev.IGNORED]
    assert [e.text for e in with_noise] == [e.text for e in reference]


def test_listener_context_must_be_known():
    with pytest.raises(ValueError, match="listener_context must be one of"):
        DuplexConfig(listener_context="speaker")
    with pytest.raises(ValueError, match="demo.yaml: duplex block: .*listener_context"):
        DuplexConfig.from_dict({"listener_context": "all"}, source="demo.yaml")
