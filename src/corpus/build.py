"""Build a corpus on disk: plan, synthesise (processes, progress bar, resumable), then write texts, manifests and
the data card.

At scale (tens of hours on a many-core machine, in steps of a few minutes): `--jobs N` renders in N processes,
each with its own engines; `--time-budget S` stops taking new work after S seconds and exits with status 3;
the same command with `--resume` continues where it stopped (a file exists only once complete), and the
manifests and card are written when every file is there. `corpus_plan.json` records what decides the content,
so a resume with other options is refused.
"""
import csv
import dataclasses
import json
import math
import os
import pathlib
import random
import sys
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace

import soundfile as sf
from tqdm import tqdm

from .augment import working_codecs
from .card import write_card
from .conversations import write_conversations
from .engines import find_engines, sox_unavailable_reason
from .normalize import spoken_form
from .plan import ALL_SPLITS, KINDS, PlanOptions, Utterance, plan_corpus
from .quiz import load_facts, quiz_dir_under
from .render import AUDIO_FORMATS, audio_path, render

MANIFEST_COLUMNS = ("ID", "duration", "wav", "wrd", "task", "state", "response", "answer", "context")
SECONDS_PER_WORD, SECONDS_OVERHEAD = 0.38, 0.45  # rough TTS timing, only to turn --hours into a count
PLAN_RECORD = "corpus_plan.json"
FAILED_FILE = "failed.jsonl"  # utterances an engine or tool could not render (left out, kept out on --resume)
RIR_SUFFIXES = (".wav", ".flac")
CHUNK = 16  # utterances per task handed to a worker process


class IncompleteBuild(RuntimeError):
    """The time budget ran out; the same command with --resume continues."""


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
    text_root: pathlib.Path | None = pathlib.Path("/")  # where usr/share/games/fortunes and usr/share/wordnet are
    # looked for; None: not at all
    text_pools: tuple[pathlib.Path, ...] = ()  # extra plain-text sentence files for the `read` kind
    rir_dir: pathlib.Path | None = None  # impulse response files (.wav/.flac) for the room augmentation
    resume: bool = False
    time_budget: float | None = None  # seconds


def estimated_seconds(utterance: Utterance) -> float:
    seconds = SECONDS_OVERHEAD + SECONDS_PER_WORD * len(spoken_form(utterance.text).split())
    return seconds * (utterance.cut_fraction or 1.0) / utterance.speaker.rate


def count_for_hours(hours: float, plan: PlanOptions, voices, facts, pool=None) -> int:
    """Utterance count whose estimated audio length is `hours`, from the mean of a 200-utterance trial plan."""
    trial = plan_corpus(replace(plan, utterances=200, multiturn=0.0), voices, facts, pool)
    mean = sum(map(estimated_seconds, trial)) / len(trial)
    return max(3, math.ceil(hours * 3600 / mean))


_worker_engines: dict = {}  # per worker process: its own engine objects (made once by _start_worker)


def _start_worker(names) -> None:
    _worker_engines.update(find_engines(list(names), log=lambda message: None))


def _render_chunk(chunk, root, extension, rir_dir) -> list[dict]:
    return [render_or_failure(u, _worker_engines, root, extension, rir_dir) for u in chunk]


def render_or_failure(utterance, engines, root, extension, rir_dir) -> dict:
    """Render one utterance; an engine or tool failure on one text is recorded instead of stopping the build
    (on tens of thousands of pool sentences, one odd sentence must not cost a step)."""
    try:
        render(utterance, engines, root, extension, rir_dir)
        return {}
    except (RuntimeError, ValueError, OSError, IndexError) as error:
        return {"utt_id": utterance.utt_id, "engine": utterance.speaker.engine, "text": utterance.text,
                "error": str(error)[-300:]}


def synthesise_all(utterances, engines, root, extension, jobs, rir_dir=None, deadline=None) -> None:
    """Render every utterance not on disk yet and not failed before (each carries its own seed, so order and
    process count do not matter); with `deadline` (time.monotonic()), stop taking new work once it has passed.
    Failures go to FAILED_FILE."""
    failed = failed_ids(root)
    todo = [u for u in utterances if u.utt_id not in failed and not (root / audio_path(u, extension)).is_file()]
    progress = tqdm(total=len(utterances), initial=len(utterances) - len(todo), desc="synthesising", unit="utt")
    record = lambda results: [_append_failure(root, r) for r in results if r]  # noqa: E731
    if jobs <= 1:
        for utterance in todo:
            if deadline is not None and time.monotonic() > deadline:
                break
            record([render_or_failure(utterance, engines, root, extension, rir_dir)])
            progress.update(1)
    else:
        chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
        with ProcessPoolExecutor(jobs, initializer=_start_worker, initargs=(tuple(engines),)) as pool:
            pending = {pool.submit(_render_chunk, c, root, extension, rir_dir) for c in chunks[:2 * jobs]}
            queued = chunks[2 * jobs:]
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    results = future.result()
                    record(results)
                    progress.update(len(results))
                    if queued and (deadline is None or time.monotonic() < deadline):
                        pending.add(pool.submit(_render_chunk, queued.pop(0), root, extension, rir_dir))
    progress.close()


def failed_ids(root: pathlib.Path) -> set[str]:
    path = root / FAILED_FILE
    return {json.loads(line)["utt_id"] for line in path.read_text().splitlines()} if path.is_file() else set()


def failure_summary(root: pathlib.Path, most: int = 5) -> list[str]:
    """The commonest failures by engine and error (its last line), most frequent first: the why, in the log."""
    path = root / FAILED_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    counts = defaultdict(int)
    for row in rows:
        last_line = (row["error"].strip().splitlines() or [""])[-1][:200]
        counts[(row.get("engine", "?"), last_line)] += 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [f"  {count} failed, engine {engine}: error {error}" for (engine, error), count in ranked[:most]]


def _append_failure(root: pathlib.Path, failure: dict) -> None:
    with open(root / FAILED_FILE, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(failure) + "\n")


def without_failed(utterances, failed: set[str]) -> list[Utterance]:
    """The utterances that were rendered, with earlier turns that failed left out of their context."""
    kept = []
    for u in utterances:
        if u.utt_id in failed:
            continue
        context = tuple(turn for turn in u.context if turn[0] not in failed)
        kept.append(u if context == u.context else replace(u, context=context))
    return kept


def measured_durations(utterances, root, extension) -> dict[str, float]:
    """Seconds of every written file, from its header; an IncompleteBuild when some are still missing."""
    missing = [u for u in utterances if not (root / audio_path(u, extension)).is_file()]
    if missing:
        raise IncompleteBuild(f"{len(utterances) - len(missing)} of {len(utterances)} utterances are rendered; "
                              f"run the same command again with --resume to continue")
    durations = {}
    for u in utterances:
        info = sf.info(root / audio_path(u, extension))
        durations[u.utt_id] = info.frames / info.samplerate
    return durations


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


def manifest_row(u: Utterance, durations: dict, extension: str, by_id: dict) -> dict:
    kind = KINDS[u.kind]
    duration = durations[u.utt_id]
    context = [{"wav": audio_path(by_id[utt_id], extension).as_posix(), "reply": said,
                "duration": round(durations[utt_id], 3)} for utt_id, said in u.context]
    return {"ID": u.utt_id, "duration": f"{duration:.3f}", "wav": audio_path(u, extension).as_posix(),
            "wrd": u.transcript, "task": kind.task, "state": kind.state, "response": u.response,
            "answer": u.answer, "context": json.dumps(context) if context else ""}


def write_csv(path: pathlib.Path, rows: list[dict], columns) -> None:
    """Written under a temporary name, then renamed: a reader (or a merge undone after a kill) sees the old file
    or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def write_manifests(utterances, durations, root: pathlib.Path, extension: str) -> None:
    """`<split>.csv` with every row and `<split>-<task>.csv` per task, for each split present (test-engine:
    the held-out voice family); `wav` is relative to `root`."""
    by_id = {u.utt_id: u for u in utterances}
    for split in ALL_SPLITS:
        rows = [manifest_row(u, durations, extension, by_id) for u in utterances if u.split == split]
        if not rows:
            continue
        write_csv(root / f"{split}.csv", rows, MANIFEST_COLUMNS)
        for task in sorted({k.task for k in KINDS.values()}):
            write_csv(root / f"{split}-{task}.csv", [r for r in rows if r["task"] == task], MANIFEST_COLUMNS)


def write_speakers(utterances, root: pathlib.Path) -> None:
    speakers = sorted({(u.speaker, u.split) for u in utterances}, key=lambda s: s[0].speaker_id)
    rows = [{"speaker": s.speaker_id, "engine": s.engine, "voice": s.voice, "rate": s.rate, "pitch": s.pitch,
             "split": split} for s, split in speakers]
    write_csv(root / "speakers.csv", rows, ("speaker", "engine", "voice", "rate", "pitch", "split"))


def check_output_folder(out: pathlib.Path, resume: bool = False) -> None:
    """Refuse a file or a non-empty folder (files of an earlier corpus would mix into the manifests' folders)
    unless resuming one, and create the folder now, so an unwritable path fails before any synthesis."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: --out is a file; give a new or empty folder")
    if resume and not (out / PLAN_RECORD).is_file():
        raise FileExistsError(f"{out}: --resume needs a corpus folder started by this command ({PLAN_RECORD} "
                              "missing); drop --resume to start a new corpus")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out}: --out must be a new or empty folder (it holds files already); "
                              "delete it, choose another path, or add --resume to continue an interrupted build")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out}: cannot create the output folder ({error.strerror}); choose a writable path") \
            from error


def plan_record(plan: PlanOptions, engines, audio_format: str, pool_counts: dict, utterances: int) -> dict:
    """What decides the corpus content (a resume must match it)."""
    return {"plan": {**dataclasses.asdict(plan), "rirs": list(plan.rirs)}, "engines": sorted(engines),
            "audio_format": audio_format, "text_pool": pool_counts, "utterances": utterances}


def check_plan_record(out: pathlib.Path, record: dict, resume: bool) -> None:
    path = out / PLAN_RECORD
    if resume:
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(record)):
            changed = sorted(k for k in record if before.get(k) != json.loads(json.dumps(record[k])))
            raise ValueError(f"{out}: --resume with other options than the interrupted build (differs in "
                             f"{changed}); use the same command, or a new --out")
    else:
        path.write_text(json.dumps(record, indent=1))


def build(options: BuildOptions, log=lambda message: print(message, file=sys.stderr)) -> list[Utterance]:
    """Make the whole corpus under `options.out`; returns the plan (with the measured durations in the manifests)."""
    if options.audio_format not in AUDIO_FORMATS:
        raise ValueError(f"--audio-format must be one of {sorted(AUDIO_FORMATS)}, got {options.audio_format!r}")
    if options.rir_dir is not None and not options.rir_dir.is_dir():
        raise ValueError(f"{options.rir_dir}: --rir-dir is not a folder of impulse responses")
    check_output_folder(options.out, options.resume)
    reason = sox_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    engines = find_engines(list(options.engines) if options.engines else None, log, try_voice=True)
    if not engines:
        raise RuntimeError("no TTS engine is installed: run `bash scripts/install_tts.sh` as root "
                           "(or apt-get install flite espeak-ng sox)")
    deadline = None if options.time_budget is None else time.monotonic() + options.time_budget
    facts, fact_source = load_facts(quiz_dir_under(options.text_root))
    pool, pool_counts = ({}, {}) if options.plan.mix.get("read", 0) <= 0 else \
        load_pool_by_source(options.text_root, options.text_pools, log)
    if options.plan.mix.get("read", 0) > 0 and not pool:
        log("no text pool found (fortunes, wordnet or --text-pool): the read rows use the built-in sentences")
    voices = {name: engine.voices() for name, engine in engines.items()}
    rirs = tuple(sorted(p.name for p in options.rir_dir.iterdir() if p.suffix.lower() in RIR_SUFFIXES)) \
        if options.rir_dir is not None else ()
    codecs = working_codecs(log) if options.plan.augment > 0 else options.plan.codecs
    plan_options = replace(options.plan, rirs=rirs, codecs=codecs)
    if options.hours is not None:
        plan_options = replace(plan_options, utterances=count_for_hours(options.hours, plan_options, voices, facts,
                                                                        pool))
    utterances = plan_corpus(plan_options, voices, facts, pool)
    check_plan_record(options.out, plan_record(plan_options, engines, options.audio_format, pool_counts,
                                               len(utterances)), options.resume)
    synthesise_all(utterances, engines, options.out, options.audio_format, options.jobs, options.rir_dir, deadline)
    failed = failed_ids(options.out)
    if failed:
        log(f"{len(failed)} utterance(s) could not be rendered and are left out; see {options.out / FAILED_FILE} "
            "(delete it and --resume to try them again)")
        for line in failure_summary(options.out):
            log(line)
    utterances = without_failed(utterances, failed)
    durations = measured_durations(utterances, options.out, options.audio_format)
    write_text_files(utterances, options.out)
    write_manifests(utterances, durations, options.out, options.audio_format)
    write_speakers(utterances, options.out)
    conversations = write_conversations(utterances, options.out, options.audio_format, options.conversations,
                                        random.Random(plan_options.seed))
    conversations += write_conversations(utterances, options.out, options.audio_format, options.conversations,
                                         random.Random(plan_options.seed + 1), split="test-engine",
                                         folder_name="conversations-engine")
    write_card(options.out, utterances, durations, engines, plan_options, fact_source, conversations, options.command,
               pool_counts, len(failed))
    total = sum(durations.values())
    log(f"wrote {len(utterances)} utterances ({total / 3600:.3f} h) and {len(conversations)} conversation "
        f"scripts to {options.out}")
    return utterances


def load_pool_by_source(text_root: pathlib.Path | None, files, log) -> tuple[dict, dict]:
    """Sentences per source for the `read` kind, and their counts (for the plan record and the card)."""
    from .pools import pool_by_source
    pool = pool_by_source(text_root, files, log)
    return pool, {name: len(sentences) for name, sentences in pool.items()}
