"""The multi-session scheduler (duplex/scheduler.py) and the batched runtime operations it runs.

* N sessions through one scheduler produce exactly the events and texts each produces alone through ``feed`` /
  ``finish`` (the N = 1 case of the same code), with sessions that start and end at different times,
  interruptions, ignored speech and incomplete turns interleaved: on the scripted fake LM (exact contexts) and on
  a real tiny Mamba (fp32 torch runtime, greedy probes forced per slice, greedy and sampled replies).
* ``prefill_many`` over chunks of different lengths equals per-row prefill, token steps and transformers' full
  forward; its probe forks equal prefill -> fork -> prefill; ``step_many`` equals per-row steps.
"""
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from duplex import events as ev
from duplex.runtime import TorchMambaRuntime, prefill_then_fork
from duplex.sampling import SamplingConfig
from duplex.scheduler import Scheduler
from duplex.session import DuplexConfig, DuplexSession, TurnPrompts, TurnTokens
from modules.tokenizer import load_tokenizer
from tests.test_session import (IGNORE, INCOMPLETE, PROMPTS, RESPOND, CharTokenizer, ScriptedRuntime, TOKENS,
                                fake_encoder, make_tiny_lm, speech)

ATOL = 2e-5
FINISH = "finish"


# ---------------------------------------------------------------------------------------------- batched runtime ops
@pytest.fixture(scope="module")
def small_lm():
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8,
                                        expand=2, conv_kernel=4)).eval()


def _contexts(runtime, lengths, seed=0):
    """Branches with different histories (prefilled 3, 7, ... tokens) and their ids."""
    states, histories = [], []
    for i, length in enumerate(lengths):
        ids = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(seed + i))
        state = runtime.new_state(1)
        runtime.prefill(state, runtime.embed(ids))
        states.append(state)
        histories.append(ids)
    return states, histories


def test_variable_length_prefill_equals_per_row_steps_and_full_forward(small_lm):
    runtime = TorchMambaRuntime(small_lm)
    chunk_lengths = [5, 1, 9, 2]
    states, histories = _contexts(runtime, [3, 7, 4, 6])
    new_ids = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(50 + n)) for n in chunk_lengths]
    singles = [s.clone() for s in states]
    stepped = [s.clone() for s in states]
    logits, forks = runtime.prefill_many(states, [runtime.embed(ids[None])[0] for ids in new_ids])  # (4, V)
    assert forks == [None] * 4 and [s.seqlen[0] for s in states] == [8, 8, 13, 8]
    for i, ids in enumerate(new_ids):
        alone = runtime.prefill(singles[i], runtime.embed(ids[None]))  # (1, V)
        for t in range(ids.numel()):
            step_logits = runtime.step(stepped[i], runtime.embed(ids[None, t:t + 1]))
        full = small_lm(torch.cat([histories[i], ids[None]], dim=1)).logits[:, -1]  # transformers' own forward
        for other, state in ((alone, singles[i]), (step_logits, stepped[i]), (full, None)):
            torch.testing.assert_close(logits[i:i + 1], other, atol=ATOL, rtol=1e-5)
            if state is not None:
                torch.testing.assert_close(states[i].conv, state.conv, atol=ATOL, rtol=1e-5)
                torch.testing.assert_close(states[i].ssm, state.ssm, atol=ATOL, rtol=1e-5)


def test_probe_forks_inside_the_batch_equal_prefill_then_fork(small_lm):
    runtime = TorchMambaRuntime(small_lm)
    states, _ = _contexts(runtime, [2, 5, 8])
    chunks = [torch.randn(n, 32, generator=torch.Generator().manual_seed(n)) * 0.1 for n in (6, 3, 10)]
    fork_at = [4, None, 7]
    reference = [s.clone() for s in states]
    logits, forks = runtime.prefill_many(states, chunks, fork_at)
    for i, (chunk, at) in enumerate(zip(chunks, fork_at)):
        if at is None:
            want = runtime.prefill(reference[i], chunk[None])
            assert forks[i] is None
        else:
            fork, want = prefill_then_fork(runtime, reference[i], chunk[None], at)
            assert forks[i].seqlen == fork.seqlen and states[i].seqlen == reference[i].seqlen
            torch.testing.assert_close(forks[i].ssm, fork.ssm, atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(forks[i].conv, fork.conv, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(logits[i:i + 1], want, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(states[i].ssm, reference[i].ssm, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(states[i].conv, reference[i].conv, atol=ATOL, rtol=1e-5)


def test_step_many_equals_per_row_steps_and_bad_batches_are_refused(small_lm):
    runtime = TorchMambaRuntime(small_lm)
    states, _ = _contexts(runtime, [3, 4, 5])
    singles = [s.clone() for s in states]
    embeds = runtime.embed(torch.tensor([[7], [8], [9]]))  # (3, 1, H)
    logits = runtime.step_many(states, embeds)
    for i, state in enumerate(singles):
        torch.testing.assert_close(logits[i:i + 1], runtime.step(state, embeds[i:i + 1]), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(states[i].ssm, state.ssm, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="fork_at 5 of chunk 0"):
        runtime.prefill_many(states[:1], [torch.zeros(5, 32)], [5])
    with pytest.raises(ValueError, match="one of each"):
        runtime.prefill_many(states, [torch.zeros(5, 32)])
    with pytest.raises(ValueError, match=r"one token per row"):
        runtime.step_many(states, torch.zeros(3, 2, 32))


# ---------------------------------------------------------------------------------------------- N sessions = N alone
# Each script: (first tick, items); an item is a wav, None (silence) or FINISH. Speech codes (tests.test_session):
# 1, 3, 7 answered, 2 and 4 ignored, 5 and 6 incomplete.
SCRIPTS = {
    "interrupted": (0, [speech(1), None, speech(3), None, None, FINISH]),
    "incomplete": (2, [speech(5), speech(6), speech(7, 0.5), None, FINISH]),
    "ignored_noise": (1, [speech(1), None, speech(4), None, None, None, None]),
    "reset_first": (0, [speech(2), speech(1), None, FINISH]),
    "late_question": (4, [None, speech(5), None, None, speech(1), FINISH]),
}
DECISIONS = {1: RESPOND, 2: IGNORE, 3: RESPOND, 4: IGNORE, 5: INCOMPLETE, 6: INCOMPLETE, 7: RESPOND}
REPLIES = {1: "A long first answer, long enough to be interrupted.", 3: "Second.", 7: "Done.", 5: "Forced one."}


def play_together(make_runtime, make_session, encoder, scripts, remove_after=None):
    """All scripts through one scheduler; a session is added at its first tick, fed one item per tick, and
    (``remove_after``) removed some ticks after its script ends."""
    runtime = make_runtime()
    scheduler = Scheduler(runtime, encoder)
    sessions, events = {}, {name: [] for name in scripts}
    last = max(start + len(items) for start, items in scripts.values())
    tick = 0
    while tick < last or scheduler.has_work() or (remove_after is not None and scheduler.sessions):
        for name, (start, items) in scripts.items():
            if tick == start:
                sessions[name] = make_session(runtime, name)
                scheduler.add(sessions[name])
            if start <= tick < start + len(items):
                item = items[tick - start]
                if item is FINISH:
                    scheduler.submit_finish(sessions[name])
                else:
                    scheduler.submit(sessions[name], item, label=f"{name}:{tick - start}")
            removable = name in sessions and sessions[name] in scheduler.sessions
            if remove_after is not None and tick >= start + len(items) + remove_after and removable \
                    and not scheduler.pending(sessions[name]):
                scheduler.remove(sessions[name])
        for session, event in scheduler.tick():
            name = next(n for n, s in sessions.items() if s is session)
            events[name].append(event.to_json())
        tick += 1
    return {name: (events[name], sessions[name].conversation_text()) for name in scripts}, scheduler


def scripted_session(runtime, name=None):
    return DuplexSession(runtime, fake_encoder, CharTokenizer(), DuplexConfig(), prompts=PROMPTS)


def play_alone(session, name, items):
    """One script through ``feed`` / ``finish`` (labels as play_together gives them); (events, transcript)."""
    events = []
    for i, item in enumerate(items):
        events += session.finish() if item is FINISH else session.feed(item, label=f"{name}:{i}")
    return [e.to_json() for e in events], session.conversation_text()


def test_scripted_sessions_together_equal_each_alone():
    together, scheduler = play_together(lambda: ScriptedRuntime(TOKENS, DECISIONS, REPLIES), scripted_session,
                                        fake_encoder, SCRIPTS, remove_after=1)
    rounds_alone = 0
    for name, (start, items) in SCRIPTS.items():
        session = scripted_session(ScriptedRuntime(TOKENS, DECISIONS, REPLIES))
        alone = play_alone(session, name, items)
        assert together[name] == alone, name
        rounds_alone += session._scheduler.rounds
    assert scheduler.rounds < 0.6 * rounds_alone  # the sessions' work really ran in shared rounds
    changes = [c for events, _ in together.values() for e in events for c in e["changes"]]
    assert {ev.INTERRUPT, ev.IGNORED, ev.RESET, ev.FORCED_REPLY, ev.REPLY_END} <= set(changes)
    assert scheduler.sessions == [] and scheduler.stats["ticks"] > 0


def test_final_reply_streams_one_event_per_tick_while_others_go_on():
    runtime = ScriptedRuntime(TOKENS, DECISIONS, REPLIES)
    scheduler = Scheduler(runtime, fake_encoder)
    ending, talking = scripted_session(runtime), scripted_session(runtime)
    scheduler.add(ending)
    scheduler.add(talking)
    scheduler.submit(ending, speech(1))
    scheduler.tick()
    scheduler.submit_finish(ending)
    finals = []
    for _ in range(3):
        scheduler.submit(talking, None)
        out = scheduler.tick()
        assert [s for s, _ in out].count(talking) == 1  # the other conversation is not held up
        finals.append([e for s, e in out if s is ending])
    assert [len(f) for f in finals] == [1, 1, 1] and all(f[0].input == "final" for f in finals)
    while scheduler.has_work():
        scheduler.tick()
    assert not ending.speaking


def test_real_tiny_mamba_sessions_together_equal_each_alone():
    """fp32 torch runtime, real tokenizer; probes answer from a per-slice code, replies are the model's own:
    greedy for some sessions, sampled with each session's seed for others."""
    lm = make_tiny_lm()
    tokenizer = load_tokenizer()
    tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
    answers = {1: tokens.respond, 2: tokens.ignore, 3: tokens.respond, 4: tokens.ignore, 5: tokens.incomplete,
               6: tokens.incomplete, 7: tokens.respond}
    greedy = SamplingConfig(greedy=True)

    names = ("interrupted", "incomplete", "ignored_noise", "late_question")

    def make_session(runtime, name):
        seed = names.index(name)
        sampled = SamplingConfig(temperature=0.9, top_k=40)
        config = DuplexConfig(seed=seed, max_branch_tokens=60, state_sampling=greedy,
                              reply_sampling=sampled if seed % 2 else greedy)
        return DuplexSession(runtime, coded_encoder, tokenizer, config)

    scripts = {name: SCRIPTS[name] for name in names}
    together, _ = play_together(lambda: CodedProbeRuntime(lm, answers), make_session, coded_encoder, scripts)
    for name, (start, items) in scripts.items():
        alone = play_alone(make_session(CodedProbeRuntime(lm, answers), name), name, items)
        assert together[name] == alone, name
    assert any(e["text"] for events, _ in together.values() for e in events)


def coded_encoder(wav):
    """(N,) -> (1, N // 3200, 32): deterministic embeddings whose feature 0 carries the slice's code."""
    code = round(float(wav[0]))
    embeds = torch.randn(1, wav.numel() // 3200, 32, generator=torch.Generator().manual_seed(code)) * 0.5
    embeds[..., 0] = code
    return embeds


class CodedProbe:
    """Runtime mixin: a real tiny Mamba whose probes answer by the code of the slice's last speech position."""

    def __init__(self, hf_model, answers, **kwargs):
        super().__init__(hf_model, **kwargs)
        self.answers = answers

    def prefill_many(self, states, chunks, fork_at=None):
        logits, forks = super().prefill_many(states, chunks, fork_at)
        for i, at in enumerate(fork_at or []):
            if at is not None:
                logits[i] = -1e4
                logits[i, self.answers[round(float(chunks[i][at - 1, 0]))]] = 0.0
        return logits, forks


class CodedProbeRuntime(CodedProbe, TorchMambaRuntime):
    pass


# ---------------------------------------------------------------------------------------------- scheduler API
def test_sessions_are_added_once_limited_and_release_their_rows_when_removed():
    from duplex.cuda_runtime import CudaMambaRuntime  # on CPU: reference math with pool semantics

    lm = make_tiny_lm()
    tokenizer = load_tokenizer()
    answers = {1: TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default()).respond}
    runtime = type("Pooled", (CodedProbe, CudaMambaRuntime), {})(lm, answers, max_rows=6, kernels="torch")
    scheduler = Scheduler(runtime, coded_encoder, max_sessions=2)
    config = DuplexConfig(max_branch_tokens=40, state_sampling=SamplingConfig(greedy=True))
    a, b = (DuplexSession(runtime, coded_encoder, tokenizer, config) for _ in range(2))
    scheduler.add(a)
    scheduler.add(b)
    with pytest.raises(ValueError, match="already"):
        scheduler.add(a)
    with pytest.raises(RuntimeError, match="max_sessions 2"):
        scheduler.add(DuplexSession(runtime, coded_encoder, tokenizer, config))
    with pytest.raises(ValueError, match="different runtime"):
        Scheduler(TorchMambaRuntime(lm), coded_encoder).add(DuplexSession(runtime, coded_encoder, tokenizer, config))
    with pytest.raises(ValueError, match="NaN"):
        scheduler.submit(a, torch.full((16000,), float("nan")))
    with pytest.raises(RuntimeError, match="shared Scheduler"):
        a.feed(None)
    for session in (a, b):
        scheduler.submit(session, torch.full((16000,), 1.0))
    out = scheduler.tick()
    assert [e.slice_index for _, e in out] == [0, 0] and runtime.free_rows == 4  # one speaker each
    a.close()  # through the scheduler that holds it
    scheduler.remove(b)
    assert runtime.free_rows == 6 and scheduler.sessions == [] and not scheduler.has_work()
    with pytest.raises(KeyError, match="not added"):
        scheduler.submit(a, None)


def test_a_failing_session_is_reported_and_the_others_go_on():
    class BrokenTokenizer(CharTokenizer):
        def decode(self, ids):
            if ids and ids[0] >= 100:  # reply text
                raise RuntimeError("decoder broke")
            return super().decode(ids)

    runtime = ScriptedRuntime(TOKENS, DECISIONS, REPLIES)
    scheduler = Scheduler(runtime, fake_encoder)
    broken = DuplexSession(runtime, fake_encoder, BrokenTokenizer(), DuplexConfig(), prompts=PROMPTS)
    fine = scripted_session(runtime)
    scheduler.add(broken)
    scheduler.add(fine)
    for session in (broken, fine):
        scheduler.submit(session, speech(1))
        scheduler.submit(session, None)
    out = scheduler.tick()
    assert [s for s, _ in out] == [fine, fine] and out[0][1].text == "A lo"
    assert str(scheduler.failures[broken]) == "decoder broke" and scheduler.pending(broken) == 0
    alone = DuplexSession(runtime, fake_encoder, BrokenTokenizer(), DuplexConfig(), prompts=PROMPTS)
    with pytest.raises(RuntimeError, match="decoder broke"):  # feed (N = 1) raises it
        alone.feed(speech(1))


def test_equal_length_slices_are_encoded_in_one_batch_as_alone():
    from duplex.engine import _WavEncoder
    from modules.speech import build_speech_encoder

    torch.manual_seed(0)
    encoder = _WavEncoder(build_speech_encoder(d_model=16, num_layers=1, d_ffn=32, kernel_size=3, d_state=4,
                                               adapter_hidden=8, lm_dim=12).eval(), torch.device("cpu"))
    wavs = torch.randn(3, 48000, generator=torch.Generator().manual_seed(1)) * 0.1
    batch = encoder.encode_batch(wavs)  # (3, 15, 12)
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], encoder(wavs[i]), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- GPU backend's batched ops
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_gpu_backend_batched_ops_match_the_reference(kernels):
    """CudaMambaRuntime.prefill_many (one variable-length pass, probe forks inside, from pool rows) and
    fork_many / step_many against the reference; "triton": its kernels under Triton's CPU interpreter."""
    if kernels == "triton":
        pytest.importorskip("triton")
        from tests.test_cuda_runtime import run_interpreted
        run_interpreted("check_batched_ops", module="tests.test_scheduler")
    else:
        check_batched_ops(kernels)


@pytest.mark.cuda
def test_gpu_backend_batched_ops_match_the_reference_on_cuda():
    """The same on a GPU with the chosen kernels and CUDA graphs (fp32 weights)."""
    check_batched_ops("auto", device="cuda")


def check_batched_ops(kernels, device="cpu"):
    from duplex.cuda_runtime import CudaMambaRuntime
    from tests.test_cuda_runtime import tiny_lm

    lm = tiny_lm(hidden=32, layers=2, vocab=64).to(device)
    ref = TorchMambaRuntime(lm)
    options = {} if device == "cuda" else {"use_graphs": False}
    fast = CudaMambaRuntime(lm, max_rows=12, kernels=kernels, **options)
    gen = torch.Generator().manual_seed(0)
    histories = [torch.randint(0, 64, (1, n), generator=gen) for n in (3, 6, 2, 5)]
    ref_states, fast_states = [], []
    for ids in histories:
        for runtime, states in ((ref, ref_states), (fast, fast_states)):
            state = runtime.new_state(1)
            runtime.prefill(state, runtime.embed(ids.to(device)))
            states.append(state)
    chunks = [torch.randn(n, 32, generator=gen).to(device) * 0.5 for n in (5, 2, 7, 3)]
    fork_at = [3, None, 5, None]
    want_logits, want_forks = ref.prefill_many(ref_states, chunks, fork_at)
    logits, forks = fast.prefill_many(fast_states, chunks, fork_at)
    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(logits, want_logits, **tol)
    for got, want in [*zip(fast_states, ref_states), (forks[0], want_forks[0]), (forks[2], want_forks[2])]:
        assert got.seqlen == want.seqlen
        torch.testing.assert_close(got.conv, want.conv, **tol)
        torch.testing.assert_close(got.ssm, want.ssm, **tol)
    assert forks[1] is None and forks[3] is None
    copies = fast.fork_many(fast_states[:3])
    assert all(c.equal(s) for c, s in zip(copies, fast_states[:3]))
    embeds = fast.embed(torch.tensor([[4], [9], [1]], device=device))  # (3, 1, H)
    torch.testing.assert_close(fast.step_many(copies, embeds), ref.step_many(ref_states[:3], embeds), **tol)
    fast.release_many(copies + fast_states + [forks[0], forks[2]])
    assert fast.free_rows == 12


# ---------------------------------------------------------------------------------------------- benchmark scripts
def test_gpu_load_benchmark_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    """bench/load_gpu.py end to end (--device cpu --tiny): a results file with a run per N and the plot."""
    import json

    from bench import load_gpu
    assert load_gpu.main(["--device", "cpu", "--tiny", "--sessions", "1,2", "--slices", "3",
                          "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "load_gpu.json").read_text())
    assert [run["sessions"] for run in result["runs"]] == [1, 2]
    assert [run["slices"] for run in result["runs"]] == [3, 6]  # every slice answered with its event
    assert all(run["latency_p99_ms"] >= run["latency_p50_ms"] > 0 for run in result["runs"])
    assert (tmp_path / "load_gpu.png").stat().st_size > 0
