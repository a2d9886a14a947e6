"""Folders packed as a gzip tar split into pieces of at most 15 MiB, and unpacked again: the one implementation.

Why: a lent GPU machine sends back no file over 16 MiB and starts bare, so everything a run must carry to the
next machine (a corpus, a save folder with its optimizer, an export) travels as pieces. A pack named NAME is

    NAME.tgz.000, NAME.tgz.001, ...   the gzip tar stream, cut every `piece_bytes` bytes
    NAME.pieces.json                  what is inside (folders), every piece's size and SHA-256, and a record

The index is written last (after every piece is in place under its final name), so a pack whose index exists
is complete; a missing or damaged piece is named before anything is extracted. Members are stored relative to
the `root` given to `pack`, and `unpack` first removes each packed folder under its root, so a folder comes back
exactly as it was packed (no stale checkpoint of an older pack survives next to the newer ones).

    python -m src.pieces pack ROOT OUTDIR NAME FOLDER [FOLDER ...]     # FOLDER relative to ROOT
    python -m src.pieces unpack OUTDIR NAME ROOT
    python -m src.pieces bundle OUTDIR BUNDLES [--max-mib 45]           # OUTDIR's files -> BUNDLES/a, b, ...

`bundle` deals a pieces folder into folders small enough for one call of a lent machine each (a call carries
at most 64 MiB with the working tree): the small files (indexes, records, the run's mark) go in the first.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import pathlib
import shutil
import sys
import tarfile

PIECE_BYTES = 15 * 2**20
INDEX_SUFFIX = ".pieces.json"
PIECE_INFIX = ".tgz."


class PiecesError(RuntimeError):
    """A pack that cannot be read back: the message names the file and what to do."""


class _PieceWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most `piece_bytes` bytes."""

    def __init__(self, folder: pathlib.Path, name: str, piece_bytes: int):
        super().__init__()
        self.folder, self.name, self.piece_bytes = folder, name, piece_bytes
        self.pieces: list[dict] = []
        self._file = None
        self._hash = None
        self._size = 0

    def _open_next(self) -> None:
        self._close_current()
        path = self.folder / f"{self.name}{PIECE_INFIX}{len(self.pieces):03d}.partial"
        self._file, self._hash, self._size = open(path, "wb"), hashlib.sha256(), 0
        self.pieces.append({"file": path.name[: -len(".partial")]})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.pieces[-1].update(bytes=self._size, sha256=self._hash.hexdigest())
            self._file = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._file is None or self._size == self.piece_bytes:
                self._open_next()
            take = min(len(view) - done, self.piece_bytes - self._size)
            chunk = view[done:done + take]
            self._file.write(chunk)
            self._hash.update(chunk)
            self._size += take
            done += take
        return done

    def close(self) -> None:
        if self._file is None and not self.pieces:
            self._open_next()  # an empty stream still makes one (empty) piece
        self._close_current()
        super().close()


class _PieceReader(io.RawIOBase):
    """A read-only stream over the pieces in order (what `cat NAME.tgz.*` gives)."""

    def __init__(self, paths: list[pathlib.Path]):
        super().__init__()
        self._paths = list(paths)
        self._file = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = open(self._paths.pop(0), "rb")
            count = self._file.readinto(buffer)
            if count:
                return count
            self._file.close()
            self._file = None


def index_path(folder: pathlib.Path, name: str) -> pathlib.Path:
    return folder / f"{name}{INDEX_SUFFIX}"


def _excluded(relative: str, exclude: tuple[str, ...]) -> bool:
    parts = relative.split("/")
    return any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in exclude)


def remove_pack(folder: pathlib.Path, name: str) -> None:
    """Delete a pack's index first (so it reads as absent), then its pieces (not the .partial ones being written)."""
    index_path(folder, name).unlink(missing_ok=True)
    for piece in folder.glob(f"{name}{PIECE_INFIX}*"):
        if piece.suffix != ".partial":
            piece.unlink()


def pack(root: pathlib.Path, folders: list[str], out: pathlib.Path, name: str, record: dict | None = None,
         exclude: tuple[str, ...] = (), piece_bytes: int = PIECE_BYTES, level: int = 1) -> dict:
    """Pack `root/folder` for each folder into pieces `out/name.tgz.NNN` + `out/name.pieces.json`; returns the index.

    `exclude`: glob patterns matched against every path component (e.g. "optimizer.ckpt", "tokens").
    gzip level 1: audio and checkpoints barely compress, and speed matters more inside a 10-minute step.
    """
    root, out = pathlib.Path(root), pathlib.Path(out)
    for folder in folders:
        if not (root / folder).is_dir():
            raise PiecesError(f"pack {name}: {root / folder} is not a folder; the step that makes it did not run.")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{name}{PIECE_INFIX}*.partial"):
        stale.unlink()
    writer = _PieceWriter(out, name, piece_bytes)
    buffered = io.BufferedWriter(writer, buffer_size=2**20)
    with gzip.GzipFile(fileobj=buffered, mode="wb", compresslevel=level, mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w|") as archive:
        for folder in folders:
            archive.add(root / folder, arcname=folder,
                        filter=lambda info: None if _excluded(info.name, exclude) else info)
    buffered.close()
    remove_pack(out, name)
    for piece in writer.pieces:
        (out / f"{piece['file']}.partial").rename(out / piece["file"])
    index = {"name": name, "folders": list(folders), "exclude": list(exclude), "pieces": writer.pieces,
             "record": record or {}}
    staged = index_path(out, name).with_suffix(".partial")
    staged.write_text(json.dumps(index, indent=1))
    staged.rename(index_path(out, name))
    return index


def read_index(folder: pathlib.Path, name: str) -> dict:
    path = index_path(folder, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PiecesError(f"{path}: no such pack index; copy every {name}{PIECE_INFIX}* piece and "
                          f"{path.name} into {folder}.") from None
    except json.JSONDecodeError as error:
        raise PiecesError(f"{path}: not a pack index ({error}); copy it again from where it was made.") from None


def check_pieces(folder: pathlib.Path, index: dict) -> list[pathlib.Path]:
    """Every piece present with its size and SHA-256, before anything is extracted; all problems at once."""
    problems, paths = [], []
    for piece in index["pieces"]:
        path = folder / piece["file"]
        paths.append(path)
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != piece["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the index says {piece['bytes']}")
        else:
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(2**20), b""):
                    digest.update(block)
            if digest.hexdigest() != piece["sha256"]:
                problems.append(f"{path}: SHA-256 differs from the index (damaged in transfer)")
    if problems:
        raise PiecesError(f"pack {index['name']} in {folder} is incomplete:\n  " + "\n  ".join(problems)
                          + "\nCopy the pieces again from the machine that made them.")
    return paths


def unpack(folder: pathlib.Path, name: str, root: pathlib.Path) -> dict:
    """Restore the folders of pack `name` (in `folder`) under `root`, replacing what is there; returns the index."""
    folder, root = pathlib.Path(folder), pathlib.Path(root)
    index = read_index(folder, name)
    paths = check_pieces(folder, index)
    for packed in index["folders"]:
        shutil.rmtree(root / packed, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    stream = io.BufferedReader(_PieceReader(paths), buffer_size=2**20)
    with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped, tarfile.open(fileobj=unzipped, mode="r|") as archive:
        archive.extractall(root, filter="data")
    return index


def bundle(pieces_dir: pathlib.Path, bundles: pathlib.Path, max_bytes: int) -> list[pathlib.Path]:
    """Copy every file of `pieces_dir` into bundles/a, bundles/b, ... of at most `max_bytes` each, small files
    first, files in name order otherwise; the bundle folders, in order."""
    files = sorted((path for path in pieces_dir.iterdir() if path.is_file()),
                   key=lambda path: (path.stat().st_size > 2**20, path.name))
    too_big = [path.name for path in files if path.stat().st_size > max_bytes]
    if too_big:
        raise PiecesError(f"{', '.join(too_big)}: larger than a bundle ({max_bytes / 2**20:g} MiB); raise --max-mib")
    if bundles.exists() and any(bundles.iterdir()):
        raise PiecesError(f"{bundles}: not empty; bundle into a new folder")
    groups: list[list[pathlib.Path]] = []
    filled = max_bytes  # bytes in the last group: "full" before the first file opens one
    for path in files:
        size = path.stat().st_size
        if filled + size > max_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(path)
        filled += size
    folders = []
    for number, group in enumerate(groups):
        folder = bundles / "abcdefghijklmnopqrstuvwxyz"[number]
        folder.mkdir(parents=True)
        for path in group:
            shutil.copy2(path, folder / path.name)
        folders.append(folder)
    return folders


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.pieces", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pack_parser = sub.add_parser("pack", help="folders under ROOT -> pieces in OUTDIR")
    pack_parser.add_argument("root", type=pathlib.Path)
    pack_parser.add_argument("out", type=pathlib.Path)
    pack_parser.add_argument("name")
    pack_parser.add_argument("folders", nargs="+")
    pack_parser.add_argument("--exclude", nargs="*", default=[], help="glob patterns of path components")
    unpack_parser = sub.add_parser("unpack", help="pieces in OUTDIR -> folders under ROOT")
    unpack_parser.add_argument("out", type=pathlib.Path)
    unpack_parser.add_argument("name")
    unpack_parser.add_argument("root", type=pathlib.Path)
    bundle_parser = sub.add_parser("bundle", help="OUTDIR's files -> folders BUNDLES/a, b, ... for one call each")
    bundle_parser.add_argument("out", type=pathlib.Path)
    bundle_parser.add_argument("bundles", type=pathlib.Path)
    bundle_parser.add_argument("--max-mib", type=float, default=45.0,
                               help="the most one bundle holds (default 45: a call's 64 MiB less the working tree)")
    args = parser.parse_args(argv)
    try:
        if args.command == "bundle":
            for folder in bundle(args.out, args.bundles, int(args.max_mib * 2**20)):
                size = sum(path.stat().st_size for path in folder.iterdir()) / 2**20
                print(f"{folder}: {len(list(folder.iterdir()))} files, {size:.1f} MiB")
        elif args.command == "pack":
            index = pack(args.root, args.folders, args.out, args.name, exclude=tuple(args.exclude))
            print(f"{args.name}: {len(index['pieces'])} pieces, "
                  f"{sum(p['bytes'] for p in index['pieces']) / 2**20:.1f} MiB in {args.out}")
        else:
            index = unpack(args.out, args.name, args.root)
            print(f"{args.name}: restored {', '.join(index['folders'])} under {args.root}")
    except PiecesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
