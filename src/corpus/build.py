"""Build a corpus on disk: plan, synthesise (threads, progress bar), then write texts, manifests and the data card."""
import csv
import math
import pathlib
import random
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from tqdm import tqdm

from .card import write_card
from .conversations import write_conversations
from .engines import find_engines, sox_unavailable_reason
from .normalize import spoken_form
from .plan import KINDS, SPLITS, PlanOptions, Utterance, plan_corpus
from .quiz import load_facts
from .render import AUDIO_FORMATS, audio_path, render

MANIFEST_COLUMNS = ("ID", "duration", "wav", "wrd", "task", "state", "response")
SECONDS_PER_WORD, SECONDS_OVERHEAD = 0.38, 0.45  # rough TTS timing, only to turn --hours into a count


@dataclass(frozen=True)
class BuildOptions:
    out: pathlib.Path
    plan: PlanOptions
    hours: float | None = None
    engines: tuple[str, ...] | None = None
    audio_format: str = "flac"
    jobs: int = 2
    conversations: int = 4
    command: str = ""


def estimated_seconds(utterance: Utterance) -> float:
    seconds = SECONDS_OVERHEAD + SECONDS_PER_WORD * len(spoken_form(utterance.text).split())
    return seconds * (utterance.cut_fraction or 1.0) / utterance.speaker.rate


def count_for_hours(hours: float, plan: PlanOptions, voices, facts) -> int:
    """Utterance count whose estimated audio length is `hours`, from the mean of a 200-utterance trial plan."""
    trial = plan_corpus(replace(plan, utterances=200), voices, facts)
    mean = sum(map(estimated_seconds, trial)) / len(trial)
    return max(3, math.ceil(hours * 3600 / mean))


def synthesise_all(utterances, engines, root, extension, jobs) -> dict[str, float]:
    """Render every utterance (order-independent: each carries its own seed); returns durations by id."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        durations = list(tqdm(pool.map(lambda u: render(u, engines, root, extension), utterances),
                              total=len(utterances), desc="synthesising", unit="utt"))
    return {u.utt_id: d for u, d in zip(utterances, durations)}


def write_text_files(utterances, root: pathlib.Path) -> None:
    """Per speaker chapter: `<spk>-<chapter>.trans.txt` and, for replies other than the transcript,
    `<spk>-<chapter>.response.txt` (LibriSpeech line format `<utt_id> <text>`)."""
    groups = defaultdict(list)
    for u in utterances:
        groups[audio_path(u, "x").parent].append(u)
    for folder, members in groups.items():
        stem = f"{members[0].speaker.speaker_id}-{members[0].chapter}"
        lines = "".join(f"{u.utt_id} {u.transcript}\n" for u in members)
        (root / folder / f"{stem}.trans.txt").write_text(lines, encoding="utf-8")
        if members[0].kind != "asr":
            lines = "".join(f"{u.utt_id} {u.response}\n" for u in members)
            (root / folder / f"{stem}.response.txt").write_text(lines, encoding="utf-8")


def manifest_row(u: Utterance, duration: float, extension: str) -> dict:
    kind = KINDS[u.kind]
    return {"ID": u.utt_id, "duration": f"{duration:.3f}", "wav": audio_path(u, extension).as_posix(),
            "wrd": u.transcript, "task": kind.task, "state": kind.state, "response": u.response}


def write_csv(path: pathlib.Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_manifests(utterances, durations, root: pathlib.Path, extension: str) -> None:
    """`<split>.csv` with every row and `<split>-<task>.csv` per task; `wav` is relative to `root`."""
    for split in SPLITS:
        rows = [manifest_row(u, durations[u.utt_id], extension) for u in utterances if u.split == split]
        write_csv(root / f"{split}.csv", rows, MANIFEST_COLUMNS)
        for task in sorted({k.task for k in KINDS.values()}):
            write_csv(root / f"{split}-{task}.csv", [r for r in rows if r["task"] == task], MANIFEST_COLUMNS)


def write_speakers(utterances, root: pathlib.Path) -> None:
    speakers = sorted({(u.speaker, u.split) for u in utterances}, key=lambda s: s[0].speaker_id)
    rows = [{"speaker": s.speaker_id, "engine": s.engine, "voice": s.voice, "rate": s.rate, "pitch": s.pitch,
             "split": split} for s, split in speakers]
    write_csv(root / "speakers.csv", rows, ("speaker", "engine", "voice", "rate", "pitch", "split"))


def check_output_folder(out: pathlib.Path) -> None:
    """Refuse a file or a non-empty folder (files of an earlier corpus would mix into the manifests' folders),
    and create the folder now, so an unwritable path fails before any synthesis."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: --out is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out}: --out must be a new or empty folder (it holds files already); "
                              "delete it or choose another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out}: cannot create the output folder ({error.strerror}); choose a writable path") \
            from error


def build(options: BuildOptions, log=lambda message: print(message, file=sys.stderr)) -> list[Utterance]:
    """Make the whole corpus under `options.out`; returns the plan (with the measured durations in the manifests)."""
    if options.audio_format not in AUDIO_FORMATS:
        raise ValueError(f"--audio-format must be one of {sorted(AUDIO_FORMATS)}, got {options.audio_format!r}")
    check_output_folder(options.out)
    reason = sox_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    engines = find_engines(list(options.engines) if options.engines else None, log)
    if not engines:
        raise RuntimeError("no TTS engine is installed: run `bash scripts/install_tts.sh` as root "
                           "(or apt-get install flite espeak-ng sox)")
    facts, fact_source = load_facts()
    voices = {name: engine.voices() for name, engine in engines.items()}
    plan_options = options.plan
    if options.hours is not None:
        plan_options = replace(plan_options, utterances=count_for_hours(options.hours, plan_options, voices, facts))
    utterances = plan_corpus(plan_options, voices, facts)
    options.out.mkdir(parents=True, exist_ok=True)
    durations = synthesise_all(utterances, engines, options.out, options.audio_format, options.jobs)
    write_text_files(utterances, options.out)
    write_manifests(utterances, durations, options.out, options.audio_format)
    write_speakers(utterances, options.out)
    conversations = write_conversations(utterances, options.out, options.audio_format, options.conversations,
                                        random.Random(plan_options.seed))
    write_card(options.out, utterances, durations, engines, plan_options, fact_source, conversations, options.command)
    total = sum(durations.values())
    log(f"wrote {len(utterances)} utterances ({total / 3600:.3f} h) and {len(conversations)} conversation "
        f"scripts to {options.out}")
    return utterances
