"""The corpus plan: every speaker, split, text and augmentation, drawn from one seed before any audio is made.

Planning first keeps the corpus deterministic whatever the number of synthesis processes, and lets a test check
the split and id rules without synthesising anything.

Splits: train / valid / test are speaker- and voice-disjoint (each engine voice is in one split only); one voice
family (a whole engine, or one espeak accent) can be held out of all three into `test-engine`, so that a model
is also measured on a kind of voice it never heard (`PlanOptions.heldout`).
"""
import random
import re
from dataclasses import dataclass, field, replace

from src.prompts import IGNORE_REPLIES, INCOMPLETE_REPLIES

from .augment import BABBLE, CODECS, Augmentation, draw_augmentation
from .engines import Speaker
from .normalize import transcript
from .quiz import Fact
from .texts import asr_sentence, background_statement, make_qa

SPLITS = ("train", "valid", "test")
ENGINE_SPLIT = "test-engine"  # the held-out voice family (engine-disjoint test)
ALL_SPLITS = SPLITS + (ENGINE_SPLIT,)


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
    Kind("read", 4, "asr", "empty"),  # broad-vocabulary read speech from the text pools (src/corpus/pools.py)
)}
ASR_KINDS = ("asr", "read")  # ids start with "asr-"
DEFAULT_MIX = {"asr": 0.15, "read": 0.2, "qa": 0.4, "incomplete": 0.1, "ignore": 0.15}


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
    answer: str = ""  # QA: the key a right reply contains
    context: tuple = ()  # multi-turn stages 3-4: earlier turns ((utt_id, reply as said), ...), oldest first

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
    heldout: str = "auto"  # voice family only in test-engine: "auto", "none", "<engine>" or "<engine>:<voice prefix>"
    multiturn: float = 0.0  # share of qa / state rows that follow earlier turns of the same speaker
    rirs: tuple = ()  # impulse response file names in --rir-dir (augmentation)
    codecs: tuple = tuple(sorted(CODECS))  # the telephone codecs augmentation may draw (those sox runs here)
    first_speaker: int = 1000  # speaker ids start here: corpora made apart keep disjoint ids (src.corpus.merge)


def fractions_of(options: PlanOptions, with_engine_split: bool) -> dict[str, float]:
    """Share of speakers and utterances per split; test-engine gets as much as test."""
    shares = {"valid": options.valid_fraction, "test": options.test_fraction}
    if with_engine_split:
        shares[ENGINE_SPLIT] = options.test_fraction
    return {"train": 1 - sum(shares.values()), **shares}


def heldout_voices(voices: dict[str, list[str]], spec: str) -> dict[str, list[str]]:
    """The voices of the held-out family. "auto": flite when another engine is also used, else the espeak
    accent en-gb-x-rp, else none; "none": none; "<engine>" or "<engine>:<prefix>": the voices with a part
    (between "+" and "@") starting with the prefix, so "kokoro:jm_kumo" also takes every blend with jm_kumo."""
    engines = sorted(e for e in voices if voices[e])
    if spec == "none":
        return {}
    if spec == "auto":
        if "flite" in engines and len(engines) > 1:
            spec = "flite"
        elif "espeak" in engines:
            spec = "espeak:en-gb-x-rp"
        else:
            return {}
    engine, _, prefix = spec.partition(":")
    if engine not in engines:
        raise ValueError(f"--heldout {spec!r}: engine {engine!r} is not among the engines used {engines}")
    chosen = [v for v in voices[engine] if any(part.startswith(prefix) for part in re.split(r"[+@]", v))]
    if not chosen:
        raise ValueError(f"--heldout {spec!r}: no {engine} voice starts with {prefix!r}; voices: {voices[engine]}")
    if sum(len(v) for v in voices.values()) - len(chosen) < 3:
        raise ValueError(f"--heldout {spec!r} leaves fewer than 3 voices for train, valid and test")
    return {engine: chosen}


def split_voices(voices: dict[str, list[str]], options: PlanOptions, rng: random.Random) -> dict[str, dict]:
    """Engine voices per split, each voice in one split only: an engine with at least 3 voices gives train, valid
    and test voices of their own; an engine with fewer voices is used for training only."""
    fractions = fractions_of(options, with_engine_split=False)
    by_split = {split: {} for split in SPLITS}
    for engine in sorted(voices):
        names = rng.sample(sorted(voices[engine]), len(voices[engine]))
        if len(names) < 3:
            by_split["train"][engine] = names
            continue
        counts = apportion(len(names), fractions, minimum=1)
        start = 0
        for split in SPLITS:
            by_split[split][engine] = names[start:start + counts[split]]
            start += counts[split]
    for split in ("valid", "test"):
        if not any(by_split[split].values()):
            raise ValueError(f"no voice left for the {split} split: voice-disjoint splits need an engine with at "
                             "least 3 voices (espeak, flite) besides any held-out family")
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
    """Speaker-disjoint splits (each speaker and each voice in exactly one split, at least one speaker per split),
    the held-out family in test-engine. Speaker ids run first_speaker (1000), 1001, ... over the splits in ALL_SPLITS order."""
    if not any(voices.values()):
        raise ValueError("no TTS engine available: install flite or espeak-ng (see docs/corpus.md)")
    held = heldout_voices(voices, options.heldout)
    fractions = fractions_of(options, with_engine_split=bool(held))
    if options.speakers < len(fractions):
        raise ValueError(f"need at least {len(fractions)} speakers for speaker-disjoint splits {list(fractions)}, "
                         f"got {options.speakers}")
    if options.valid_fraction <= 0 or options.test_fraction <= 0 or fractions["train"] <= 0:
        raise ValueError(f"valid and test fractions must be > 0 and leave some train data, got "
                         f"{options.valid_fraction}/{options.test_fraction} (test-engine takes the test share again)")
    rest = {e: [v for v in names if v not in held.get(e, ())] for e, names in voices.items()}
    voices_by_split = split_voices({e: v for e, v in rest.items() if v}, options, rng)
    if held:
        voices_by_split[ENGINE_SPLIT] = held
    counts = apportion(options.speakers, fractions, minimum=1)
    speakers, next_id = {}, options.first_speaker
    for split in fractions:
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


def _texts(kind: str, facts: list[Fact], rng: random.Random, pool) -> tuple[str, str, float | None, str]:
    """(spoken text, response, cut fraction, answer key) for one utterance of `kind`."""
    if kind == "asr":
        sentence = asr_sentence(facts, rng)
        return sentence, transcript(sentence), None, ""
    if kind == "read":
        sentence = read_sentence(pool, facts, rng)
        return sentence, transcript(sentence), None, ""
    if kind == "ignore":
        return background_statement(rng), rng.choice(IGNORE_REPLIES), None, ""
    qa = make_qa(facts, rng)
    if kind == "incomplete":
        return qa.question, rng.choice(INCOMPLETE_REPLIES), round(rng.uniform(0.3, 0.7), 3), ""
    return qa.question, qa.answer, None, qa.key


def read_sentence(pool: dict | None, facts: list[Fact], rng: random.Random) -> str:
    """A sentence of a text pool (source drawn first, so a small source is not drowned by a large one), or the
    built-in sentences when no pool is installed."""
    sources = sorted(name for name, sentences in (pool or {}).items() if sentences)
    if not sources:
        return asr_sentence(facts, rng)
    return rng.choice(pool[rng.choice(sources)])


def words_before_cut(label: str, fraction: float) -> str:
    """The words of `label` that end before `fraction` of its length (an estimate of what a cut clip still says)."""
    kept, position = [], 0
    for word in label.split():
        position += len(word) + 1
        if position - 1 > fraction * len(label):
            break
        kept.append(word)
    return " ".join(kept) or label.split()[0]


def plan_corpus(options: PlanOptions, voices: dict[str, list[str]], facts: list[Fact],
                pool: dict | None = None) -> list[Utterance]:
    """The whole corpus, in manifest order (split, speaker, chapter, id). `pool`: source name -> sentences for
    the `read` kind (src/corpus/pools.py); None or empty: the built-in sentences."""
    rng = random.Random(options.seed)
    speakers = split_speakers(voices, options, rng)
    split_sizes = apportion(options.utterances, fractions_of(options, ENGINE_SPLIT in speakers), minimum=1)
    utterances, number = [], 0
    for split in speakers:
        kinds = [k for k, n in sorted(apportion(split_sizes[split], options.mix, minimum=1).items())
                 for _ in range(n)]
        rng.shuffle(kinds)
        for i, kind in enumerate(kinds):
            speaker = speakers[split][i % len(speakers[split])]
            text, response, cut, answer = _texts(kind, facts, rng, pool)
            label = transcript(text)
            utt_id = f"{speaker.speaker_id}-{KINDS[kind].chapter}-{number:04d}{KINDS[kind].suffix}"
            utterances.append(Utterance(
                utt_id=("asr-" + utt_id) if kind in ASR_KINDS else utt_id, split=split, speaker=speaker, kind=kind,
                text=text, transcript=words_before_cut(label, cut) if cut else label, response=response,
                seed=rng.randrange(2**31), level_db=round(rng.uniform(-6, -1), 1),
                augmentation=draw_augmentation(rng, options.augment, options.rirs, options.codecs),
                cut_fraction=cut, answer=answer))
            number += 1
    utterances = with_babble(utterances, speakers, random.Random(options.seed + 2))
    utterances = with_context(utterances, options.multiturn, random.Random(options.seed + 1))
    order = {s: i for i, s in enumerate(ALL_SPLITS)}
    return sorted(utterances, key=lambda u: (order[u.split], u.speaker.speaker_id, u.chapter, u.utt_id))


def with_babble(utterances: list[Utterance], speakers: dict, rng: random.Random) -> list[Utterance]:
    """Fill in the voices of babble noise: 3 other speakers of the same split (voices never cross splits) each
    saying a background statement."""
    result = []
    for u in utterances:
        if u.augmentation.noise and u.augmentation.noise[0] == BABBLE:
            others = [s for s in speakers[u.split] if s != u.speaker] or speakers[u.split]
            talkers = tuple((rng.choice(others), background_statement(rng)) for _ in range(3))
            u = replace(u, augmentation=replace(u.augmentation, babble=talkers))
        result.append(u)
    return result


def with_context(utterances: list[Utterance], share: float, rng: random.Random) -> list[Utterance]:
    """Give `share` of the qa / state utterances one or two earlier turns: questions of the same speaker with
    their answers; the last earlier answer is cut after a few words in a third of them, as when the user
    interrupts it (src/sequence.py lays them out as the duplex engine does). Drawn from its own generator, so
    the rest of the plan does not depend on `share`."""
    if share <= 0:
        return utterances
    questions = {}
    for u in utterances:
        if u.kind == "qa":
            questions.setdefault(u.speaker.speaker_id, []).append(u)
    result = []
    for u in utterances:
        candidates = [q for q in questions.get(u.speaker.speaker_id, []) if q.utt_id != u.utt_id]
        if u.kind in ("qa", "incomplete", "ignore") and candidates and rng.random() < share:
            earlier = rng.sample(candidates, min(len(candidates), rng.choice((1, 1, 2))))
            turns = [(q.utt_id, q.response) for q in earlier]
            words = turns[-1][1].split()
            if len(words) > 2 and rng.random() < 1 / 3:
                turns[-1] = (turns[-1][0], " ".join(words[:rng.randint(1, len(words) - 1)]))
            u = replace(u, context=tuple(turns))
        result.append(u)
    return result
