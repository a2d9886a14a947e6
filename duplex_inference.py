"""Play a scripted conversation through the duplex engine and write its timeline.

    python duplex_inference.py duplex/duplex_tiny.yaml --script example/conversation.yaml --output timeline.jsonl
    python duplex_inference.py duplex/duplex.yaml --wav A.wav B.wav --checkpoint SAVE_DIR --precision bf16
    python duplex_inference.py duplex/duplex_demo.yaml --script part1.yaml --save-session talk.snap
    python duplex_inference.py duplex/duplex_demo.yaml --script part2.yaml --resume-session talk.snap

The user's side comes from a conversation script (audio files cut into slices, silences, speech that starts
while the model is still answering; format in duplex/script.py) or, as the reference driver did, from
``--wav`` files each followed by ``silent_slices_between_wavs`` silent slices (4). Each slice is fed to one
``DuplexSession`` (``feed``: the N = 1 case of ``duplex.scheduler.Scheduler``, the code that runs many); the console shows a two-column timeline (user slice | assistant text) as it runs. After the
last slice any pending reply is completed (the reference's final round).

``--output`` gets one JSON object per slice ("type": "slice": index, start time, input kind, state token,
text emitted, role changes such as interrupt / ignored / reply_start / reply_end, and the script's expected
state token if any), then one "type": "conversation" object with the final conversation text.

``--save-session FILE`` stops after the last slice without the final round and saves the open conversation
(``duplex/snapshot.py``); ``--resume-session FILE`` continues a saved conversation (same model; its duplex
settings and sampling generators come from the file, so ``--seed`` does not apply): played in two halves
this way, in two processes, a script gives the same timeline as played whole.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import textwrap

from tqdm import tqdm

from duplex.engine import load_engine
from duplex.script import load_script, script_slices, wav_events
from duplex.snapshot import restore, snapshot
from modules.model import PRECISIONS
from src import prompts

STATE_NAMES = {prompts.RESPONSE: "respond", prompts.INCOMPLETE: "incomplete", prompts.IGNORE: "ignore"}
USER_WIDTH = 48
TEXT_WIDTH = 60


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml", help="inference YAML with a duplex: block (duplex/duplex.yaml, duplex_tiny.yaml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--script", help="conversation script (YAML), e.g. example/conversation.yaml")
    source.add_argument("--wav", nargs="+", help="audio files played in turn, each followed by silent slices")
    parser.add_argument("--output", help="timeline JSONL to write (one object per slice + the conversation)")
    parser.add_argument("--checkpoint", help="save folder (CKPT+* averaged) or one CKPT folder; default: YAML")
    parser.add_argument("--device", help="cpu or cuda[:N]; default: the YAML's device")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="default: the YAML's precision")
    parser.add_argument("--seed", type=int, help="sampling seed; default: the duplex block's seed")
    parser.add_argument("--silent-slices", type=int, help="--wav mode: silent slices after each file "
                                                            "(default: silent_slices_between_wavs)")
    parser.add_argument("--quiet", action="store_true", help="no console timeline (a progress bar instead)")
    parser.add_argument("--save-session", metavar="FILE", help="after the last slice, save the open conversation "
                                                               "to FILE instead of finishing it")
    parser.add_argument("--resume-session", metavar="FILE", help="continue the conversation saved in FILE "
                                                                 "(by --save-session, same model)")
    args = parser.parse_args(argv)
    if args.silent_slices is not None and args.silent_slices < 0:
        parser.error(f"--silent-slices must be >= 0, got {args.silent_slices}")
    if args.resume_session and args.seed is not None:
        parser.error("--seed does not apply to --resume-session: the saved conversation carries its generators")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    session = None
    try:
        if args.output and pathlib.Path(args.output).is_dir():
            raise ValueError(f"{args.output}: --output is a folder; give a file name such as timeline.jsonl")
        if args.save_session and pathlib.Path(args.save_session).is_dir():
            raise ValueError(f"{args.save_session}: --save-session is a folder; give a file name such as talk.snap")
        engine = load_engine(args.yaml, checkpoint=args.checkpoint, device=args.device, precision=args.precision)
        session = restore(engine, args.resume_session) if args.resume_session else \
            engine.new_session(**({} if args.seed is None else {"seed": args.seed}))
        config = session.config
        if args.script:
            events = load_script(args.script)
        else:
            silent = config.silent_slices_between_wavs if args.silent_slices is None else args.silent_slices
            events = wav_events(args.wav, silent, config.slice_seconds)
        slices = script_slices(events, config.slice_seconds, config.merge_short_tail)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # SnapshotError is a ValueError
        if session is not None:
            session.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    records = play(session, slices, show=not args.quiet, finish=not args.save_session)
    conversation = session.conversation_text()
    print("\n" + conversation)
    _print_expectation_score(records)
    if args.output:
        write_timeline(args.output, records, conversation)
        print(f"timeline written to {args.output}")
    if args.save_session:
        snapshot(session, args.save_session)
        print(f"conversation saved to {args.save_session} (continue it with --resume-session)")
    session.close()
    return 0


def play(session, slices, show: bool = True, finish: bool = True) -> list[dict]:
    """Feed every slice, then finish (unless the conversation continues elsewhere); returns the JSON records
    (printing the timeline as it goes)."""
    if show:
        print(f"{'#':>4} {'time':>7}  {'USER':<{USER_WIDTH}}| ASSISTANT")
    records = []
    for piece in slices if show else tqdm(slices, desc="slices", unit="slice"):
        for event in session.feed(piece.wav, label=piece.label):
            records.append({"type": "slice", **event.to_json(), "expect": piece.expect})
            if show:
                print(format_row(event.to_json(), piece.expect))
    for event in session.finish() if finish else []:
        records.append({"type": "slice", **event.to_json(), "expect": None})
        if show:
            print(format_row(event.to_json(), None))
    return records


def format_row(event: dict, expect: str | None) -> str:
    """One timeline line: slice index, time, what the user did (and the state token) | what the assistant did."""
    if event["input"] == "speech":
        state = event["state_token"]
        verdict = "" if state is None else STATE_NAMES.get(state, repr(state))
        if state is not None and expect is not None:
            verdict += "" if expect == state else f"!={STATE_NAMES.get(expect, expect)}"
        user = f"speech {f'[{verdict}] ' if verdict else ''}{event['label'] or ''} ({event['speech_positions']} pos)"
    else:
        user = "(silence)" if event["input"] == "silence" else "(end of input)"
    user = textwrap.shorten(user, USER_WIDTH - 1, placeholder="...")
    changes = " ".join(f"[{c}]" for c in event["changes"])
    said = event["text"].replace("\n", "\\n")
    assistant = textwrap.shorten(f"{changes} {said}".strip(), TEXT_WIDTH, placeholder="...") if said or changes else ""
    return f"{event['slice_index']:>4} {event['start_s']:>6.1f}s  {user:<{USER_WIDTH}}| {assistant}"


def write_timeline(path, records: list[dict], conversation: str) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        stream.write(json.dumps({"type": "conversation", "text": conversation}, ensure_ascii=False) + "\n")


def _print_expectation_score(records: list[dict]) -> None:
    scored = [r for r in records if r.get("expect") is not None and r["state_token"] is not None]
    if scored:
        right = sum(r["expect"] == r["state_token"] for r in scored)
        print(f"state tokens as the script expects: {right}/{len(scored)}")


if __name__ == "__main__":
    sys.exit(main())
