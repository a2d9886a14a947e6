"""LibriSpeech-format folders -> CSV manifests for the four training stages.

Why a new preparer: the reference one (spec §3.1, §8.11) reads transcripts only from files named `*response.txt`,
turns "_" into spaces, accepts FLAC only, never filters by duration, and leaves the task/state of a sample implicit
in its id. Here every split folder is walked once and each utterance becomes one CSV row with explicit columns:

    ID, duration, wav, wrd, task, state, response

* `wrd`: what the user said (LibriSpeech `*.trans.txt`); empty when only a response is known.
* `response`: the text the model must produce (`*.response.txt`, or the reference's `*response.txt`); for ASR
  samples with no response file it is the transcript itself.
* `task`: `asr`, `qa` or `state`; `state`: `empty` (no state class: stages 3-4 label it `<|endofuser|>` like the
  reference does for `asr-` ids), `respond`, `incomplete` or `ignore`. Names as in docs/corpus.md.

Text files hold one `<utt_id> <text...>` per line (LibriSpeech convention); the id is the audio file's stem.
The reference id conventions are still understood: an `asr-` prefix marks an ASR sample, a `-cut` suffix an
incomplete input and an `-ignore` suffix an input to ignore. Audio may be FLAC or WAV (any rate: the data
pipeline resamples when it reads).

Usage (normally called from the stage scripts, skipped when already done)::

    python -m src.data_prep --data_folder /data/LibriSpeech --save_folder results/prep \
        --train_splits train-clean-100 --dev_splits dev-clean --test_splits test-clean
"""
import argparse
import csv
import hashlib
import json
import logging
import os
import pathlib
from dataclasses import asdict, dataclass, field

import soundfile
from tqdm import tqdm

logger = logging.getLogger(__name__)

CSV_COLUMNS = ["ID", "duration", "wav", "wrd", "task", "state", "response"]
AUDIO_SUFFIXES = (".flac", ".wav")
TRANSCRIPT_SUFFIX = ".trans.txt"
RESPONSE_SUFFIX = "response.txt"  # matches LibriSpeech-style `*.response.txt` and the reference's `*response.txt`
DONE_MARKER = "prepare_done.json"

TASK_ASR, TASK_QA, TASK_STATE = "asr", "qa", "state"
STATE_EMPTY, STATE_RESPOND, STATE_INCOMPLETE, STATE_IGNORE = "empty", "respond", "incomplete", "ignore"
TASKS = (TASK_ASR, TASK_QA, TASK_STATE)
STATES = (STATE_EMPTY, STATE_RESPOND, STATE_INCOMPLETE, STATE_IGNORE)


@dataclass
class PrepOptions:
    """Everything that decides the manifests' content; stored beside them so a changed option re-prepares."""

    data_folder: str
    train_splits: list = field(default_factory=list)
    dev_splits: list = field(default_factory=list)
    test_splits: list = field(default_factory=list)
    min_duration: float = 0.0
    max_duration: float = float("inf")
    lowercase_transcripts: bool = False  # real LibriSpeech is upper case; the paper's stage-1 text is lower case


def as_transcription_row(row):
    """A manifest row (or dataset entry) read as an ASR row: its transcript `wrd` is the target, no state.

    The one mapping behind stage 1's `transcripts_as_targets` (src/stages.py) and the demo's re-cut ASR
    manifests (scripts/demo_manifests.py): any utterance is as good an alignment example as a read sentence.
    """
    return {**row, "task": TASK_ASR, "state": STATE_EMPTY, "response": (row.get("wrd") or "").strip()}


def state_from_id(utt_id, task):
    """Reference convention: `-cut` = truncated (incomplete) input, `-ignore` = input to ignore."""
    if utt_id.endswith("-cut"):
        return STATE_INCOMPLETE
    if utt_id.endswith("-ignore"):
        return STATE_IGNORE
    return STATE_EMPTY if task == TASK_ASR else STATE_RESPOND


def task_from_id(utt_id, has_response):
    """Reference convention: `asr-` ids are ASR, `-cut`/`-ignore` ids state data; other ids with a response QA."""
    if utt_id.startswith("asr-") or not has_response:
        return TASK_ASR
    if utt_id.endswith(("-cut", "-ignore")):
        return TASK_STATE
    return TASK_QA


def read_text_file(path):
    """Parse `<utt_id> <text...>` lines; the text is kept verbatim (no "_" -> " " rewrite, spec §8.11)."""
    texts = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            utt_id, _, text = line.partition(" ")
            if not text.strip():
                raise ValueError(
                    f"{path}:{line_number}: expected '<utterance id> <text>', got {line!r}. "
                    "Each line must hold an id, one space, then the text."
                )
            if utt_id in texts:
                raise ValueError(f"{path}:{line_number}: utterance id {utt_id!r} appears twice; keep one line per id.")
            texts[utt_id] = text.strip()
    return texts


def collect_split(split_folder):
    """Walk one split folder: audio files by stem, transcripts and responses by utterance id."""
    audio, transcripts, responses = {}, {}, {}
    for path in sorted(pathlib.Path(split_folder).rglob("*")):
        if not path.is_file():
            continue
        name = path.name
        if name.lower().endswith(AUDIO_SUFFIXES):
            stem = name.rsplit(".", 1)[0]
            if stem in audio:
                raise ValueError(f"{path}: audio id {stem!r} also at {audio[stem]}; ids must be unique per split.")
            audio[stem] = path.resolve()
        elif name.endswith(TRANSCRIPT_SUFFIX):
            transcripts.update(read_text_file(path))
        elif name.endswith(RESPONSE_SUFFIX):
            responses.update(read_text_file(path))
    return audio, transcripts, responses


def audio_duration(path):
    """Duration in seconds from the file header (no decoding); the whole file is decoded by the row checks
    before training (src/manifest_check.py)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the audio file is empty (0 bytes). Re-create it, or delete it and its "
                         "transcript line.")
    try:
        info = soundfile.info(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: cannot read the audio header ({error}). The file is damaged or not audio: "
                         "re-create it, or convert it to FLAC or WAV.") from error
    return info.frames / info.samplerate


def make_row(utt_id, wav_path, transcript, response, lowercase_transcripts=False):
    """One manifest row with explicit task/state; ASR targets default to the transcript."""
    has_response = response is not None
    task = task_from_id(utt_id, has_response)
    if transcript is not None and lowercase_transcripts:
        transcript = transcript.lower()
    target = response if has_response else transcript
    return {
        "ID": utt_id,
        "duration": f"{audio_duration(wav_path):.3f}",
        "wav": str(wav_path),
        "wrd": transcript or "",
        "task": task,
        "state": state_from_id(utt_id, task),
        "response": target,
    }


def split_rows(split_folder, min_duration, max_duration, lowercase_transcripts=False):
    """Rows of one split, duration-filtered; texts without audio are an error, audio without text is skipped."""
    split_folder = pathlib.Path(split_folder)
    if not split_folder.is_dir():
        raise FileNotFoundError(f"{split_folder}: split folder not found. Check data_folder and the split names.")
    audio, transcripts, responses = collect_split(split_folder)
    missing = sorted((set(transcripts) | set(responses)) - set(audio))
    if missing:
        raise FileNotFoundError(
            f"{split_folder}: {len(missing)} utterance(s) have text but no .flac/.wav file, e.g. {missing[:3]}. "
            "Each text line's id must equal an audio file's name without extension."
        )
    unlabeled = sorted(set(audio) - set(transcripts) - set(responses))
    if unlabeled:
        logger.warning("%s: %d audio file(s) without text skipped, e.g. %s", split_folder, len(unlabeled), unlabeled[:3])
    rows, unreadable, too_short, too_long = [], [], 0, 0
    labeled = sorted(set(transcripts) | set(responses))
    for utt_id in tqdm(labeled, desc=f"prepare {split_folder.name}", leave=False):
        try:
            row = make_row(utt_id, audio[utt_id], transcripts.get(utt_id), responses.get(utt_id),
                           lowercase_transcripts)
        except ValueError as error:
            unreadable.append(str(error))
            continue
        duration = float(row["duration"])
        too_short += duration < min_duration
        too_long += duration > max_duration
        if min_duration <= duration <= max_duration:
            rows.append(row)
    if unreadable:  # every bad file at once, not one per attempt
        raise ValueError(f"{split_folder}: {len(unreadable)} audio file(s) cannot be used:\n  "
                         + "\n  ".join(unreadable))
    if too_short or too_long:
        logger.info("%s: dropped %d shorter than %.2f s, %d longer than %.2f s",
                    split_folder, too_short, min_duration, too_long, max_duration)
    return rows


def write_csv(rows, path):
    """Write rows with the fixed column order (SpeechBrain's CSV reader keys on `ID`)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def manifest_paths(save_folder, options):
    """Every CSV this preparation writes: one per split plus the merged train.csv."""
    save_folder = pathlib.Path(save_folder)
    names = ["train"] + list(options.dev_splits) + list(options.test_splits)
    return [save_folder / f"{name}.csv" for name in dict.fromkeys(names)]


def is_prepared(save_folder, options):
    """Done when every CSV exists and the marker records exactly these options and these files (every file of
    the split folders, by path, size and modification time: added, removed or re-written audio or text makes
    the manifests stale)."""
    marker = pathlib.Path(save_folder) / DONE_MARKER
    if not marker.is_file() or not all(path.is_file() for path in manifest_paths(save_folder, options)):
        return False
    recorded = json.loads(marker.read_text())
    if recorded.get("options", recorded) != _options_record(options):
        return False
    if recorded.get("files") != files_fingerprint(options):
        logger.info("%s: audio or text files changed since the manifests were written; preparing them again.",
                    options.data_folder)
        return False
    return True


def files_fingerprint(options):
    """A hash of (relative path, size, mtime) of every file under the split folders (no file is read)."""
    digest = hashlib.sha256()
    data_folder = pathlib.Path(options.data_folder)
    for split in dict.fromkeys(list(options.train_splits) + list(options.dev_splits) + list(options.test_splits)):
        for path in sorted((data_folder / split).rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(data_folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _options_record(options):
    record = asdict(options)
    record["max_duration"] = str(record["max_duration"])  # inf is not JSON
    return record


def prepare_manifests(save_folder, skip_prep=False, **options):
    """Write `<split>.csv` for dev/test splits and one merged `train.csv`; skip when already done.

    Returns the dict {name: csv path}. Options: see `PrepOptions`.
    """
    options = PrepOptions(**options)
    save_folder = pathlib.Path(save_folder)
    paths = {path.stem: path for path in manifest_paths(save_folder, options)}
    if skip_prep or is_prepared(save_folder, options):
        logger.info("Manifests in %s are up to date; skipping data preparation.", save_folder)
        return paths
    save_folder.mkdir(parents=True, exist_ok=True)
    data_folder = pathlib.Path(options.data_folder)
    limits = (options.min_duration, options.max_duration, options.lowercase_transcripts)
    train_rows = [row for split in options.train_splits for row in split_rows(data_folder / split, *limits)]
    if not train_rows:
        raise ValueError(f"{data_folder}: no training utterance found in splits {options.train_splits}.")
    write_csv(train_rows, paths["train"])
    for split in list(options.dev_splits) + list(options.test_splits):
        write_csv(split_rows(data_folder / split, *limits), paths[split])
    record = {"options": _options_record(options), "files": files_fingerprint(options)}
    (save_folder / DONE_MARKER).write_text(json.dumps(record, indent=1))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_folder", required=True)
    parser.add_argument("--save_folder", required=True)
    parser.add_argument("--train_splits", nargs="+", required=True)
    parser.add_argument("--dev_splits", nargs="*", default=[])
    parser.add_argument("--test_splits", nargs="*", default=[])
    parser.add_argument("--min_duration", type=float, default=0.0)
    parser.add_argument("--max_duration", type=float, default=float("inf"))
    parser.add_argument("--lowercase_transcripts", action="store_true")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO)
    for name, path in prepare_manifests(args.pop("save_folder"), **args).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
