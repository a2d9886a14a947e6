"""Session snapshots: a conversation saved at any slice boundary and restored continues bit-identically; bad
files are refused before anything is allocated."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save as save_tensors
from transformers import MambaConfig, MambaForCausalLM

from duplex import events as ev
from duplex import snapshot as snap
from duplex.cuda_runtime import CudaMambaRuntime
from duplex.engine import Engine
from duplex.runtime import TorchMambaRuntime
from duplex.sampling import SamplingConfig
from duplex.session import DuplexConfig
from modules.tokenizer import load_tokenizer

HIDDEN = 32
SAMPLED = DuplexConfig(seed=7, max_branch_tokens=60, tokens_per_slice=3,
                       state_sampling=SamplingConfig(temperature=2.0),
                       reply_sampling=SamplingConfig(temperature=0.8, top_p=0.9, top_k=50))
GREEDY = dataclasses.replace(SAMPLED, state_sampling=SamplingConfig(temperature=2.0),
                             reply_sampling=SamplingConfig(greedy=True))


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=HIDDEN, num_hidden_layers=2, state_size=8,
                                        expand=2, conv_kernel=4)).eval()


class TinySpeechEncoder(torch.nn.Module):
    """(N,) -> (1, N // 3200, H): a deterministic stand-in with weights (so the model hash covers it)."""

    def __init__(self, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.projection = torch.nn.Linear(1, HIDDEN)

    def forward(self, wav):
        frames = wav[: wav.numel() // 3200 * 3200].reshape(-1, 3200).mean(-1, keepdim=True)  # (P, 1)
        return self.projection(frames * 50).unsqueeze(0)  # (1, P, H)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def make_engine(lm, tokenizer, config=SAMPLED, pooled=False, encoder=None, rows=4):
    runtime = CudaMambaRuntime(lm, max_rows=rows, kernels="torch") if pooled else TorchMambaRuntime(lm)
    return Engine(runtime, encoder or TinySpeechEncoder(), tokenizer, config)


def script():
    """Speech of several lengths and silences: turns open, get answered, interrupted, ignored, forced."""
    noise = torch.Generator().manual_seed(3)
    speech = [torch.randn(int(16000 * s), generator=noise) * 0.1 for s in (2.0, 1.0, 1.5, 2.0, 0.5, 1.0, 2.0)]
    return [speech[0], speech[1], None, speech[2], speech[3], None, speech[4], speech[5], None, None, speech[6]]


def listening_while_speaking(engine):
    """A session of ``engine`` played until a user turn is open during a reply (both branches live)."""
    session = engine.new_session()
    for piece in script():
        play(session, [piece])
        if session.listening and session.speaking:
            return session
    raise AssertionError("the script never opens a turn during a reply")


def play(session, slices):
    return [event.to_json() for piece in slices for event in session.feed(piece)]


def whole(engine, slices):
    session = engine.new_session()
    events = play(session, slices) + [e.to_json() for e in session.finish()]
    text = session.conversation_text()
    session.close()
    return events, text


@pytest.mark.parametrize("config", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_restore_at_every_slice_boundary_continues_bit_identically(lm, tokenizer, tmp_path, config):
    slices = script()
    engine = make_engine(lm, tokenizer, config)
    want = whole(engine, slices)
    changes = {c for event in want[0] for c in event["changes"]}
    assert {ev.LISTEN_START, ev.REPLY_START, ev.IGNORED, ev.INTERRUPT} <= changes  # the script covers them
    assert any(event["text"] for event in want[0])
    session = engine.new_session()  # one slice event per slice: the first `cut` events are want's
    for cut, piece in enumerate([*slices, None]):
        snap.snapshot(session, tmp_path / f"cut{cut}.snap")
        if cut < len(slices):
            session.feed(piece)
    other_process = make_engine(tiny_lm(), tokenizer, config)  # same weights, built anew
    for cut in range(len(slices) + 1):
        restored = snap.restore(other_process, tmp_path / f"cut{cut}.snap")
        events = play(restored, slices[cut:]) + [e.to_json() for e in restored.finish()]
        assert (want[0][:cut] + events, restored.conversation_text()) == want, cut
        restored.close()


def test_pool_runtime_restores_into_pool_rows(lm, tokenizer, tmp_path):
    slices = script()
    engine = make_engine(lm, tokenizer, pooled=True)
    want = whole(engine, slices)
    assert engine.runtime.free_rows == 4
    for cut in (2, 4, 7):
        first = engine.new_session()
        events = play(first, slices[:cut])
        snap.snapshot(first, tmp_path / "s.snap")
        held = 4 - engine.runtime.free_rows
        restored = snap.restore(engine, tmp_path / "s.snap")  # both live at once: rows are taken, not shared
        assert engine.runtime.free_rows == 4 - 2 * held
        first.close()
        events += play(restored, slices[cut:]) + [e.to_json() for e in restored.finish()]
        assert (events, restored.conversation_text()) == want, cut
        restored.close()
        assert engine.runtime.free_rows == 4


def test_snapshot_leaves_the_session_unchanged(lm, tokenizer, tmp_path):
    slices = script()
    engine = make_engine(lm, tokenizer)
    want = whole(engine, slices)
    session = engine.new_session()
    events = []
    for piece in slices:
        events += play(session, [piece])
        snap.snapshot(session, tmp_path / "every_slice.snap")
    events += [e.to_json() for e in session.finish()]
    assert (events, session.conversation_text()) == want


def test_restored_turns_are_the_branches_turns(lm, tokenizer, tmp_path):
    """A branch's user and reply turns are transcript entries (the same objects), as in the saved session,
    so the reply text and the statuses keep landing in the transcript."""
    engine = make_engine(lm, tokenizer)
    session = listening_while_speaking(engine)
    snap.snapshot(session, tmp_path / "s.snap")
    restored = snap.restore(engine, tmp_path / "s.snap")

    def turn_indices(s):
        return [next(i for i, turn in enumerate(s.transcript) if turn is candidate)
                for candidate in (s._speaker.user_turn, s._speaker.reply_turn, s._listener.user_turn)]

    assert turn_indices(restored) == turn_indices(session)
    assert restored._speaker.state.equal(session._speaker.state)
    assert restored._listener.state.equal(session._listener.state)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture()
def saved(lm, tokenizer, tmp_path):
    """A pooled engine and a snapshot of a session with both branches live."""
    engine = make_engine(lm, tokenizer, pooled=True)
    session = listening_while_speaking(engine)
    path = snap.snapshot(session, tmp_path / "good.snap")
    session.close()
    return engine, path


def assert_refused(engine, path, message):
    free = engine.runtime.free_rows
    with pytest.raises(snap.SnapshotError, match=message) as error:
        snap.restore(engine, path)
    assert isinstance(error.value, ValueError) and str(path) in str(error.value)
    assert engine.runtime.free_rows == free  # nothing was taken


def rewrite(path, change):
    """Rewrite a snapshot with ``change(record, tensors)`` applied and a valid checksum (a well-formed file)."""
    record, tensors = snap.read_snapshot(path)
    change(record, tensors)
    text = json.dumps(record)
    path.write_bytes(save_tensors(tensors, metadata={snap.JSON_KEY: text,
                                                     snap.CHECKSUM_KEY: snap._checksum(text, tensors)}))


def test_a_snapshot_of_another_model_is_refused(saved, tokenizer):
    _, path = saved
    assert_refused(make_engine(tiny_lm(seed=5), tokenizer, pooled=True), path, "another model.*sha256")
    assert_refused(make_engine(tiny_lm(), tokenizer, pooled=True, encoder=TinySpeechEncoder(seed=9)), path,
                   "another model.*sha256")


def test_another_protocol_version_is_refused(saved):
    engine, path = saved
    rewrite(path, lambda record, tensors: record.update(version=snap.VERSION + 1))
    assert_refused(engine, path, f"protocol version {snap.VERSION + 1}")


def test_another_device_type_is_refused(saved):
    engine, path = saved
    rewrite(path, lambda record, tensors: record.update(device="cuda"))
    assert_refused(engine, path, "taken on a cuda runtime")


def test_wrong_state_shapes_are_refused(saved):
    engine, path = saved
    rewrite(path, lambda record, tensors: tensors.update({"speaker.ssm": tensors["speaker.ssm"][:, :, :3].contiguous()}))
    assert_refused(engine, path, "speaker.ssm")


@pytest.mark.parametrize("keep", [0.5, 0.99, 12, 5])
def test_a_truncated_file_is_refused(saved, keep):
    engine, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    assert_refused(engine, path, "truncated|not a safetensors")


@pytest.mark.parametrize("where", ["tensors", "json", "checksum"])
def test_a_corrupted_file_is_refused(saved, where):
    engine, path = saved
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    text = data[:header_end].decode("latin-1")  # byte offsets = character offsets
    position = {"tensors": len(data) - 100, "json": text.index("transcript") + 2,
                "checksum": text.index(snap.CHECKSUM_KEY) + len(snap.CHECKSUM_KEY) + 10}[where]
    data[position] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    assert_refused(engine, path, "corrupted")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"{\"format\": 1}",
                                     save_tensors({"x": torch.zeros(3)}), os.urandom(4096)],
                         ids=["empty", "text", "json", "other_safetensors", "random"])
def test_a_file_that_is_not_a_snapshot_is_refused(saved, tmp_path, content):
    engine, _ = saved
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    assert_refused(engine, path, "not a duplex session snapshot|truncated")


def test_a_missing_file_is_refused(saved, tmp_path):
    engine, _ = saved
    assert_refused(engine, tmp_path / "missing.snap", "cannot read")


# ---------------------------------------------------------------------------------------------- writing
def test_snapshot_replaces_a_file_atomically(lm, tokenizer, tmp_path, monkeypatch):
    engine = make_engine(lm, tokenizer)
    session = engine.new_session()
    play(session, script()[:2])
    path = snap.snapshot(session, tmp_path / "s.snap")
    before = path.read_bytes()
    play(session, script()[2:4])

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        snap.snapshot(session, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.snap"]


def test_fingerprint_sees_weights_and_encoder_and_is_reusable(lm, tokenizer):
    engine = make_engine(lm, tokenizer)
    same = snap.engine_fingerprint(make_engine(tiny_lm(), tokenizer))
    assert snap.engine_fingerprint(engine) == same
    changed = tiny_lm()
    with torch.no_grad():
        changed.backbone.layers[1].mixer.out_proj.weight.mul_(1.001)
    assert snap.engine_fingerprint(make_engine(changed, tokenizer))["sha256"] != same["sha256"]
    encoder = snap.engine_fingerprint(make_engine(lm, tokenizer, encoder=TinySpeechEncoder(seed=2)))
    assert encoder["sha256"] != same["sha256"] and encoder["encoder"] == "TinySpeechEncoder"


def test_a_given_fingerprint_is_used_as_is(lm, tokenizer, tmp_path):
    engine = make_engine(lm, tokenizer)
    session = engine.new_session()
    play(session, script()[:1])
    fingerprint = snap.engine_fingerprint(engine)
    snap.snapshot(session, tmp_path / "s.snap", fingerprint=fingerprint)
    restored = snap.restore(engine, tmp_path / "s.snap", fingerprint=fingerprint)
    assert restored.conversation_text() == session.conversation_text()
    with pytest.raises(snap.SnapshotError, match="another model"):
        snap.restore(engine, tmp_path / "s.snap", fingerprint={**fingerprint, "sha256": "0" * 64})


def test_hand_made_records_are_refused_before_a_state_is_taken(saved):
    engine, path = saved
    rewrite(path, lambda record, tensors: record["branches"]["listener"].update(user_turn=99))
    assert_refused(engine, path, "names turns")


def test_a_missing_generator_state_is_refused(saved):
    engine, path = saved
    rewrite(path, lambda record, tensors: tensors.pop("rng.reply"))
    assert_refused(engine, path, "rng.reply")


@pytest.mark.cuda
@pytest.mark.parametrize("config", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_gpu_pool_rows_restore_bit_identically(tokenizer, tmp_path, config):
    """The GPU backend (fused kernels, graphs, CUDA generators): restored into other pool rows, same events."""
    def gpu_engine():
        lm = tiny_lm().cuda()
        encoder = TinySpeechEncoder().cuda()
        return Engine(CudaMambaRuntime(lm, max_rows=6), lambda wav: encoder(wav.cuda()), tokenizer, config)

    slices = script()
    engine = gpu_engine()
    want = whole(engine, slices)
    for cut in range(len(slices) + 1):
        first = engine.new_session()
        events = play(first, slices[:cut])
        snap.snapshot(first, tmp_path / "s.snap")
        first.close()
        blocker = engine.runtime.new_state(1)  # the restored branches land on other rows than the saved ones
        restored = snap.restore(engine, tmp_path / "s.snap")
        events += play(restored, slices[cut:]) + [e.to_json() for e in restored.finish()]
        assert (events, restored.conversation_text()) == want, cut
        restored.close()
        engine.runtime.release(blocker)
    other = gpu_engine()  # another runtime (another process, same weights)
    first = engine.new_session()
    events = play(first, slices[:5])
    snap.snapshot(first, tmp_path / "s.snap")
    restored = snap.restore(other, tmp_path / "s.snap")
    events += play(restored, slices[5:]) + [e.to_json() for e in restored.finish()]
    assert (events, restored.conversation_text()) == want


def test_a_restored_session_closed_at_once_gives_its_rows_back(saved):
    engine, path = saved
    free = engine.runtime.free_rows
    restored = snap.restore(engine, path)
    assert engine.runtime.free_rows == free - 2
    restored.close()
    assert engine.runtime.free_rows == free


def test_a_session_in_a_shared_scheduler_moves_between_ticks(lm, tokenizer, tmp_path):
    """Two conversations batched by one Scheduler; one is saved between two ticks, closed, restored and added
    back: both give the events each gives alone."""
    engine = make_engine(lm, tokenizer, pooled=True, rows=8)
    talks = {"a": script(), "b": script()[::-1]}
    want = {name: whole(engine, slices)[0] for name, slices in talks.items()}
    scheduler = engine.new_scheduler()
    sessions = {name: engine.new_session() for name in talks}
    for session in sessions.values():
        scheduler.add(session)
    got = {name: [] for name in talks}

    def tick():
        names = {id(session): name for name, session in sessions.items()}
        for session, event in scheduler.tick():
            got[names[id(session)]].append(event.to_json())

    for index in range(len(talks["a"])):
        if index == 5:
            scheduler.submit(sessions["a"], talks["a"][index])
            with pytest.raises(ValueError, match="queued in its scheduler"):
                snap.snapshot(sessions["a"], tmp_path / "a.snap")
            tick()
            snap.snapshot(sessions["a"], tmp_path / "a.snap")
            sessions["a"].close()
            sessions["a"] = snap.restore(engine, tmp_path / "a.snap")
            scheduler.add(sessions["a"])
            scheduler.submit(sessions["b"], talks["b"][index])
            tick()
            continue
        for name, session in sessions.items():
            scheduler.submit(session, talks[name][index])
        tick()
    for session in sessions.values():
        scheduler.submit_finish(session)
    while scheduler.has_work():
        tick()
    assert got == want
