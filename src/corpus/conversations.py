"""Duplex evaluation scripts: test-speaker utterances joined into conversations with the known right behaviour.

Each script is a YAML list of events, `audio:` (a file, relative to the script) or `silence:` (seconds), and each
audio event says what the session should predict for each of its slices (`expect:` state tokens) and, for a
question, the correct `reply` and its `answer` key (scored by python -m src.evaluate). Audio events are padded with silence to whole slices, so the expectations hold
whether a player slices each file or the joined stream.

One conversation: question A → pause → background talk (ignore) → question B in two halves (the first half must
give `<|incomplete|>`, the second `<|endofuser|>`) → pause → a cut-off question (incomplete; the silence after it
forces a reply, which should be an appendix B.1 reply).
"""
import math
import pathlib
import random

import numpy as np
import soundfile as sf
import yaml

from src.prompts import IGNORE, INCOMPLETE, RESPONSE

from .engines import SAMPLE_RATE
from .render import AUDIO_FORMATS, audio_path, speech_bounds

SLICE_SECONDS = 3.0
PAUSE_SLICES = 2


def pad_to_slices(audio: np.ndarray, slice_seconds: float) -> np.ndarray:
    """Append silence up to a whole number of slices (at least one)."""
    slice_len = int(slice_seconds * SAMPLE_RATE)
    slices = max(1, math.ceil(len(audio) / slice_len))
    return np.pad(audio, (0, slices * slice_len - len(audio)))


def expected_states(num_slices: int, final_state: str) -> list[str]:
    """All slices but the last are still incomplete; the last one carries the clip's own state."""
    return [INCOMPLETE] * (num_slices - 1) + [final_state]


def split_at_pause(audio: np.ndarray) -> int:
    """Sample index of the quietest 20 ms frame in the middle 35-65 % of the speech: a word gap, roughly mid-question."""
    start, end = speech_bounds(audio)
    frame = SAMPLE_RATE // 50
    lo, hi = start + int(0.35 * (end - start)), start + int(0.65 * (end - start))
    candidates = range(lo, max(lo + 1, hi - frame), frame // 2)
    return min(candidates, key=lambda i: float(np.mean(audio[i:i + frame] ** 2)))


class _ScriptWriter:
    """Collects the events and audio files of one conversation."""

    def __init__(self, folder: pathlib.Path, name: str, extension: str, slice_seconds: float):
        self.folder, self.name, self.extension, self.slice_seconds = folder, name, extension, slice_seconds
        self.events: list[dict] = []

    def speech(self, audio: np.ndarray, text: str, final_state: str, **extra) -> None:
        audio = pad_to_slices(audio, self.slice_seconds)
        relative = pathlib.Path("audio", f"{self.name}-{len(self.events):02d}.{self.extension}")
        (self.folder / relative).parent.mkdir(parents=True, exist_ok=True)
        sf.write(self.folder / relative, audio, SAMPLE_RATE, subtype="PCM_16", format=AUDIO_FORMATS[self.extension])
        num_slices = round(len(audio) / (self.slice_seconds * SAMPLE_RATE))
        self.events.append({"audio": relative.as_posix(), "text": text,
                            "expect": expected_states(num_slices, final_state), **extra})

    def silence(self, slices: int) -> None:
        self.events.append({"silence": slices * self.slice_seconds})

    def write(self) -> pathlib.Path:
        path = self.folder / f"{self.name}.yaml"
        header = ("# Duplex evaluation script made by `python -m src.corpus` (see docs/corpus.md).\n"
                  "# expect: the state token each slice of that audio should produce.\n")
        body = yaml.safe_dump({"slice_seconds": self.slice_seconds, "events": self.events}, sort_keys=False,
                              allow_unicode=True, width=120)
        path.write_text(header + body, encoding="utf-8")
        return path


def _read(root: pathlib.Path, utterance, extension: str) -> np.ndarray:
    audio, rate = sf.read(root / audio_path(utterance, extension), dtype="float32")
    assert rate == SAMPLE_RATE, f"{utterance.utt_id}: expected {SAMPLE_RATE} Hz, found {rate}"
    return audio


def write_conversations(utterances, root: pathlib.Path, extension: str, count: int, rng: random.Random,
                        slice_seconds: float = SLICE_SECONDS, split: str = "test",
                        folder_name: str = "conversations") -> list[pathlib.Path]:
    """Up to `count` scripts under `root/<folder_name>/`, from one held-out split's audio only (speakers never
    trained on). Returns the script paths; none when that split has no question."""
    test = [u for u in utterances if u.split == split]
    questions = [u for u in test if u.kind == "qa"]
    ignores = [u for u in test if u.kind == "ignore"]
    cuts = [u for u in test if u.kind == "incomplete"]
    if count <= 0 or not questions:
        return []
    folder = root / folder_name
    scripts = []
    for number in range(count):
        first, second = rng.sample(questions, 2) if len(questions) > 1 else questions * 2
        writer = _ScriptWriter(folder, f"conversation-{number:03d}", extension, slice_seconds)
        writer.speech(_read(root, first, extension), first.transcript, RESPONSE, reply=first.response,
                      answer=first.answer)
        writer.silence(PAUSE_SLICES)
        if ignores:
            background = rng.choice(ignores)
            writer.speech(_read(root, background, extension), background.transcript, IGNORE)
        audio = _read(root, second, extension)
        cut = split_at_pause(audio)
        writer.speech(audio[:cut], f"{second.transcript} (first part)", INCOMPLETE)
        writer.speech(audio[cut:], f"{second.transcript} (second part)", RESPONSE, reply=second.response,
                      answer=second.answer)
        writer.silence(PAUSE_SLICES)
        if cuts:
            cut_question = rng.choice(cuts)
            writer.speech(_read(root, cut_question, extension), cut_question.transcript, INCOMPLETE,
                          reply_kind="incomplete")
            writer.silence(PAUSE_SLICES)
        scripts.append(writer.write())
    return scripts
