"""Merge a corpus made apart into another: `python -m src.corpus.merge INTO ADD [ADD ...]`.

Why: the neural voices (Kokoro's blends, Piper's joe) are the closest to human speech that this world has, but
they synthesise at about 2x real time on 2 cores, far too slowly for a GPU lease. So they are made ahead on any
machine with `--first-speaker 5000` (ids of their own), packed as Opus (`python -m src.corpus.pack`), carried,
and joined here to the corpus made on the training machine. After the merge INTO is one corpus, as if one
command had made it: its speaker folders hold both (the ASR recipe walks them), its manifests list both (relative
`wav` paths stay valid, since both corpora use the same layout), `speakers.csv` names every speaker, and the
conversation scripts of both sit in `conversations/` (ADD's with its name as a prefix).

Refused before anything is written: a missing manifest or column, a speaker id in both corpora, a voice in two
splits of the union (the splits must stay speaker- and voice-disjoint), a file that would be overwritten.
A merge that stops half-way (a killed process, a full disk) is undone and redone by running the same command
again: INTO's manifests are backed up first, and the record `merged/<name>.json` says which files were added.
Running it again after it finished does nothing.

    python -m src.corpus.merge data/synth data/neural                  # a corpus folder (copied)
    python -m src.corpus.merge data/synth .carry/neural/neural.tar     # a pack (decoded into place)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shutil
import sys
import tarfile
from collections import defaultdict

import yaml

from . import pack as corpus_pack
from .build import write_csv
from .plan import ALL_SPLITS

SPEAKERS_FILE = "speakers.csv"
CONVERSATION_FOLDERS = ("conversations", "conversations-engine")
RECORD_FOLDER = "merged"


class MergeError(ValueError):
    """A corpus that cannot be merged, with what to do."""


def read_csv(path: pathlib.Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def manifest_names(corpus: pathlib.Path) -> list[str]:
    """`<split>.csv` and `<split>-<task>.csv` of every split the corpus has."""
    return sorted(path.name for path in corpus.glob("*.csv")
                  if path.name != SPEAKERS_FILE and any(path.stem == s or path.stem.startswith(f"{s}-")
                                                        for s in ALL_SPLITS))


def check_corpus(corpus: pathlib.Path, role: str) -> None:
    for name in ("train.csv", SPEAKERS_FILE):
        if not (corpus / name).is_file():
            raise MergeError(f"{corpus}: no {name}; {role} must be an output folder of python -m src.corpus")


def voice_splits(speakers: list[dict]) -> dict[tuple[str, str], set[str]]:
    found = defaultdict(set)
    for row in speakers:
        found[row["engine"], row["voice"]].add(row["split"])
    return found


def check_mergeable(into: pathlib.Path, add: pathlib.Path, name: str) -> None:
    """Everything that would make the union a broken corpus, checked before any write."""
    check_corpus(into, "INTO")
    check_corpus(add, "ADD")
    into_columns, into_speakers = read_csv(into / SPEAKERS_FILE)
    add_columns, add_speakers = read_csv(add / SPEAKERS_FILE)
    if into_columns != add_columns:
        raise MergeError(f"{add / SPEAKERS_FILE}: columns {add_columns}, but {into / SPEAKERS_FILE} has "
                         f"{into_columns}; make both with the same version of python -m src.corpus")
    shared = sorted({r["speaker"] for r in into_speakers} & {r["speaker"] for r in add_speakers}, key=int)
    if shared:
        highest = max(int(r["speaker"]) for r in into_speakers)
        raise MergeError(f"{add}: speaker id(s) {shared[:5]} are in {into} too; make {add.name} again with "
                         f"--first-speaker {(highest // 1000 + 1) * 1000} (above {into.name}'s highest id {highest})")
    crossing = {voice: splits for voice, splits in voice_splits(into_speakers + add_speakers).items()
                if len(splits) > 1}
    if crossing:
        (engine, voice), splits = sorted(crossing.items())[0]
        more = f" (and {len(crossing) - 1} more voices like it)" if len(crossing) > 1 else ""
        raise MergeError(f"{add}: voice {engine}:{voice} would be in the splits {sorted(splits)}{more}; "
                         f"held-out splits must not share a voice. Make "
                         f"{add.name} with other engines, or with --heldout so that the voice stays in one split")
    for manifest in manifest_names(add):
        columns, _ = read_csv(add / manifest)
        if (into / manifest).is_file() and read_csv(into / manifest)[0] != columns:
            raise MergeError(f"{add / manifest}: columns {columns} differ from {into / manifest}'s; make both "
                             "with the same version of python -m src.corpus")
    targets = list(speaker_folders(into, add).values()) + list(conversation_copies(into, add, name).values())
    clashes = [str(path) for path in targets if path.exists()]
    if clashes:
        raise MergeError(f"{into}: {len(clashes)} file(s) would be overwritten, e.g. {clashes[:3]}; "
                         "the corpora are not disjoint")


def conversation_copies(into: pathlib.Path, add: pathlib.Path, name: str) -> dict[pathlib.Path, pathlib.Path]:
    """ADD's scripts and their audio -> their places in INTO (file names prefixed with the merge's name)."""
    copies = {}
    for folder in CONVERSATION_FOLDERS:
        for path in sorted((add / folder).rglob("*")) if (add / folder).is_dir() else []:
            if path.is_file():
                relative = path.relative_to(add / folder)
                copies[path] = into / folder / relative.parent / f"{name}-{relative.name}"
    return copies


def speaker_folders(into: pathlib.Path, add: pathlib.Path) -> dict[pathlib.Path, pathlib.Path]:
    """ADD's speaker folders of every split -> their places in INTO (same split, same name)."""
    return {speaker: into / split / speaker.name for split in ALL_SPLITS
            for speaker in (sorted((add / split).iterdir()) if (add / split).is_dir() else [])}


def copy_conversation(source: pathlib.Path, target: pathlib.Path, name: str) -> None:
    """A script's audio paths get the same prefix as the audio files; other files are copied as they are."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix != ".yaml":
        shutil.copy2(source, target)
        return
    text = source.read_text(encoding="utf-8")
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    script = yaml.safe_load(text)
    for event in script.get("events", []):
        if "audio" in event:
            audio = pathlib.PurePosixPath(event["audio"])
            event["audio"] = str(audio.parent / f"{name}-{audio.name}")
    target.write_text(header + yaml.safe_dump(script, sort_keys=False), encoding="utf-8")


def hours_of(rows: list[dict]) -> float:
    return sum(float(row["duration"]) for row in rows) / 3600


def card_section(name: str, source: str, add: pathlib.Path, added: dict[str, list[dict]]) -> str:
    _, speakers = read_csv(add / SPEAKERS_FILE)
    engines = sorted({row["engine"] for row in speakers})
    splits = [split for split in ALL_SPLITS if f"{split}.csv" in added]
    lines = [f"\n## Merged in: {name}\n",
             f"From `{source}` (`python -m src.corpus.merge`); made by `{command_of(add)}`.",
             f"Engines: {', '.join(engines)}; {len(speakers)} speakers with ids of their own, in the same splits.\n",
             "| split | utterances | hours |", "|---|---|---|"]
    lines += [f"| {split} | {len(added[f'{split}.csv'])} | {hours_of(added[f'{split}.csv']):.3f} |" for split in splits]
    return "\n".join(lines) + "\n"


def command_of(corpus: pathlib.Path) -> str:
    card = corpus / "README.md"
    for line in card.read_text(encoding="utf-8").splitlines() if card.is_file() else []:
        if line.startswith("- command: "):
            return line[len("- command: "):].strip("` ")
    return "(unknown command)"


class Merge:
    """One merge of ADD into INTO, with its record and backups, so that it can be undone and redone."""

    def __init__(self, into: pathlib.Path, name: str):
        self.into, self.name = into, name
        self.record_path = into / RECORD_FOLDER / f"{name}.json"
        self.backup = into / f".premerge-{name}"

    def record(self) -> dict | None:
        return json.loads(self.record_path.read_text()) if self.record_path.is_file() else None

    def write_record(self, record: dict) -> None:
        self.record_path.parent.mkdir(exist_ok=True)
        partial = self.record_path.with_name(f".{self.record_path.name}.partial")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, self.record_path)

    def undo(self, record: dict) -> None:
        """Put INTO back as it was before a merge that did not finish."""
        for relative in record["added"]:
            path = self.into / relative
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for saved in sorted(self.backup.iterdir()) if self.backup.is_dir() else []:
            shutil.copy2(saved, self.into / saved.name)
        for relative in record["created"]:
            (self.into / relative).unlink(missing_ok=True)
        self.record_path.unlink()

    def run(self, add: pathlib.Path, source: str, move: bool, log) -> None:
        """Back up what changes, record what is added, add it, then mark the record done."""
        folders, conversations = speaker_folders(self.into, add), conversation_copies(self.into, add, self.name)
        manifests = manifest_names(add) + [SPEAKERS_FILE]
        record = self.start(source, list((folders | conversations).values()), manifests + ["README.md"])
        for source_path, target in folders.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source_path, target) if move else shutil.copytree(source_path, target)
        for source_path, target in conversations.items():
            copy_conversation(source_path, target, self.name)
        added = {manifest: self.append_rows(add, manifest) for manifest in manifests}
        with open(self.into / "README.md", "a", encoding="utf-8") as stream:
            stream.write(card_section(self.name, source, add, added))
        record.update(status="done", rows={m: len(r) for m, r in added.items() if m != SPEAKERS_FILE},
                      speakers=len(added[SPEAKERS_FILE]),
                      hours=round(sum(hours_of(added.get(f"{split}.csv", [])) for split in ALL_SPLITS), 3))
        self.write_record(record)
        shutil.rmtree(self.backup)
        log(f"merged {self.name} into {self.into}: {record['speakers']} speakers, {record['hours']} h, "
            f"{sum(record['rows'].get(f'{s}.csv', 0) for s in ALL_SPLITS)} utterances")

    def start(self, source: str, targets: list[pathlib.Path], touched: list[str]) -> dict:
        """Back up the files the merge changes, then write the record that `undo` reads."""
        record = {"name": self.name, "source": source, "status": "started",
                  "added": [str(target.relative_to(self.into)) for target in targets],
                  "created": [name for name in touched if not (self.into / name).is_file()]}
        shutil.rmtree(self.backup, ignore_errors=True)
        self.backup.mkdir()
        for name in touched:
            if (self.into / name).is_file():
                shutil.copy2(self.into / name, self.backup / name)
        self.write_record(record)
        return record

    def append_rows(self, add: pathlib.Path, manifest: str) -> list[dict]:
        """ADD's rows after INTO's in one manifest (written whole, then renamed); returns the rows added."""
        columns, rows = read_csv(add / manifest)
        before = read_csv(self.into / manifest)[1] if (self.into / manifest).is_file() else []
        write_csv(self.into / manifest, before + rows, columns)
        return rows


def default_name(add: pathlib.Path) -> str:
    return add.name.split(".")[0] if add.is_file() else add.name


def merge(into: pathlib.Path, add: pathlib.Path, name: str | None = None, log=print) -> dict:
    """Merge ADD (a corpus folder, or a pack from src.corpus.pack) into INTO; returns the merge record."""
    name = name or default_name(add)
    if not add.exists():
        raise MergeError(f"{add}: not found; give a corpus folder or a pack (.tar) of python -m src.corpus.pack")
    job = Merge(into, name)
    earlier = job.record()
    if earlier and earlier["status"] == "done":
        log(f"{into}: {name} was merged already ({earlier['source']}); nothing to do")
        return earlier
    check_corpus(into, "INTO")
    if earlier:
        log(f"{into}: undoing the unfinished merge of {name} before doing it again")
        job.undo(earlier)
    incoming = into / f".incoming-{name}"
    if add.is_file():
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            corpus_pack.unpack(add, incoming, os.cpu_count() or 1)
        except corpus_pack.IncompletePack as error:
            shutil.rmtree(incoming, ignore_errors=True)
            raise MergeError(str(error)) from None
        except (tarfile.TarError, EOFError) as error:
            shutil.rmtree(incoming, ignore_errors=True)
            raise MergeError(f"{add}: not a pack of python -m src.corpus.pack ({error}); carry it again") from None
        folder = incoming
    else:
        folder = add
    try:
        check_mergeable(into, folder, name)
        job.run(folder, str(add), move=folder == incoming, log=log)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return job.record()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.corpus.merge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("into", type=pathlib.Path, help="the corpus to merge into (changed in place)")
    parser.add_argument("add", type=pathlib.Path, nargs="+", help="corpus folders or packs (.tar) to add")
    parser.add_argument("--if-present", action="store_true",
                        help="skip an ADD that does not exist, with a line saying so (a pack that may not be carried)")
    args = parser.parse_args(argv)
    try:
        for add in args.add:
            if args.if_present and not add.exists():
                print(f"{add}: not here; nothing merged from it (--if-present)")
                continue
            merge(args.into, add)
    except (MergeError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
