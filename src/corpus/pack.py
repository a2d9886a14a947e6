"""Pack a synthetic corpus small enough to carry to a machine without the TTS engines, and unpack it there.

Why: the corpus maker (`python -m src.corpus`) needs flite / espeak-ng / sox, which a lent GPU machine does not
have, and its 16 kHz FLAC is too large to travel (the 4 h demo corpus: 270 MiB). `pack` re-encodes every audio
file as Ogg/Opus (46.7 MiB for that corpus at the default level, 27 kbit/s) and keeps every other file
(manifests, transcripts, data card); `unpack` decodes the Opus files back to 16-bit audio (FLAC or WAV, as
before) under their original names, so the manifests' relative `wav` paths stay valid. Opus is lossy: the
unpacked audio is a codec-degraded copy, not the original (train on it, evaluate on the original). The pack's
last member counts its files, so a pack cut short by a transfer is refused before anything is unpacked.

    python -m src.corpus.pack pack data/demo .carry/demo-corpus.tar        # here (TTS machine)
    python -m src.corpus.pack unpack .carry/demo-corpus.tar data/demo       # there (GPU machine)

A packed corpus made apart (other engines, e.g. the neural voices) joins another with `python -m src.corpus.merge`.
"""
import argparse
import concurrent.futures
import io
import json
import os
import pathlib
import sys
import tarfile

import soundfile

AUDIO_SUFFIXES = (".flac", ".wav")
PACKED_SUFFIX = ".opus.ogg"
END_MARKER = ".pack-end.json"  # the last member: its file count; a pack without it was cut short
SAMPLE_RATE = 16000


def encode_opus(path: pathlib.Path, compression_level: float) -> bytes:
    """One audio file as Ogg/Opus bytes (libsndfile: compression level 0 = best quality, 1 = smallest)."""
    samples, rate = soundfile.read(str(path), dtype="float32")
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz; the corpus is 16 kHz (docs/corpus.md). Re-make it with src.corpus.")
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="OGG", subtype="OPUS", compression_level=compression_level)
    return buffer.getvalue()


def decode_to_original(data: bytes, target: pathlib.Path) -> None:
    """Opus bytes -> 16-bit audio in the format the target's suffix names (.flac or .wav)."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    target.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(target), samples, rate, subtype="PCM_16")


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def pack(corpus: pathlib.Path, archive_path: pathlib.Path, compression_level: float, jobs: int) -> None:
    if not (corpus / "train.csv").is_file():
        raise FileNotFoundError(f"{corpus}: no train.csv; is this an output folder of python -m src.corpus?")
    files = sorted(path for path in corpus.rglob("*") if path.is_file())
    audio = [path for path in files if path.suffix in AUDIO_SUFFIXES]
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path, "w") as archive, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for path in files:
            if path.suffix not in AUDIO_SUFFIXES:
                archive.add(path, arcname=str(path.relative_to(corpus)))
        encoded = pool.map(lambda path: encode_opus(path, compression_level), audio)
        for index, (path, data) in enumerate(zip(audio, encoded), 1):
            _add_bytes(archive, str(path.relative_to(corpus)) + PACKED_SUFFIX, data)
            if index % 1000 == 0 or index == len(audio):
                print(f"packed {index}/{len(audio)} audio files", file=sys.stderr)
        _add_bytes(archive, END_MARKER, json.dumps({"files": len(files)}).encode())
    print(f"{archive_path}: {len(audio)} audio + {len(files) - len(audio)} other files, "
          f"{archive_path.stat().st_size / 2**20:.1f} MiB")


class IncompletePack(ValueError):
    """A pack that lacks its end marker or some of its files: the transfer stopped early."""


def check_whole(archive_path: pathlib.Path, archive: tarfile.TarFile, members: list) -> None:
    """Refuse a pack cut short (a transfer that stopped early): its last member names how many files came before."""
    if not members or members[-1].name != END_MARKER:
        raise IncompletePack(f"{archive_path}: not a whole pack (its end marker is missing: cut short, or made "
                             "before packs had one); carry or make it again")
    expected = json.loads(archive.extractfile(members[-1]).read())["files"]
    if expected != len(members) - 1:
        raise IncompletePack(f"{archive_path}: not a whole pack ({len(members) - 1} of {expected} files); "
                             "carry it again")


def unpack(archive_path: pathlib.Path, corpus: pathlib.Path, jobs: int) -> None:
    if corpus.exists() and any(corpus.iterdir()):
        raise FileExistsError(f"{corpus}: not empty; unpack into a new folder.")
    with tarfile.open(archive_path) as archive:
        members = [member for member in archive.getmembers() if member.isfile()]
        check_whole(archive_path, archive, members)
        members = [member for member in members if member.name != END_MARKER]
        packed = [member for member in members if member.name.endswith(PACKED_SUFFIX)]
        others = [member for member in members if not member.name.endswith(PACKED_SUFFIX)]
        archive.extractall(corpus, members=others, filter="data")
        blobs = [(archive.extractfile(member).read(), member.name) for member in packed]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        targets = [corpus / name[: -len(PACKED_SUFFIX)] for _, name in blobs]
        list(pool.map(decode_to_original, [data for data, _ in blobs], targets))
    print(f"{corpus}: {len(packed)} audio files decoded, {len(others)} other files")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.corpus.pack", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pack_parser = sub.add_parser("pack", help="corpus folder -> tar of Opus audio + every other file")
    pack_parser.add_argument("corpus", type=pathlib.Path)
    pack_parser.add_argument("archive", type=pathlib.Path)
    pack_parser.add_argument("--compression-level", type=float, default=0.95,
                             help="libsndfile Opus level, 0 (best) .. 1 (smallest); 0.95: 27 kbit/s on "
                                  "the demo corpus")
    unpack_parser = sub.add_parser("unpack", help="tar from `pack` -> corpus folder with 16-bit audio")
    unpack_parser.add_argument("archive", type=pathlib.Path)
    unpack_parser.add_argument("corpus", type=pathlib.Path)
    for each in (pack_parser, unpack_parser):
        each.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.corpus, args.archive, args.compression_level, args.jobs)
    else:
        unpack(args.archive, args.corpus, args.jobs)


if __name__ == "__main__":
    main()
