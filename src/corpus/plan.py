"""The corpus plan: every speaker, split, text and augmentation, drawn from one seed before any audio is made.

Planning first keeps the corpus deterministic whatever the number of synthesis threads, and lets a test check the
split and id rules without synthesising anything.
"""
import random
from dataclasses import dataclass, field

from src.prompts import IGNORE_REPLIES, INCOMPLETE_REPLIES

from .augment import Augmentation, draw_augmentation
from .engines import Speaker
from .normalize import transcript
from .quiz import Fact
from .texts import asr_sentence, background_statement, make_qa

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Kind:
    """One kind of utterance: its LibriSpeech chapter, manifest task/state and id suffix (reference conventions)."""
    name: str
    chapter: int
    task: str
    state: str
    suffix: str = ""


KINDS = {k.name: k for k in (
    Kind("asr", 0, "asr", "empty"),
    Kind("qa", 1, "qa", "respond"),  # stage 2 trains on these; stage 3 uses them as its `respond` class
    Kind("incomplete", 2, "state", "incomplete", "-cut"),
    Kind("ignore", 3, "state", "ignore", "-ignore"),
)}
DEFAULT_MIX = {"asr": 0.3, "qa": 0.45, "incomplete": 0.1, "ignore": 0.15}


@dataclass(frozen=True)
class Utterance:
    """One planned utterance. `text` is what the engine says (spoken form is derived at synthesis); for `-cut`
    utterances the audio is cut at `cut_fraction` of the speech and `transcript` keeps the words before the cut."""
    utt_id: str
    split: str
    speaker: Speaker
    kind: str
    text: str
    transcript: str
    response: str
    seed: int
    level_db: float
    augmentation: Augmentation = field(default_factory=Augmentation)
    cut_fraction: float | None = None

    @property
    def chapter(self) -> int:
        return KINDS[self.kind].chapter


@dataclass(frozen=True)
class PlanOptions:
    seed: int
    utterances: int
    speakers: int
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    augment: float = 0.0


def split_voices(voices: dict[str, list[str]], options: PlanOptions, rng: random.Random) -> dict[str, dict]:
    """Engine voices per split. An engine with at least 3 voices gives valid and test voices of their own, so
    held-out speakers are new voices, not just new rate/pitch settings; an engine with fewer voices is shared."""
    fractions = {"train": 1 - options.valid_fraction - options.test_fraction, "valid": options.valid_fraction,
                 "test": options.test_fraction}
    by_split = {split: {} for split in SPLITS}
    for engine in sorted(voices):
        names = rng.sample(sorted(voices[engine]), len(voices[engine]))
        if len(names) < 3:
            for split in SPLITS:
                by_split[split][engine] = names
            continue
        counts = apportion(len(names), fractions, minimum=1)
        start = 0
        for split in SPLITS:
            by_split[split][engine] = names[start:start + counts[split]]
            start += counts[split]
    return by_split


def make_speakers(voices: dict[str, list[str]], count: int, first_id: int, rng: random.Random) -> list[Speaker]:
    """`count` speakers, engines taken in turn (each engine gets a fair share), voices cycled within an engine,
    each speaker with its own rate (±15 %) and pitch (±3 semitones)."""
    engines = sorted(e for e in voices if voices[e])
    speakers = []
    for i in range(count):
        engine = engines[i % len(engines)]
        voice = voices[engine][(i // len(engines)) % len(voices[engine])]
        rate, pitch = round(rng.uniform(0.85, 1.15), 2), round(rng.uniform(-3, 3), 1)
        speakers.append(Speaker(first_id + i, engine, voice, rate, pitch))
    return speakers


def split_speakers(voices: dict[str, list[str]], options: PlanOptions, rng: random.Random) -> dict[str, list]:
    """Speaker-disjoint splits (each speaker in exactly one split, at least one per split), built from
    `split_voices`. Speaker ids run 1000, 1001, ... over train, valid, test."""
    if not any(voices.values()):
        raise ValueError("no TTS engine available: install flite or espeak-ng (see docs/corpus.md)")
    if options.speakers < 3:
        raise ValueError(f"need at least 3 speakers for speaker-disjoint train/valid/test splits, got {options.speakers}")
    if options.valid_fraction <= 0 or options.test_fraction <= 0 or options.valid_fraction + options.test_fraction >= 1:
        raise ValueError(f"valid and test fractions must be > 0 and leave some train data, got "
                         f"{options.valid_fraction}/{options.test_fraction}")
    voices_by_split = split_voices(voices, options, rng)
    counts = apportion(options.speakers, {"train": 1 - options.valid_fraction - options.test_fraction,
                                          "valid": options.valid_fraction, "test": options.test_fraction}, minimum=1)
    speakers, next_id = {}, 1000
    for split in SPLITS:
        speakers[split] = make_speakers(voices_by_split[split], counts[split], next_id, rng)
        next_id += counts[split]
    return speakers


def apportion(total: int, weights: dict[str, float], minimum: int = 0) -> dict[str, int]:
    """Integer counts proportional to `weights` that sum to `total` (largest remainder, ties by name). Every key
    with a positive weight first gets `minimum` when `total` allows it (tiny corpora still hold every kind)."""
    positive = [k for k, w in weights.items() if w > 0]
    floor = minimum if total >= minimum * len(positive) else 0
    counts = {k: floor if k in positive else 0 for k in weights}
    rest = total - sum(counts.values())
    norm = sum(weights.values())
    exact = {k: rest * w / norm for k, w in weights.items()}
    for k in weights:
        counts[k] += int(exact[k])
    by_remainder = sorted(positive, key=lambda k: (-(exact[k] - int(exact[k])), k))
    for k in by_remainder[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _texts(kind: str, facts: list[Fact], rng: random.Random) -> tuple[str, str, float | None]:
    """(spoken text, response, cut fraction) for one utterance of `kind`."""
    if kind == "asr":
        sentence = asr_sentence(facts, rng)
        return sentence, transcript(sentence), None
    if kind == "ignore":
        return background_statement(rng), rng.choice(IGNORE_REPLIES), None
    qa = make_qa(facts, rng)
    if kind == "incomplete":
        return qa.question, rng.choice(INCOMPLETE_REPLIES), round(rng.uniform(0.3, 0.7), 3)
    return qa.question, qa.answer, None


def words_before_cut(label: str, fraction: float) -> str:
    """The words of `label` that end before `fraction` of its length (an estimate of what a cut clip still says)."""
    kept, position = [], 0
    for word in label.split():
        position += len(word) + 1
        if position - 1 > fraction * len(label):
            break
        kept.append(word)
    return " ".join(kept) or label.split()[0]


def plan_corpus(options: PlanOptions, voices: dict[str, list[str]], facts: list[Fact]) -> list[Utterance]:
    """The whole corpus, in manifest order (split, speaker, chapter, id)."""
    rng = random.Random(options.seed)
    speakers = split_speakers(voices, options, rng)
    split_sizes = apportion(options.utterances, {"train": 1 - options.valid_fraction - options.test_fraction,
                                                 "valid": options.valid_fraction, "test": options.test_fraction},
                            minimum=1)
    utterances, number = [], 0
    for split in SPLITS:
        kinds = [k for k, n in sorted(apportion(split_sizes[split], options.mix, minimum=1).items())
                 for _ in range(n)]
        rng.shuffle(kinds)
        for i, kind in enumerate(kinds):
            speaker = speakers[split][i % len(speakers[split])]
            text, response, cut = _texts(kind, facts, rng)
            label = transcript(text)
            utt_id = f"{speaker.speaker_id}-{KINDS[kind].chapter}-{number:04d}{KINDS[kind].suffix}"
            utterances.append(Utterance(
                utt_id=("asr-" + utt_id) if kind == "asr" else utt_id, split=split, speaker=speaker, kind=kind,
                text=text, transcript=words_before_cut(label, cut) if cut else label, response=response,
                seed=rng.randrange(2**31), level_db=round(rng.uniform(-6, -1), 1),
                augmentation=draw_augmentation(rng, options.augment), cut_fraction=cut))
            number += 1
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(utterances, key=lambda u: (order[u.split], u.speaker.speaker_id, u.chapter, u.utt_id))
