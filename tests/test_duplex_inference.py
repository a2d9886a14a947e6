"""duplex_inference.py end to end on the tiny CPU model, plus audio slicing and conversation scripts."""
import json
import pathlib

import pytest
import torch

import duplex_inference
from duplex import script as script_module
from duplex.engine import slice_audio
from duplex.script import load_script, script_slices, wav_events

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "duplex" / "duplex_tiny.yaml"
QUESTION = ROOT / "example" / "question_capital.wav"


@pytest.mark.parametrize("seconds, merge, expected", [
    (8.0, True, [3.0, 5.0]), (8.0, False, [3.0, 3.0, 2.0]), (9.0, True, [3.0, 3.0, 3.0]),
    (2.4, True, [2.4]), (0.05, True, [0.05]), (0.0, True, []),
])
def test_slice_audio_merges_the_short_tail_like_the_reference(seconds, merge, expected):
    wav = torch.arange(int(seconds * 16000), dtype=torch.float32)
    pieces = slice_audio(wav, 16000, 3.0, merge_short_tail=merge)
    assert [p.numel() / 16000 for p in pieces] == expected
    assert torch.equal(torch.cat(pieces) if pieces else wav, wav)  # nothing lost, nothing repeated


def test_script_events_expand_to_slices_with_expectations(tmp_path):
    script = tmp_path / "talk.yaml"
    script.write_text("events:\n- audio: a.wav\n  expect: [<|incomplete|>, <|endofuser|>]\n- silence: 6.0\n"
                      "- say: hello there\n  expect: [<|ignore|>]\n- text: spoken too\n")
    events = load_script(script)
    assert [e.kind for e in events] == ["audio", "silence", "say", "say"]
    assert events[0].path == (tmp_path / "a.wav").resolve()
    slices = script_slices(events, 3.0, load_audio=lambda path: torch.zeros(16000 * 7),
                           synthesize=lambda text: torch.zeros(16000))
    assert [s.wav is None for s in slices] == [False, False, True, True, False, False]
    assert [s.expect for s in slices] == ["<|incomplete|>", "<|endofuser|>", None, None, "<|ignore|>", None]
    assert slices[0].label == "a.wav [1/2]" and slices[4].label == "say: hello there"


@pytest.mark.parametrize("body, message", [
    ("events: []\n", "non-empty list"),
    ("events:\n- audio: a.wav\n  silence: 3\n", "exactly one of"),
    ("events:\n- silence: -1\n", "positive number"),
    ("events:\n- audio: [unclosed\n", "not a valid YAML"),
    ("events:\n- audio: a.wav\n  expcet: [<|endofuser|>]\n", r"event 1: unknown key\(s\) \['expcet'\]"),
    ("events:\n- audio: a.wav\n  expect: [<|endofusr|>]\n", "event 1: expect must list state tokens"),
    ("slice_second: 3.0\nevents:\n- silence: 3\n", r"unknown top-level key\(s\) \['slice_second'\]"),
])
def test_bad_scripts_name_the_file_and_the_problem(tmp_path, body, message):
    script = tmp_path / "bad.yaml"
    script.write_text(body)
    with pytest.raises(ValueError, match=message) as error:
        load_script(script)
    assert "bad.yaml" in str(error.value)


def test_a_single_expected_token_may_be_written_without_a_list(tmp_path):
    script = tmp_path / "one.yaml"
    script.write_text("events:\n- audio: a.wav\n  expect: <|ignore|>\n  reply: Sorry?\n")
    assert load_script(script)[0].expect == ("<|ignore|>",)


def test_say_without_a_tts_engine_explains_what_to_install(monkeypatch):
    import src.corpus.engines as engines
    monkeypatch.setattr(engines, "find_engines", lambda names=None, log=print: {})
    with pytest.raises(RuntimeError, match="install_tts.sh"):
        script_module.default_synthesizer()


def test_wav_mode_puts_silent_slices_between_files():
    events = wav_events(["a.wav", "b.wav"], silent_slices=4, slice_seconds=3.0)
    slices = script_slices(events, 3.0, load_audio=lambda path: torch.zeros(16000 * 2))
    assert [s.wav is None for s in slices] == [False] + [True] * 4 + [False] + [True] * 4


def _run_cli(tmp_path, name, *extra):
    output = tmp_path / name
    code = duplex_inference.main([str(TINY_YAML), "--wav", str(QUESTION), str(QUESTION), "--silent-slices", "1",
                                  "--output", str(output), *extra])
    assert code == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_cli_plays_the_reference_driver_on_the_tiny_model_reproducibly(tmp_path, capsys):
    records = _run_cli(tmp_path, "a.jsonl", "--seed", "5")
    slices, final = records[:-1], records[-1]
    assert [r["slice_index"] for r in slices] == list(range(len(slices)))
    assert [r["input"] for r in slices[:4]] == ["speech", "silence", "speech", "silence"]
    assert slices[0]["speech_positions"] == 12 and slices[0]["state_token"] in (
        "<|endofuser|>", "<|incomplete|>", "<|ignore|>")
    assert slices[0]["changes"][0] == "listen_start"
    assert final["type"] == "conversation" and "User" in final["text"]
    console = capsys.readouterr().out
    assert "| ASSISTANT" in console and "question_capital.wav" in console
    assert _run_cli(tmp_path, "b.jsonl", "--seed", "5") == records


def test_cli_reports_a_missing_audio_file(tmp_path, capsys):
    code = duplex_inference.main([str(TINY_YAML), "--wav", str(tmp_path / "missing.wav")])
    assert code == 2 and "missing.wav" in capsys.readouterr().err


def test_cli_refuses_a_folder_as_output_before_playing(tmp_path, capsys):
    code = duplex_inference.main([str(TINY_YAML), "--wav", str(QUESTION), "--output", str(tmp_path)])
    assert code == 2 and "--output is a folder" in capsys.readouterr().err


def test_cli_help_exits_cleanly():
    with pytest.raises(SystemExit) as exit_info:
        duplex_inference.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_cli_refuses_negative_silent_slices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        duplex_inference.parse_args([str(TINY_YAML), "--wav", "a.wav", "--silent-slices", "-1"])
    assert exit_info.value.code == 2 and "--silent-slices must be >= 0" in capsys.readouterr().err


def test_real_tiny_engine_handles_empty_and_sub_frame_slices():
    from duplex.engine import load_engine

    engine = load_engine(TINY_YAML)
    session = engine.new_session(seed=1)
    quiet = [torch.zeros(0), torch.randn(800) * 0.1, torch.randn(2000) * 0.1]  # 0, 50 ms, 125 ms
    events = [e for wav in quiet for e in session.feed(wav)]
    assert [e.speech_positions for e in events] == [0, 0, 0] and not session.listening
    event = session.feed(torch.randn(16000) * 0.1)[0]  # 1 s: 5 positions, a real probe
    assert event.speech_positions == 5 and event.state_token is not None
    with pytest.raises(ValueError, match="mono"):
        session.feed(torch.zeros(2, 16000))
    session.close()


@pytest.mark.cuda
def test_cuda_engine_replays_the_encoder_from_a_graph_and_matches_eager():
    from duplex.cuda_encoder import GraphedSpeechEncoder
    from duplex.engine import load_engine

    engine = load_engine(TINY_YAML, device="cuda")
    assert isinstance(engine.encode, GraphedSpeechEncoder) and engine.encode.graphed
    wav = torch.randn(int(engine.config.slice_seconds * 16000)) * 0.1
    with torch.no_grad():
        want = engine.encode.encoder.encode_wav(wav.cuda())  # eager, fp32
    torch.testing.assert_close(engine.encode(wav).float(), want.float(), rtol=1e-4, atol=1e-4)
    events = [e for _ in range(3) for e in engine.new_session(seed=1).feed(wav)]
    assert all(e.speech_positions > 0 for e in events)
