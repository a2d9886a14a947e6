"""Throughput of the multi-session scheduler against the sequential worker, on the CPU, in the same run.

    python -m bench.scheduler_cpu [--sessions 16] [--threads N] [--output bench/results/scheduler_cpu.json]

N conversations on the embedded demo model (duplex/duplex_demo.yaml, example/model) play scripted audio: each
one a rotation of example/*.wav (questions, background talk, an interruption, a cut-off question) cut into 3 s
slices, with silences between, starting at different slices. Two ways to run the same slices:

* sequential: what the server's one model thread did: every slice of every conversation is one ``feed``;
* scheduler: one ``Scheduler`` for all conversations; each slice time all arrived slices run in one ``tick``.

Both use fresh sessions with the same seeds, so their events must be identical (checked and reported). Prints
slices per second of each and the ratio (the target in issue #15: >= 3x with 16 sessions), writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import torch

from duplex.engine import load_engine, slice_audio
from duplex.scheduler import Scheduler
from src.audio import load_audio

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "duplex" / "duplex_demo.yaml"


def conversation(index: int, clips: dict[str, list[torch.Tensor]]) -> list:
    """Slices of conversation ``index``: a question, background talk during the answer, an interruption,
    silence, a cut-off question, silence; the files rotate with the index."""
    def pick(prefix, names):
        return names[index % len(names)] if names else None

    questions = sorted(n for n in clips if n.startswith("question"))
    ignores = sorted(n for n in clips if n.startswith("ignore"))
    plan = [pick("q", questions), pick("i", ignores), "interrupt_mountain.wav", None, None,
            "incomplete_capital.wav", None, None]
    slices = [None] * (index % 4)  # conversations start at different times
    for item in plan:
        slices += [None] if item is None else clips[item]
    return slices


def load_clips(slice_seconds: float) -> dict[str, list[torch.Tensor]]:
    return {path.name: slice_audio(load_audio(path), 16000, slice_seconds)
            for path in sorted((ROOT / "example").glob("*.wav"))}


def run_sequential(engine, scripts) -> tuple[float, list]:
    sessions = [engine.new_session(seed=i) for i in range(len(scripts))]
    events = [[] for _ in scripts]
    start = time.perf_counter()
    for tick in range(max(len(s) for s in scripts)):
        for i, (session, script) in enumerate(zip(sessions, scripts)):
            if tick < len(script):
                events[i] += [e.to_json() for e in session.feed(script[tick])]
    elapsed = time.perf_counter() - start
    for session in sessions:
        session.close()
    return elapsed, events


def run_scheduler(engine, scripts) -> tuple[float, list, dict]:
    scheduler = Scheduler(engine.runtime, engine.encode)
    sessions = [engine.new_session(seed=i) for i in range(len(scripts))]
    for session in sessions:
        scheduler.add(session)
    index = {id(s): i for i, s in enumerate(sessions)}
    events = [[] for _ in scripts]
    start = time.perf_counter()
    for tick in range(max(len(s) for s in scripts)):
        for session, script in zip(sessions, scripts):
            if tick < len(script):
                scheduler.submit(session, script[tick])
        for session, event in scheduler.tick():
            events[index[id(session)]].append(event.to_json())
    elapsed = time.perf_counter() - start
    stats = {**scheduler.stats, "rounds": scheduler.rounds}
    for session in sessions:
        scheduler.remove(session)
    return elapsed, events, stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (the best time is kept)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "scheduler_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_engine(DEMO_YAML)
    clips = load_clips(engine.config.slice_seconds)
    scripts = [conversation(i, clips) for i in range(args.sessions)]
    slices = sum(len(s) for s in scripts)
    run_scheduler(engine, scripts[:2])  # warm-up (allocator, first calls)
    sequential, scheduled, stats = [], [], {}
    for _ in range(args.repeats):
        seconds, seq_events = run_sequential(engine, scripts)
        sequential.append(seconds)
        seconds, sched_events, stats = run_scheduler(engine, scripts)
        scheduled.append(seconds)
    results = {
        "sessions": args.sessions, "slices": slices, "threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other processes on the machine
        "cpu": platform.processor() or platform.machine(), "model": str(DEMO_YAML.relative_to(ROOT)),
        "sequential_s": round(min(sequential), 3), "scheduler_s": round(min(scheduled), 3),
        "sequential_slices_per_s": round(slices / min(sequential), 2),
        "scheduler_slices_per_s": round(slices / min(scheduled), 2),
        "throughput_ratio": round(min(sequential) / min(scheduled), 2),
        "identical_events": seq_events == sched_events,
        "scheduler_rounds": stats.get("rounds"), "scheduler_tick_p50_ms": round(stats["p50_ms"], 1),
        "scheduler_tick_p99_ms": round(stats["p99_ms"], 1),
    }
    text = json.dumps(results, indent=2)
    print(text)
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.output).write_text(text + "\n")
    return 0 if results["identical_events"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
