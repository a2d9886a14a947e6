"""Conversation scripts: what the user does over time, turned into the slices a session is fed.

The format is the corpus maker's (docs/corpus.md, "Duplex conversation scripts"), so its evaluation
conversations play as they are::

    slice_seconds: 3.0                 # optional, informational (the session's own setting wins)
    events:
      - audio: question_capital.wav    # relative to the script; cut into slices
        text: What is the capital of France?   # optional transcript, shown as the label
        expect: [<|endofuser|>]        # optional: state token each slice should give (reported, not enforced)
        reply: Paris.                  # optional, informational: the answer a trained model should give
        answer: paris                  # optional: the key a right reply contains (python -m src.evaluate)
                                       # (reply_kind: incomplete = an appendix B.1 reply is right)
      - silence: 6.0                   # seconds of silence -> round(6.0 / slice_seconds) silent slices
      - say: What is seven plus five?  # synthesised on the fly, only if an offline TTS is installed
                                       # (flite or espeak-ng, plus sox); text: without audio: is the same

Speech "while the model is answering" is simply speech that comes before the reply has ended. Unknown keys,
state tokens other than the three of ``src.prompts.STATE_TOKENS`` and invalid YAML are errors naming the file and
the event: a misspelt ``expect`` must not silently score nothing.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch
import yaml

from duplex.engine import slice_audio

SCRIPT_KEYS = {"slice_seconds", "events"}
EVENT_KEYS = {"audio", "silence", "say", "text", "expect", "reply", "reply_kind", "answer"}


@dataclass(frozen=True)
class ScriptEvent:
    """One thing the user does."""

    kind: str  # "audio" | "silence" | "say"
    path: pathlib.Path | None = None  # audio
    seconds: float = 0.0  # silence
    text: str | None = None  # transcript (audio) or the sentence to synthesise (say)
    expect: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScriptSlice:
    """One slice to feed: audio (N,) or None (silence), with what to show and what was expected."""

    wav: torch.Tensor | None
    label: str | None
    expect: str | None = None


def load_script(path: str | pathlib.Path) -> list[ScriptEvent]:
    """Parse a conversation script; errors name the file and the entry."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: conversation script not found (see example/conversation.yaml).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not a valid YAML conversation script ({error}).") from error
    if isinstance(data, dict) and set(data) - SCRIPT_KEYS:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(set(data) - SCRIPT_KEYS)}; "
                         f"known: {sorted(SCRIPT_KEYS)}.")
    entries = data.get("events") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list under `events:` (entries audio:, silence:, say:).")
    return [_parse_event(entry, i, path) for i, entry in enumerate(entries)]


def _parse_event(entry, index: int, path: pathlib.Path) -> ScriptEvent:
    where = f"{path}: event {index + 1}"
    if isinstance(entry, dict) and set(entry) - EVENT_KEYS:
        raise ValueError(f"{where}: unknown key(s) {sorted(set(entry) - EVENT_KEYS)}; known: {sorted(EVENT_KEYS)}.")
    kinds = [k for k in ("audio", "silence", "say") if isinstance(entry, dict) and k in entry]
    if not kinds and isinstance(entry, dict) and "text" in entry:
        kinds, entry = ["say"], {**entry, "say": entry["text"]}  # text alone: speak it with the TTS
    if len(kinds) != 1:
        raise ValueError(f"{where}: each event needs exactly one of audio:, silence:, say: (or text: alone); "
                         f"got {entry!r}.")
    expect = _expected_tokens(entry.get("expect"), where)
    if kinds[0] == "audio":
        return ScriptEvent("audio", path=(path.parent / str(entry["audio"])).resolve(), text=entry.get("text"),
                           expect=expect)
    if kinds[0] == "silence":
        seconds = entry["silence"]
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"{where}: silence must be a positive number of seconds, got {seconds!r}.")
        return ScriptEvent("silence", seconds=float(seconds))
    return ScriptEvent("say", text=str(entry["say"]), expect=expect)


def _expected_tokens(value, where: str) -> tuple[str, ...]:
    """`expect:` as a tuple of state tokens (one token may be written without a list)."""
    from src.prompts import STATE_TOKENS

    tokens = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(tokens, (list, tuple)) or any(token not in STATE_TOKENS for token in tokens):
        raise ValueError(f"{where}: expect must list state tokens among {list(STATE_TOKENS)}, got {value!r}.")
    return tuple(tokens)


def wav_events(paths: list[str | pathlib.Path], silent_slices: int, slice_seconds: float) -> list[ScriptEvent]:
    """The reference driver (--wav A.wav B.wav): each file, then ``silent_slices`` silent slices."""
    events = []
    for path in paths:
        events.append(ScriptEvent("audio", path=pathlib.Path(path)))
        if silent_slices > 0:
            events.append(ScriptEvent("silence", seconds=silent_slices * slice_seconds))
    return events


def script_slices(events: list[ScriptEvent], slice_seconds: float, merge_short_tail: bool = True,
                  load_audio=None, synthesize=None) -> list[ScriptSlice]:
    """Expand script events into slices. ``load_audio(path) -> (N,)`` and ``synthesize(text) -> (N,)`` are
    injected (defaults: ``src.audio.load_audio`` and the first installed corpus TTS engine)."""
    slices = []
    for event in events:
        if event.kind == "silence":
            count = max(1, round(event.seconds / slice_seconds))
            slices += [ScriptSlice(None, None)] * count
            continue
        if event.kind == "audio":
            wav = (load_audio or _default_load_audio)(event.path)
            label = event.text or event.path.name
        else:
            wav = (synthesize or default_synthesizer())(event.text)
            label = f"say: {event.text}"
        pieces = slice_audio(wav, 16000, slice_seconds, merge_short_tail)
        expects = _expect_per_slice(event.expect, len(pieces))
        slices += [ScriptSlice(piece, f"{label} [{i + 1}/{len(pieces)}]" if len(pieces) > 1 else label, expected)
                   for i, (piece, expected) in enumerate(zip(pieces, expects))]
    return slices


def _expect_per_slice(expect: tuple[str, ...], count: int) -> list[str | None]:
    """One expectation per slice; a single one is for the last slice (the earlier ones are unknown)."""
    if len(expect) == count:
        return list(expect)
    if len(expect) == 1:
        return [None] * (count - 1) + [expect[0]]
    return [None] * count


def _default_load_audio(path):
    from src.audio import load_audio
    return load_audio(path)


def default_synthesizer():
    """A ``text -> (N,) 16 kHz`` function from the first installed offline TTS engine, or a clear error."""
    from src.corpus.engines import Speaker, find_engines, sox_unavailable_reason

    engines = find_engines(log=lambda message: None) if sox_unavailable_reason() is None else {}
    if not engines:
        raise RuntimeError("script entries with `say:` need an offline TTS engine (flite or espeak-ng, plus sox); "
                           "install them with `sudo bash scripts/install_tts.sh`, or use `audio:` files instead.")
    name, engine = next(iter(engines.items()))
    speaker = Speaker(speaker_id=0, engine=name, voice=engine.voices()[0], rate=1.0, pitch=0.0)
    return lambda text: torch.from_numpy(engine.synthesize(text, speaker))
