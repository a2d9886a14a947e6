"""Turn one planned utterance into a 16 kHz mono file: synthesise, cut (incomplete), augment, set the level.

A file is written under a temporary name and renamed when complete, so an interrupted build leaves no partial
audio and a resumed one (`--resume`) skips exactly the files that exist.
"""
import os
import pathlib

import numpy as np
import soundfile as sf

from .augment import apply_augmentation
from .engines import SAMPLE_RATE
from .normalize import spoken_form
from .plan import Utterance

AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}


def speech_bounds(audio: np.ndarray, threshold: float = 0.02) -> tuple[int, int]:
    """First and one-past-last sample louder than `threshold` × peak (the speech between the engine's silences)."""
    loud = np.flatnonzero(np.abs(audio) > threshold * (np.abs(audio).max() + 1e-12))
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, len(audio))


def cut_speech(audio: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the audio up to `fraction` of the way through the speech (paper §3.2: randomly truncated questions),
    with a 10 ms fade-out so the cut does not click."""
    start, end = speech_bounds(audio)
    kept = audio[:start + int(fraction * (end - start))].copy()
    fade = min(len(kept), SAMPLE_RATE // 100)
    kept[len(kept) - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return kept


def set_peak(audio: np.ndarray, level_db: float) -> np.ndarray:
    """Scale so the peak sits at `level_db` dBFS (engines differ a lot in loudness)."""
    peak = float(np.abs(audio).max())
    return audio if peak == 0 else (audio * (10 ** (level_db / 20) / peak)).astype(np.float32)


def audio_path(utterance: Utterance, extension: str) -> pathlib.Path:
    """`<split>/<speaker>/<chapter>/<utt_id>.<ext>`, relative to the corpus root (the LibriSpeech layout)."""
    return pathlib.Path(utterance.split, str(utterance.speaker.speaker_id), str(utterance.chapter),
                        f"{utterance.utt_id}.{extension}")


def render(utterance: Utterance, engines: dict, root: pathlib.Path, extension: str,
           rir_dir: pathlib.Path | None = None) -> float:
    """Synthesise and write one utterance under `root` unless it is there already; returns its duration in
    seconds (from the written audio)."""
    path = root / audio_path(utterance, extension)
    if path.is_file():
        info = sf.info(path)
        return info.frames / info.samplerate
    audio = engines[utterance.speaker.engine].synthesize(spoken_form(utterance.text), utterance.speaker)  # (N,)
    if len(audio) == 0:
        raise RuntimeError(f"{utterance.speaker.engine} produced no audio for {utterance.utt_id}: {utterance.text!r}")
    if utterance.cut_fraction is not None:
        audio = cut_speech(audio, utterance.cut_fraction)
    speak = lambda text, speaker: engines[speaker.engine].synthesize(spoken_form(text), speaker)  # noqa: E731
    audio = apply_augmentation(audio, utterance.augmentation, utterance.seed, rir_dir, speak)
    audio = set_peak(audio, utterance.level_db)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    sf.write(partial, np.clip(audio, -1, 1), SAMPLE_RATE, subtype="PCM_16", format=AUDIO_FORMATS[extension])
    os.replace(partial, path)
    return len(audio) / SAMPLE_RATE
