"""load_audio: any rate and channel count -> float32 16 kHz mono; short/empty/corrupt/NaN files refused."""
import math

import numpy as np
import pytest
import soundfile
import torch

from src.audio import AudioError, MIN_SAMPLES, SAMPLE_RATE, load_audio


def tone(seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)  # (N,)


def dominant_frequency(wav):
    spectrum = torch.fft.rfft(wav).abs()
    return float(spectrum.argmax()) * SAMPLE_RATE / wav.shape[0]


def test_16k_mono_is_read_unchanged(tmp_path):
    path = tmp_path / "a.wav"
    samples = tone(1.0, 16000)
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.shape == (16000,)
    assert torch.equal(wav, torch.from_numpy(samples))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_rate_is_resampled_to_16k(tmp_path, rate):
    path = tmp_path / "a.flac"
    soundfile.write(path, tone(1.0, rate, freq=500.0), rate)
    wav = load_audio(path)
    assert abs(wav.shape[0] - SAMPLE_RATE) <= 1
    assert abs(dominant_frequency(wav) - 500.0) < 2.0


def test_channels_are_averaged(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = tone(0.5, 16000, 300.0), tone(0.5, 16000, 700.0)
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    wav = load_audio(path)
    assert torch.allclose(wav, torch.from_numpy((left + right) / 2), atol=1e-6)


def test_int16_wav_is_scaled_to_unit_range(tmp_path):
    path = tmp_path / "pcm.wav"
    soundfile.write(path, tone(0.5, 16000), 16000, subtype="PCM_16")
    wav = load_audio(path)
    assert 0.45 < wav.abs().max() <= 0.5 + 1e-3


def test_exactly_one_adapter_position_is_accepted(tmp_path):
    from modules.speech import speech_positions
    path = tmp_path / "short.wav"
    soundfile.write(path, tone(MIN_SAMPLES / SAMPLE_RATE, 16000), 16000)
    assert load_audio(path).shape == (MIN_SAMPLES,)
    assert speech_positions(MIN_SAMPLES) == 1  # the shortest accepted file gives the encoder one LM position


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)
