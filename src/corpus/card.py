"""The data card: `<out>/README.md`, saying how the corpus was made and what is in it."""
import pathlib
from collections import Counter, defaultdict

from .plan import ALL_SPLITS, KINDS, PlanOptions


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _count_table(utterances, durations) -> str:
    counts, seconds = Counter(), defaultdict(float)
    for u in utterances:
        counts[u.split, u.kind] += 1
        seconds[u.split, u.kind] += durations[u.utt_id]
    rows = []
    for split in [s for s in ALL_SPLITS if any(u.split == s for u in utterances)]:
        cells = [f"{counts[split, k]} ({seconds[split, k] / 60:.1f} min)" for k in KINDS]
        total = sum(seconds[split, k] for k in KINDS)
        rows.append([split, *cells, sum(counts[split, k] for k in KINDS), f"{total / 3600:.3f}"])
    return _table(["split", *KINDS, "utterances", "hours"], rows)


def _speaker_table(utterances) -> str:
    speakers = sorted({(u.speaker, u.split) for u in utterances}, key=lambda s: s[0].speaker_id)
    per_speaker = Counter(u.speaker.speaker_id for u in utterances)
    rows = [[s.speaker_id, s.engine, s.voice, s.rate, s.pitch, split, per_speaker[s.speaker_id]]
            for s, split in speakers]
    return _table(["speaker", "engine", "voice", "rate", "pitch (semitones)", "split", "utterances"], rows)


def write_card(root: pathlib.Path, utterances, durations, engines, options: PlanOptions, fact_source: str,
               conversations, command: str, pool_counts: dict | None = None, failed: int = 0) -> None:
    hours = sum(durations.values()) / 3600
    augmentations = Counter(u.augmentation.describe() == "clean" for u in utterances)
    topics = ", ".join(f"{k} {v:.2f}" for k, v in options.mix.items())
    pools = ", ".join(f"{name} {count}" for name, count in (pool_counts or {}).items()) or "none (built-in sentences)"
    heldout = sorted({f"{u.speaker.engine}:{u.speaker.voice}" for u in utterances if u.split == "test-engine"})
    multiturn = sum(bool(u.context) for u in utterances)
    held_note = "; `test-engine` holds a voice family that no other split has" if heldout else ""
    text = f"""# Synthetic speech corpus (made by `python -m src.corpus`)

Entirely synthetic: text-to-speech voices reading generated sentences, questions and background talk. Made
offline, reproducible: the same command, seed and engine versions give the same corpus.

- command: `{command or "(library call)"}`
- seed: {options.seed}
- utterances: {len(utterances)}, {hours:.3f} hours of 16 kHz mono 16-bit audio
- engines: {", ".join(f"{name} ({engine.version()})" for name, engine in sorted(engines.items()))}
- mix of kinds (weights): {topics}
- read (broad-vocabulary ASR) sentences per text pool: {pools}
- augmentation probability (each of room, noise, codec, speed, pitch): {options.augment}; recorded impulse
  responses: {len(options.rirs)}; clean utterances: {augmentations[True]}, augmented: {augmentations[False]}
- held-out voice family (`test-engine`, heldout {options.heldout!r}): {", ".join(heldout) or "none"}
- multi-turn rows (earlier turns in the `context` column, share {options.multiturn}): {multiturn}
- utterances an engine could not render, left out (`failed.jsonl`): {failed}
- QA facts: {fact_source}; generated arithmetic, spelling, units and sequence questions; answers are full
  sentences with numbers spelled out
- incomplete: questions cut at 30-70 % of their speech, replies from the paper's appendix B.1;
  ignore: background statements not addressed to the assistant, replies from appendix B.2
- duplex conversation scripts: {len(conversations)} in `conversations/` (test speakers) and
  `conversations-engine/` (the held-out voice family)

Splits are speaker- and voice-disjoint (a speaker is one engine voice at one rate and pitch; each voice is in one
split){held_note}. Layout, id conventions and manifest columns: docs/corpus.md in the repository.

## Counts (utterances and minutes per kind)

{_count_table(utterances, durations)}

## Speakers

{_speaker_table(utterances)}
"""
    (root / "README.md").write_text(text, encoding="utf-8")
