"""Read an audio file as the model expects it: float32, 16 kHz, mono, with readable errors.

The reference read files at their own rate and assumed 16 kHz (spec §8.7); here any rate is resampled and any
channel count averaged, so that every entry point (CustomGenerator, the duplex engine, training) sees the same
signal. Audio shorter than the span of one adapter position (5 encoder frames x 40 ms = 200 ms) is refused with
that explanation: with centred fbank frames the encoder already yields one LM position from 160 ms on, but nothing
shorter than one position's span is worth a turn, and below 160 ms there would be no position at all.
"""
from __future__ import annotations

import pathlib

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16000
MIN_SECONDS = 0.2  # the span of one LM position = 5 encoder frames x 40 ms (tests: it gives exactly 1 position)
MIN_SAMPLES = int(SAMPLE_RATE * MIN_SECONDS)


class AudioError(ValueError):
    """An audio file that cannot be used, with the file named and what to do."""


def load_audio(path: str | pathlib.Path, min_samples: int = MIN_SAMPLES) -> torch.Tensor:
    """Return the file's samples as a float32 tensor (N,) at 16 kHz mono.

    Raises AudioError (a ValueError) for a missing, empty, unreadable or non-finite file and for audio shorter
    than `min_samples` after resampling (default 200 ms, one adapter position); FileNotFoundError is not used so
    callers can catch one type.
    """
    path = pathlib.Path(path)
    samples, rate = _read(path)  # (N, C) float32
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples; record or choose a non-empty file")
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples; re-export the file")
    wav = to_mono_16k(torch.from_numpy(samples), rate)  # (N',)
    if wav.shape[0] < min_samples:
        raise AudioError(f"{path}: audio is {wav.shape[0] / SAMPLE_RATE * 1000:.0f} ms long, shorter than "
                         f"{min_samples / SAMPLE_RATE * 1000:.0f} ms (one adapter position = 5 encoder frames); "
                         f"give at least {min_samples / SAMPLE_RATE:.1f} s of speech")
    return wav


def to_mono_16k(samples: torch.Tensor, rate: int) -> torch.Tensor:
    """(N, C) or (N,) float samples at `rate` -> (N',) float32 at 16 kHz, channels averaged."""
    wav = samples.float()
    if wav.dim() == 2:
        wav = wav.mean(dim=1)  # (N,)
    if rate != SAMPLE_RATE:
        wav = AF.resample(wav, orig_freq=rate, new_freq=SAMPLE_RATE)  # (N',)
    return wav.contiguous()


def _read(path: pathlib.Path) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioError(f"{path}: audio file not found; check the path")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, expected an audio file (wav, flac, ogg)")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes); record or choose a non-empty file")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{path}: cannot be decoded as audio ({error}); convert it to WAV or FLAC") from error
    return samples, rate
