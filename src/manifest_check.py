"""Every manifest row checked before the first training step, with every problem reported at once.

Why: a manifest read directly (`data_prep: null`, or one whose audio changed since it was written) used to
crash the run at the first bad file, in the middle of an epoch, losing that epoch. Here, before the Brain
starts, each row used by the stage is checked:

* text: `task` and `state` are known values (`QA` is refused, not silently dropped), `duration` is a number,
  `response` (the target text) is non-empty text, ids are unique;
* audio: the file exists, is not empty, decodes to the end, has finite samples, a usable sample rate
  (>= 8 kHz) and channel count (mono or stereo: they are averaged), and its duration matches the CSV's; the
  audio of a multi-turn row's earlier turns (`context` column) exists and decodes.

Audio is decoded in parallel threads (libsndfile releases the GIL) and the result is cached per file by size
and modification time (`audio_checks.json` in the output folder), so a restart re-reads only changed files.
Each problem names the CSV file, its line, the utterance, what is wrong and the fix. `--skip_bad_rows` turns
them into one counted warning and leaves those rows out.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
import pathlib

import numpy as np
import soundfile

from src.data_prep import STATES, TASKS

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("ID", "duration", "wav", "task", "state", "response")
CACHE_FILE = "audio_checks.json"
MIN_RATE = 8000
MAX_CHANNELS = 2
DURATION_TOLERANCE = 0.05  # seconds: manifests store 3 decimals; a different file is off by far more
BLOCK_FRAMES = 1 << 16
MAX_SHOWN = 50
REPREPARE = "re-run data preparation (or fix the row)"


@dataclasses.dataclass(frozen=True)
class Problem:
    csv: pathlib.Path
    line: int  # 1-based line of the CSV file (the header is line 1)
    utt_id: str
    what: str
    fix: str

    def __str__(self):
        return f"{self.csv}:{self.line} ({self.utt_id}): {self.what}. Fix: {self.fix}."


class ManifestError(ValueError):
    """Every problem found in the manifests, one per line."""

    def __init__(self, problems, header=None):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:MAX_SHOWN])
        more = f"\n  ... and {len(self.problems) - MAX_SHOWN} more" if len(self.problems) > MAX_SHOWN else ""
        header = header or (f"{len(self.problems)} problem(s) in the manifests; nothing was trained. Fix them, or "
                            "pass --skip_bad_rows to leave those rows out")
        super().__init__(f"{header}:\n{shown}{more}")


def read_rows(csv_path, required_columns=REQUIRED_COLUMNS):
    """[(line number, row)] of a manifest, after checking that it exists and has the required columns (a stage
    manifest's by default; ASR pre-training passes its own, src/asr_pretraining.py)."""
    csv_path = pathlib.Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: manifest not found; run data preparation (src/data_prep.py) or fix "
                                "the *_csv path (a YAML key or a command-line override such as --train_csv=...).")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required_columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected {list(required_columns)} "
                             "(see docs/corpus.md).")
        return [(reader.line_num, row) for row in reader]


def text_problems(csv_path, line, row, seen_ids):
    """What is wrong with a row's text fields (not its audio)."""
    utt_id = row["ID"] or "(no id)"
    found = []

    def problem(what, fix):
        found.append(Problem(pathlib.Path(csv_path), line, utt_id, what, fix))

    if not row["ID"]:
        problem("has an empty ID", "give every row a unique id")
    elif row["ID"] in seen_ids:
        problem(f"has ID {row['ID']!r} already used on line {seen_ids[row['ID']]}", "keep one row per id")
    seen_ids.setdefault(row["ID"], line)
    if row["task"] not in TASKS:
        problem(f"has task {row['task']!r}; expected one of {list(TASKS)}", "write the task in lower case, as "
                "listed (docs/corpus.md)")
    if row["state"] not in STATES:
        problem(f"has state {row['state']!r}; expected one of {sorted(STATES)}", "write one of those states")
    try:
        duration = float(row["duration"])
        if not duration > 0:
            raise ValueError
    except (TypeError, ValueError):
        problem(f"has duration {row['duration']!r}; expected seconds as a positive number", REPREPARE)
    if not is_text(row["response"]):
        problem(f"has response {row['response']!r}, which is not text", "give the target text (for ASR rows, "
                "the transcript)")
    return found


def is_text(value):
    """Non-empty, printable, with at least one letter or digit."""
    value = (value or "").strip()
    return bool(value) and value.isprintable() and "\ufffd" not in value and any(c.isalnum() for c in value)


def probe_audio(path):
    """{"frames", "rate", "channels"} of a file that decodes to the end, else {"what", "fix"}."""
    path = pathlib.Path(path)
    if not path.is_file():
        return {"what": f"audio file {path} not found", "fix": "restore the file, or " + REPREPARE}
    if path.stat().st_size == 0:
        return {"what": f"audio file {path} is empty (0 bytes)", "fix": "re-create the file, or delete it and "
                "its text line and re-run data preparation"}
    try:
        frames = 0
        with soundfile.SoundFile(str(path)) as sound:
            rate, channels = sound.samplerate, sound.channels
            for block in sound.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    return {"what": f"audio file {path} holds NaN or infinite samples", "fix": "re-export it"}
                frames += block.shape[0]
    except Exception as error:  # libsndfile's errors vary by format and damage
        return {"what": f"audio file {path} cannot be decoded ({error})",
                "fix": "the file is damaged or not audio: re-create it or convert it to FLAC or WAV"}
    return {"frames": frames, "rate": rate, "channels": channels}


def audio_problems(csv_path, line, row, wav_path, probe):
    """What is wrong with a row's audio, given `probe_audio`'s result for its file."""
    utt_id = row["ID"]
    if "what" in probe:
        return [Problem(pathlib.Path(csv_path), line, utt_id, probe["what"], probe["fix"])]
    found = []
    if probe["rate"] < MIN_RATE:
        found.append(Problem(csv_path, line, utt_id, f"audio {wav_path} is sampled at {probe['rate']} Hz, below "
                             f"{MIN_RATE} Hz", "use speech recorded at 8 kHz or more (16 kHz is what the model "
                             "hears)"))
    if probe["channels"] > MAX_CHANNELS:
        found.append(Problem(csv_path, line, utt_id, f"audio {wav_path} has {probe['channels']} channels",
                             "give mono (or stereo) speech"))
    seconds = probe["frames"] / probe["rate"] if probe["rate"] else 0.0
    try:
        declared = float(row["duration"])
    except (TypeError, ValueError):
        return found  # reported by text_problems
    if abs(seconds - declared) > DURATION_TOLERANCE:
        found.append(Problem(csv_path, line, utt_id, f"the manifest says {declared:.3f} s but {wav_path} holds "
                             f"{seconds:.3f} s", "the audio changed since the manifest was written: " + REPREPARE))
    return found


class AudioCache:
    """probe_audio results keyed by absolute path, valid while the file's size and mtime are unchanged."""

    def __init__(self, file):
        self.file = pathlib.Path(file) if file else None
        self.entries = {}
        if self.file and self.file.is_file():
            try:
                self.entries = json.loads(self.file.read_text())
            except ValueError:
                logger.warning("%s: unreadable audio check cache; checking every file again", self.file)

    @staticmethod
    def stamp(path):
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, path):
        entry = self.entries.get(str(path))
        stamp = self.stamp(path)
        if entry and stamp is not None and entry["stamp"] == stamp:
            return entry["probe"]
        return None

    def put(self, path, probe):
        stamp = self.stamp(path)
        if stamp is not None:
            self.entries[str(path)] = {"stamp": stamp, "probe": probe}

    def save(self):
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_name(f".{self.file.name}.tmp")
        temporary.write_text(json.dumps(self.entries))
        os.replace(temporary, self.file)


def probe_all(paths, cache, jobs=None):
    """{path: probe} for every path, decoding in parallel the ones the cache does not hold."""
    results, todo = {}, []
    for path in dict.fromkeys(paths):
        cached = cache.get(path)
        if cached is None:
            todo.append(path)
        else:
            results[path] = cached
    if todo:
        jobs = jobs or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for path, probe in zip(todo, pool.map(probe_audio, todo)):
                results[path] = probe
                cache.put(path, probe)
        cache.save()
        logger.info("Checked %d audio file(s) (%d from the cache)", len(todo), len(results) - len(todo))
    return results


def check_manifests(csv_paths, tasks=None, cache_file=None, jobs=None):
    """Every problem of the rows the stage uses (task in `tasks`, or every row when None), over all manifests.

    Returns [Problem]; rows whose task is a known one the stage does not use are not checked further.
    """
    problems, used, earlier = [], [], []
    for csv_path in csv_paths:
        seen_ids = {}
        for line, row in read_rows(csv_path):
            found = text_problems(csv_path, line, row, seen_ids)
            problems.extend(found)
            if tasks is not None and row["task"] in TASKS and row["task"] not in tasks:
                continue
            if not any("duration" in p.what for p in found):
                used.append((csv_path, line, row, resolve_wav(csv_path, row["wav"])))
            turns, problem = context_wavs(csv_path, line, row)
            problems.extend([problem] if problem else [])
            earlier.extend((csv_path, line, row, wav) for wav in turns)
    probes = probe_all([wav for *_, wav in used + earlier], AudioCache(cache_file), jobs)
    for csv_path, line, row, wav in used:
        problems.extend(audio_problems(pathlib.Path(csv_path), line, row, wav, probes[wav]))
    for csv_path, line, row, wav in earlier:  # an earlier turn's audio: it must load, its length is free
        if "what" in probes[wav]:
            problems.append(Problem(pathlib.Path(csv_path), line, row["ID"], "context turn: " + probes[wav]["what"],
                                    probes[wav]["fix"]))
    return sorted(problems, key=lambda p: (str(p.csv), p.line))


def context_wavs(csv_path, line, row):
    """(audio paths of a multi-turn row's earlier turns, Problem or None) from its optional `context` column."""
    text = row.get("context")
    if not text:
        return [], None
    try:
        return [resolve_wav(csv_path, turn["wav"]) for turn in json.loads(text)], None
    except (ValueError, TypeError, KeyError):
        return [], Problem(pathlib.Path(csv_path), line, row["ID"], f"has context {text[:80]!r}, not a JSON list "
                           'of {"wav": ..., "reply": ...} objects', "see docs/corpus.md")


def resolve_wav(csv_path, wav):
    """Relative `wav` paths are relative to the manifest's folder (docs/corpus.md)."""
    return str((pathlib.Path(csv_path).parent / wav).resolve())


def bad_rows(problems):
    """{csv path (str): {line numbers}} of the rows that have a problem."""
    rows = {}
    for problem in problems:
        rows.setdefault(str(pathlib.Path(problem.csv)), set()).add(problem.line)
    return rows


def checked_manifests(csv_paths, tasks=None, cache_file=None, skip_bad_rows=False, jobs=None):
    """Check; raise ManifestError listing every problem, or with `skip_bad_rows` warn once and return the bad
    rows to leave out ({csv path: {line numbers}})."""
    problems = check_manifests(csv_paths, tasks, cache_file, jobs)
    if not problems:
        return {}
    if not skip_bad_rows:
        raise ManifestError(problems)
    rows = bad_rows(problems)
    count = sum(len(lines) for lines in rows.values())
    logger.warning("--skip_bad_rows: leaving out %d row(s) with %d problem(s):\n%s", count, len(problems),
                   "\n".join(f"  {p}" for p in problems[:MAX_SHOWN]))
    return rows
