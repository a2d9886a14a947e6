"""A conversation moved between processes: duplex_inference.py --save-session in one process, --resume-session in
another, gives the timeline of the script played whole (the embedded demo model, sampled replies)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

import duplex_inference

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "duplex" / "duplex_demo.yaml"
CONVERSATION = ROOT / "example" / "conversation.yaml"


def write_script(path, events):
    path.write_text(yaml.safe_dump({"events": events}))
    return path


def split_conversation(tmp_path, at):
    """example/conversation.yaml as a whole script and as two halves (audio paths made absolute)."""
    events = yaml.safe_load(CONVERSATION.read_text())["events"]
    for event in events:
        if "audio" in event:
            event["audio"] = str(CONVERSATION.parent / event["audio"])
    return (write_script(tmp_path / "whole.yaml", events), write_script(tmp_path / "first.yaml", events[:at]),
            write_script(tmp_path / "second.yaml", events[at:]))


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_script_played_in_two_processes_gives_the_timeline_played_whole(tmp_path):
    whole, first, second = split_conversation(tmp_path, at=3)  # cut while the interrupting question's reply runs
    out, snap = tmp_path / "out", tmp_path / "talk.snap"
    assert duplex_inference.main([str(DEMO_YAML), "--script", str(whole), "--output", str(out / "whole.jsonl"),
                                  "--quiet"]) == 0
    assert duplex_inference.main([str(DEMO_YAML), "--script", str(first), "--output", str(out / "first.jsonl"),
                                  "--save-session", str(snap), "--quiet"]) == 0
    second_process = subprocess.run(
        [sys.executable, str(ROOT / "duplex_inference.py"), str(DEMO_YAML), "--script", str(second),
         "--output", str(out / "second.jsonl"), "--resume-session", str(snap), "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert second_process.returncode == 0, second_process.stderr

    want, part1, part2 = records(out / "whole.jsonl"), records(out / "first.jsonl"), records(out / "second.jsonl")
    assert part1[:-1] + part2 == want
    assert part1[-1]["type"] == "conversation" and part1[-1]["text"] != want[-1]["text"]  # saved mid-conversation
    at_cut = want[len(part1) - 1]
    assert at_cut["input"] == "silence" and at_cut["text"]  # the reply kept going across the processes
    assert any(r["type"] == "slice" and "interrupt" in r["changes"] for r in part1)
    assert any(r["type"] == "slice" and "reply_end" in r["changes"] for r in part2)


def test_resume_refuses_a_bad_snapshot_and_a_seed(tmp_path, capsys):
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot at all")
    code = duplex_inference.main([str(DEMO_YAML), "--wav", str(ROOT / "example" / "question_capital.wav"),
                                  "--resume-session", str(bad)])
    assert code == 2 and "not a duplex session snapshot" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        duplex_inference.parse_args([str(DEMO_YAML), "--wav", "a.wav", "--resume-session", str(bad), "--seed", "3"])
    assert exit_info.value.code == 2 and "--seed does not apply" in capsys.readouterr().err


def test_save_session_refuses_a_folder_before_playing(tmp_path, capsys):
    code = duplex_inference.main([str(DEMO_YAML), "--wav", str(ROOT / "example" / "question_capital.wav"),
                                  "--save-session", str(tmp_path)])
    assert code == 2 and "--save-session is a folder" in capsys.readouterr().err
