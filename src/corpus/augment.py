"""Acoustic augmentation: a room (sox reverb, a synthetic impulse response, or a recorded one from `--rir-dir`),
coloured noise or babble (other voices of the same split saying background talk) at a chosen SNR, telephone
codecs (sox), speed (resampling) and pitch (sox).

What to apply is decided when the corpus is planned (`draw_augmentation`), so the plan, not the render order,
fixes the result; the noise and the synthetic rooms come from generators seeded per utterance.
"""
import pathlib
import random
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve, resample_poly

from .engines import RAW_FLOAT, SAMPLE_RATE, run_command, sox_effects, sox_to_16k

NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # colour -> exponent of the 1/f^a power spectrum
BABBLE = "babble"  # a noise kind beside the colours: voices filled in by the plan (plan.with_babble)
# Telephone codecs at 8 kHz: sox output-format options of the encoding pass (the decode pass reads them back).
CODECS = {
    "mulaw8k": ("-t", "wav", "-e", "mu-law"),
    "alaw8k": ("-t", "wav", "-e", "a-law"),
    "gsm": ("-t", "gsm"),
}


@dataclass(frozen=True)
class Augmentation:
    """What to do to one utterance; None fields are skipped. Order: speed, pitch, room, noise, codec."""
    reverb: tuple[int, int] | None = None      # (reverberance %, room scale %), sox
    noise: tuple[str, float] | None = None     # (colour or "babble", SNR in dB)
    codec: str | None = None                   # a key of CODECS
    rir: tuple[str, object] | None = None      # ("synthetic", RT60 s) or ("file", name in --rir-dir)
    speed: float | None = None                 # resampling factor (>1 faster and higher)
    pitch: int | None = None                   # cents, sox pitch (tempo kept)
    babble: tuple = ()                         # babble noise: ((Speaker, text), ...) other voices talking

    def describe(self) -> str:
        parts = []
        if self.speed:
            parts.append(f"speed{self.speed:.2f}")
        if self.pitch:
            parts.append(f"pitch{self.pitch:+d}")
        if self.reverb:
            parts.append(f"reverb{self.reverb[0]}/{self.reverb[1]}")
        if self.rir:
            parts.append(f"rir-{self.rir[1]}")
        if self.noise:
            parts.append(f"{self.noise[0]}noise{self.noise[1]:.0f}dB")
        if self.codec:
            parts.append(self.codec)
        return "+".join(parts) or "clean"


def draw_augmentation(rng: random.Random, probability: float, rirs: tuple[str, ...] = (),
                      codecs: tuple[str, ...] = tuple(sorted(CODECS))) -> Augmentation:
    """Each of room, noise, codec, speed and pitch independently with `probability` (0 disables augmentation).
    A room is a recorded impulse response (half the rooms when `rirs` names some), else a synthetic one or
    sox's reverb, half each. `codecs`: the codecs this machine's sox can run (`working_codecs`); a draw of
    another is replaced by one of them, so a plan differs only in the codec rows when one is missing."""
    if probability <= 0:
        return Augmentation()
    reverb = rir = None
    if rng.random() < probability:
        if rirs and rng.random() < 0.5:
            rir = ("file", rng.choice(sorted(rirs)))
        elif rng.random() < 0.5:
            rir = ("synthetic", round(rng.uniform(0.2, 0.8), 2))
        else:
            reverb = (rng.randint(20, 70), rng.randint(20, 90))
    noise = (rng.choice(sorted(NOISE_COLOURS) + [BABBLE]), round(rng.uniform(5, 25), 1)) \
        if rng.random() < probability else None
    codec = rng.choice(sorted(CODECS)) if rng.random() < probability else None
    codec = codec if codec is None or codec in codecs else stand_in_codec(codec, codecs)
    speed = round(rng.uniform(0.9, 1.1), 2) if rng.random() < probability else None
    pitch = rng.randint(-300, 300) if rng.random() < probability else None
    return Augmentation(reverb, noise, codec, rir, speed, pitch)


def stand_in_codec(drawn: str, codecs: tuple[str, ...]) -> str | None:
    """A codec this machine runs in place of `drawn`, chosen without the random stream (so every other draw of
    the plan stays as it is); None when sox runs none."""
    usable = sorted(codecs)
    return usable[sorted(CODECS).index(drawn) % len(usable)] if usable else None


def working_codecs(log=print) -> tuple[str, ...]:
    """The codecs of CODECS that this machine's sox encodes and decodes, each tried on 0.1 s of a tone.

    Why: sox loads most formats as plugins from the folder it was built with, so a sox unpacked from a .deb
    outside / (a GPU machine's carried engines) has the built-in mu-law and a-law but no GSM. Before this check,
    every GSM row failed one by one and left the corpus a tenth smaller without a word of why.
    """
    tone = (0.1 * np.sin(np.arange(1600) * 2 * np.pi * 440 / 16000)).astype(np.float32)  # (1600,)
    working = []
    for name in sorted(CODECS):
        try:
            codec_round_trip(tone, name)
            working.append(name)
        except (RuntimeError, OSError, ValueError) as error:
            log(f"augmentation codec {name} left out of the plan: sox cannot run it here ({str(error)[-160:]})")
    return tuple(working)


def synthetic_rir(rt60: float, generator: np.random.Generator) -> np.ndarray:
    """A room impulse response: the direct sound, then exponentially decaying noise reaching -60 dB at `rt60`
    seconds, after a 2-10 ms gap (the first reflections)."""
    length = int(rt60 * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = generator.standard_normal(length) * np.exp(-6.9 * t / rt60)  # (L,)
    tail[: int(generator.uniform(0.002, 0.01) * SAMPLE_RATE)] = 0.0
    response = 0.5 * tail / (np.abs(tail).max() + 1e-12)
    response[0] = 1.0
    return response.astype(np.float32)


def recorded_rir(rir_dir: pathlib.Path, name: str) -> np.ndarray:
    """An impulse response file at 16 kHz mono, starting at its strongest peak (so speech is not delayed)."""
    audio, rate = sf.read(pathlib.Path(rir_dir) / name, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = resample_poly(audio, SAMPLE_RATE, rate).astype(np.float32)
    audio = audio[int(np.abs(audio).argmax()):]
    return audio / (np.abs(audio).max() + 1e-12)


def convolve_room(audio: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Speech in the room, cut to its own length."""
    return fftconvolve(audio, response)[:len(audio)].astype(np.float32)


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play `factor` times faster (tempo and pitch together, as sox `speed`), by resampling."""
    up, down = 100, int(round(100 * factor))
    return resample_poly(audio, up, down).astype(np.float32)


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


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that speech power / noise power = `snr_db` (noise looped or cut to length)."""
    noise = np.resize(noise, len(speech)).astype(np.float64)  # repeats a short noise
    speech_power = float(np.mean(speech.astype(np.float64) ** 2)) + 1e-12
    noise_power = float(np.mean(noise ** 2)) + 1e-12
    return (speech + noise * np.sqrt(speech_power / noise_power / 10 ** (snr_db / 10))).astype(np.float32)


def apply_augmentation(audio: np.ndarray, augmentation: Augmentation, seed: int,
                       rir_dir: pathlib.Path | None = None, speak=None) -> np.ndarray:
    """16 kHz mono float32 in and out; only speed changes the length (reverb tails and codec padding are cut).
    `speak(text, speaker) -> audio` renders babble voices (the engines; needed only for babble noise)."""
    if augmentation.speed:
        audio = change_speed(audio, augmentation.speed)
    if augmentation.pitch:
        audio = sox_effects(audio, ["pitch", str(augmentation.pitch)])[:len(audio)]
    length = len(audio)
    if augmentation.rir:
        kind, value = augmentation.rir
        if kind == "file" and rir_dir is None:
            raise ValueError(f"the plan uses the impulse response {value!r}; pass the same --rir-dir")
        response = recorded_rir(rir_dir, value) if kind == "file" else \
            synthetic_rir(float(value), np.random.default_rng(seed + 1))
        audio = convolve_room(audio, response)
    if augmentation.reverb:
        reverberance, room_scale = augmentation.reverb
        audio = sox_effects(audio, ["reverb", str(reverberance), "50", str(room_scale)])[:length]
    if augmentation.noise:
        colour, snr_db = augmentation.noise
        if colour == BABBLE:
            if speak is None or not augmentation.babble:
                raise ValueError("babble noise needs its voices (plan) and the engines to say them (render)")
            voices = [speak(text, speaker) for speaker, text in augmentation.babble]
            longest = max(len(v) for v in voices)
            babble = sum(np.pad(v, (0, longest - len(v))) for v in voices)  # (longest,) all talking at once
            audio = mix_at_snr(audio, babble, snr_db)
        else:
            audio = add_noise(audio, colour, snr_db, np.random.default_rng(seed))
    if augmentation.codec:
        audio = codec_round_trip(audio, augmentation.codec)
        audio = np.pad(audio, (0, max(0, length - len(audio))))[:length]
    return audio
