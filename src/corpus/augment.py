"""Acoustic augmentation: room reverberation (sox), coloured noise at a chosen SNR (numpy), telephone codecs (sox).

What to apply is decided when the corpus is planned (`draw_augmentation`), so the plan, not the render order,
fixes the result; the noise itself comes from a generator seeded per utterance.
"""
import random
from dataclasses import dataclass

import numpy as np

from .engines import RAW_FLOAT, SAMPLE_RATE, run_command, sox_effects, sox_to_16k

NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # colour -> exponent of the 1/f^a power spectrum
# Telephone codecs at 8 kHz: sox output-format options of the encoding pass (the decode pass reads them back).
CODECS = {
    "mulaw8k": ("-t", "wav", "-e", "mu-law"),
    "alaw8k": ("-t", "wav", "-e", "a-law"),
    "gsm": ("-t", "gsm"),
}


@dataclass(frozen=True)
class Augmentation:
    """What to do to one utterance; None fields are skipped. Order: reverb, then noise, then codec."""
    reverb: tuple[int, int] | None = None      # (reverberance %, room scale %)
    noise: tuple[str, float] | None = None     # (colour, SNR in dB)
    codec: str | None = None                   # a key of CODECS

    def describe(self) -> str:
        parts = []
        if self.reverb:
            parts.append(f"reverb{self.reverb[0]}/{self.reverb[1]}")
        if self.noise:
            parts.append(f"{self.noise[0]}noise{self.noise[1]:.0f}dB")
        if self.codec:
            parts.append(self.codec)
        return "+".join(parts) or "clean"


def draw_augmentation(rng: random.Random, probability: float) -> Augmentation:
    """Each of reverb, noise and codec independently with `probability` (0 disables augmentation)."""
    if probability <= 0:
        return Augmentation()
    reverb = (rng.randint(20, 70), rng.randint(20, 90)) if rng.random() < probability else None
    noise = (rng.choice(sorted(NOISE_COLOURS)), round(rng.uniform(5, 25), 1)) if rng.random() < probability else None
    codec = rng.choice(sorted(CODECS)) if rng.random() < probability else None
    return Augmentation(reverb, noise, codec)


def coloured_noise(num_samples: int, colour: str, generator: np.random.Generator) -> np.ndarray:
    """Unit-power noise whose power spectrum falls as 1/f^a (white a=0, pink a=1, brown a=2)."""
    spectrum = np.fft.rfft(generator.standard_normal(num_samples))  # (N//2+1,)
    freqs = np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE)
    freqs[0] = freqs[1] if num_samples > 1 else 1.0
    noise = np.fft.irfft(spectrum / freqs ** (NOISE_COLOURS[colour] / 2), n=num_samples)  # (N,)
    return (noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)).astype(np.float32)


def add_noise(speech: np.ndarray, colour: str, snr_db: float, generator: np.random.Generator) -> np.ndarray:
    """Mix noise so that speech power / noise power = `snr_db` (speech power over the whole clip)."""
    speech_power = float(np.mean(speech.astype(np.float64) ** 2)) + 1e-12
    noise = coloured_noise(len(speech), colour, generator) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return (speech + noise).astype(np.float32)


def codec_round_trip(audio: np.ndarray, codec: str) -> np.ndarray:
    """Encode 16 kHz float audio with a telephone codec at 8 kHz and decode it back to 16 kHz float."""
    encoded = run_command(["sox", "-R", *RAW_FLOAT, "-", "-r", "8000", *CODECS[codec], "-"],
                          np.asarray(audio, np.float32).tobytes())
    return sox_to_16k(None, stdin=encoded, source_type=CODECS[codec][:2])


def apply_augmentation(audio: np.ndarray, augmentation: Augmentation, seed: int) -> np.ndarray:
    """16 kHz mono float32 in and out; the length is kept (reverb tails are cut) so manifests stay aligned."""
    length = len(audio)
    if augmentation.reverb:
        reverberance, room_scale = augmentation.reverb
        audio = sox_effects(audio, ["reverb", str(reverberance), "50", str(room_scale)])[:length]
    if augmentation.noise:
        colour, snr_db = augmentation.noise
        audio = add_noise(audio, colour, snr_db, np.random.default_rng(seed))
    if augmentation.codec:
        audio = codec_round_trip(audio, augmentation.codec)
        audio = np.pad(audio, (0, max(0, length - len(audio))))[:length]
    return audio
