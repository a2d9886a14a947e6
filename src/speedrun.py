"""The speedrun: from nothing to an exported, evaluated DuplexMamba in budgeted steps that resume anywhere.

    python -m src.speedrun --config hparams/speedrun/h200.yaml --out runs/speedrun --carry .carry
    python -m src.speedrun --config hparams/speedrun/tiny.yaml --out /tmp/sr --device cpu     # CPU, seconds-size
    python -m src.speedrun --config hparams/speedrun/h200.yaml --rehearse --out /tmp/rehearsal
                     # every H200 step at toy size on this CPU, before a lease (4 minutes on 2 cores)

The config (docs/demo_model.md, "Speedrun") is a list of steps, each one command of at most 10 minutes: corpus
synthesis, both pre-trainings, stages 1 to 4, export, evaluation. Every step writes only under OUT/work, and once
it ends its folders are packed into OUT/pieces as gzip tar pieces of at most 15 MiB (src/pieces.py) with a
record (status, seconds, host, throughput) in the pack's index. A step is done when its pack says so.

Resuming: run the same command again; done steps are skipped, and a failed or cut-off training step resumes from
its last checkpoint (the recipes continue from <output_folder>/save). On another machine, copy OUT/pieces (and
the carry folder) there, into a fresh OUT: the packs of done steps are unpacked and the run goes on.
`--call-minutes M` stops before a step whose budget would end past M minutes from this call's start (one lent
machine call of 10 minutes runs what fits); `--stop-after STEP` stops after that step.

Before the steps, the carry folder is set up (src/carry.py: .deb files unpacked with dpkg -x into OUT/tts,
wheels into OUT/site) and the environment of every step points at them.

Templates in a step's `run` list: {work} (OUT/work), {device}, {jobs} (CPU cores), {train_minutes} (the step's
budget less the config's reserve_minutes: what a recipe's --max_minutes gets), {budget_seconds}, {repo}, {tts}
(the prefix the carried .deb files are unpacked into: the corpus maker's --text-root), {carry} (the carry folder
itself: e.g. the neural-voice corpus made ahead, carry/neural/neural.tar, that src.corpus.merge adds).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import yaml

from src import carry as carry_setup
from src import pieces

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_STEP_MINUTES = 10.0
STEP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
EPOCH_LINE = re.compile(r"^epoch: \d+")
PROGRESS_LINE = re.compile(r"(/s\]|s/[a-z]+\]|\r)")  # tqdm bars (it/s, utt/s, s/it)
GRACE_SECONDS = 30  # after SIGTERM at the hard limit, before SIGKILL (a recipe saves a checkpoint on SIGTERM)


class SpeedrunError(RuntimeError):
    """Bad config or a step that failed: the message says which file or step and what to do."""


@dataclasses.dataclass
class Step:
    name: str
    budget_minutes: float
    produces: list[str]
    run: list[str] | None = None  # argv after the Python interpreter
    copy: str | None = None  # a folder (relative to the repo) copied as produces[0] instead of running a command
    exclude: list[str] = dataclasses.field(default_factory=list)  # left out of the pack (glob per path component)
    max_mib: float | None = None  # the produced folders together must not exceed this (the export)
    fresh: bool = False  # remove the produced folders before running (steps that do not resume: export, evaluate)
    ok_returncodes: list = dataclasses.field(default_factory=lambda: [0])  # e.g. [0, 3]: src.corpus out of time
    tools: bool = False  # runs the carried programs (TTS engines): PATH / LD_LIBRARY_PATH into the prefix
    exclude_when_done: list = dataclasses.field(default_factory=list)  # e.g. optimizer.ckpt: kept only to resume
    pack: bool = True  # False: not packed; a machine without its folders runs it again (a seeded corpus)
    throughput: dict | None = None  # {log: train_log.txt, manifest: CSV with duration, tasks: [...]} (templated)
    # A training step whose budget is only an upper bound (it stops at --max_minutes) may run shorter, down to this,
    # where --call-minutes leaves less than its budget: a short lease still gets its share instead of nothing.
    min_budget_minutes: float | None = None


@dataclasses.dataclass
class Config:
    path: pathlib.Path
    steps: list[Step]
    total_budget_minutes: float
    reserve_minutes: float = 1.0
    device: str = "cuda:0"
    piece_mib: float = 15.0
    env: dict = dataclasses.field(default_factory=dict)
    preload: list = dataclasses.field(default_factory=list)  # modules imported once; steps then run in forks
    rehearsal: dict | None = None  # the config's `rehearsal:` section (see `rehearsal`)


def load_config(path: pathlib.Path) -> Config:
    """Read and check a speedrun config; every problem is reported at once."""
    try:
        raw = yaml.safe_load(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise SpeedrunError(f"{path}: no such config (see hparams/speedrun/).") from None
    problems = []
    steps = []
    known = {field.name for field in dataclasses.fields(Step)}
    for number, item in enumerate(raw.get("steps") or [], 1):
        unknown = set(item) - known
        if unknown:
            problems.append(f"step {number}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
            continue
        try:
            step = Step(**item)
        except TypeError as error:
            problems.append(f"step {number}: {error}")
            continue
        if not STEP_NAME.match(str(step.name)):
            problems.append(f"step {number}: name {step.name!r} must be lower-case letters, digits, - or _")
        if not 0 < float(step.budget_minutes) <= MAX_STEP_MINUTES:
            problems.append(f"step {step.name}: budget_minutes {step.budget_minutes} not in (0, 10]")
        if step.min_budget_minutes is not None and not 0 < float(step.min_budget_minutes) <= float(step.budget_minutes):
            problems.append(f"step {step.name}: min_budget_minutes {step.min_budget_minutes} not in (0, budget_minutes]")
        if (step.run is None) == (step.copy is None):
            problems.append(f"step {step.name}: give exactly one of run (a command) or copy (a folder)")
        if not step.produces:
            problems.append(f"step {step.name}: produces (folders under OUT/work) is empty")
        steps.append(step)
    if not steps:
        problems.append("no steps")
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        problems.append(f"step names repeat: {names}")
    total = float(raw.get("total_budget_minutes", 60))
    spent = sum(float(step.budget_minutes) for step in steps)
    if spent > total:
        problems.append(f"the step budgets add up to {spent:g} min, over total_budget_minutes {total:g}")
    if problems:
        raise SpeedrunError(f"{path}:\n  " + "\n  ".join(problems))
    return Config(path=pathlib.Path(path), steps=steps, total_budget_minutes=total,
                  reserve_minutes=float(raw.get("reserve_minutes", 1.0)), device=str(raw.get("device", "cuda:0")),
                  piece_mib=float(raw.get("piece_mib", 15)), env={k: str(v) for k, v in (raw.get("env") or {}).items()},
                  preload=list(raw.get("preload") or []), rehearsal=raw.get("rehearsal"))


REHEARSAL_KEYS = {"device", "env", "budget_minutes", "options", "append"}


def rehearsal(config: Config) -> Config:
    """The same steps at toy size on a CPU, from the config's `rehearsal:` section (`--rehearse`).

    Why: a lent GPU machine is scarce, and a fault in a step's YAML or in the hand-over between two steps (a
    save folder the next one cannot read, an export over its size) would cost a lease to find. The rehearsal
    runs every step's own command and YAML, so the same code paths, on a corpus of minutes with one short
    epoch each. The section says how: `device` and `env`, one `budget_minutes` for every step, `options` (a
    command-line option -> the value that replaces the one after it, wherever it appears) and `append`
    (step name -> arguments added to its command). It says nothing of the GPU's speed or the model's quality.
    """
    section = config.rehearsal
    if not section:
        raise SpeedrunError(f"{config.path}: no rehearsal section, so --rehearse cannot shrink it (see "
                            "hparams/speedrun/h200.yaml for one)")
    problems = [f"unknown key {key!r} (known: {sorted(REHEARSAL_KEYS)})" for key in set(section) - REHEARSAL_KEYS]
    names = {step.name for step in config.steps}
    append = section.get("append") or {}
    problems += [f"append: no step named {name!r}" for name in append if name not in names]
    if problems:
        raise SpeedrunError(f"{config.path}: rehearsal: " + "; ".join(problems))
    options = {str(key): str(value) for key, value in (section.get("options") or {}).items()}
    budget = float(section.get("budget_minutes", MAX_STEP_MINUTES))
    steps = [dataclasses.replace(step, budget_minutes=budget, run=None if step.run is None else
                                 shrink_command(step.run, options) + [str(a) for a in append.get(step.name) or []])
             for step in config.steps]
    return dataclasses.replace(config, steps=steps, total_budget_minutes=budget * len(steps),
                               device=str(section.get("device", "cpu")),
                               env={k: str(v) for k, v in (section.get("env") or config.env).items()})


def shrink_command(command: list, options: dict[str, str]) -> list[str]:
    """`command` with the value after each option named in `options` replaced."""
    shrunk = [str(arg) for arg in command]
    for position in range(len(shrunk) - 1):
        if shrunk[position] in options:
            shrunk[position + 1] = options[shrunk[position]]
    return shrunk


@dataclasses.dataclass
class Run:
    """Where one run keeps its things (all under OUT), and the carry folder it reads (may be absent)."""
    out: pathlib.Path
    carry: pathlib.Path | None = None

    @property
    def work(self) -> pathlib.Path:
        return self.out / "work"

    @property
    def pieces(self) -> pathlib.Path:
        return self.out / "pieces"

    @property
    def logs(self) -> pathlib.Path:
        return self.out / "logs"

    @property
    def origin_file(self) -> pathlib.Path:
        return self.work / ".origin.json"  # folder -> the pack it was last made or restored from


def fill(text: str, values: dict[str, str]) -> str:
    try:
        return str(text).format(**values)
    except KeyError as error:
        raise SpeedrunError(f"unknown template {error} in {text!r}; known: {sorted(values)}") from None


def template_values(run: Run, config: Config, step: Step, device: str) -> dict[str, str]:
    return {"work": str(run.work.resolve()), "device": device, "jobs": str(os.cpu_count() or 1),
            "train_minutes": f"{max(float(step.budget_minutes) - config.reserve_minutes, 0.1):g}",
            "budget_seconds": f"{float(step.budget_minutes) * 60:g}", "repo": str(REPO),
            "tts": str((run.out / "tts").resolve()),
            "carry": str(run.carry.resolve()) if run.carry is not None else str(run.out / "no-carry")}


def read_indexes(run: Run, config: Config) -> dict[str, dict]:
    """step name -> its pack index (done or partial), for the packs present in OUT/pieces."""
    found = {}
    for step in config.steps:
        if pieces.index_path(run.pieces, step.name).is_file():
            found[step.name] = pieces.read_index(run.pieces, step.name)
    return found


def done_record(run: Run, config: Config, step: Step) -> dict | None:
    """The record of a step that need not run again here, or None.

    A packed step is done when its pack's index says so (the pack is complete and restorable anywhere). A step
    with `pack: false` is done only where its folders are, as this run made them: elsewhere it runs again.
    """
    if step.pack:
        if not pieces.index_path(run.pieces, step.name).is_file():
            return None
        record = pieces.read_index(run.pieces, step.name)["record"]
        return record if record.get("status") == "done" else None
    path = record_path(run, step.name)
    record = json.loads(path.read_text()) if path.is_file() else {}
    origin = json.loads(run.origin_file.read_text()) if run.origin_file.is_file() else {}
    made_here = all(origin.get(folder, "").startswith("local:") and (run.work / folder).is_dir()
                    for folder in step.produces)  # by this step or a later one that went on with it
    return record if record.get("status") == "done" and made_here else None


def pack_identity(index: dict) -> str:
    return f"{index['name']}:{index['pieces'][0]['sha256']}" if index["pieces"] else index["name"]


def index_only(run: Run, index: dict) -> bool:
    """An index without a single one of its pieces: the step is done, and its folders are not wanted here.

    Why: a run moved to a machine that only goes on from, say, stage 1 needs stage 1's pieces, not the LM's or the
    ASR's; their indexes alone say that those steps are done. A pack with some pieces but not all is a broken
    transfer, and `pieces.unpack` names what is missing."""
    return not any((run.pieces / piece["file"]).is_file() for piece in index["pieces"])


def restore(run: Run, config: Config, indexes: dict[str, dict]) -> list[str]:
    """Unpack, for each produced folder, the newest pack that holds it, unless the folder already came from it
    (or only the pack's index is here: `index_only`)."""
    origin = json.loads(run.origin_file.read_text()) if run.origin_file.is_file() else {}
    newest = {}
    for step in config.steps:  # config order: a later step's pack of the same folder wins
        if step.name in indexes:
            for folder in step.produces:
                newest[folder] = indexes[step.name]
    restored, skipped = [], []
    for folder, index in newest.items():
        if origin.get(folder) == pack_identity(index):
            continue
        if index_only(run, index):
            if index["name"] not in skipped:
                skipped.append(index["name"])
            continue
        if index["name"] not in restored:
            pieces.unpack(run.pieces, index["name"], run.work)
            restored.append(index["name"])
        for packed in index["folders"]:
            origin[packed] = pack_identity(index)
    if skipped:
        print(f"speedrun: done elsewhere, only their indexes are here (folders not restored): {', '.join(skipped)}",
              flush=True)
    if restored:
        run.work.mkdir(parents=True, exist_ok=True)
        run.origin_file.write_text(json.dumps(origin, indent=1))
    return restored


def audio_hours(manifest: pathlib.Path, tasks: list[str] | None) -> float:
    """Hours of audio in a manifest's `duration` column (rows of `tasks` only, when given)."""
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if rows and "duration" not in rows[0]:
        raise SpeedrunError(f"{manifest}: no duration column; throughput needs one (src/data_prep.py writes it).")
    return sum(float(row["duration"]) for row in rows if not tasks or row.get("task") in tasks) / 3600.0


def epochs_logged(log: pathlib.Path) -> int:
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if EPOCH_LINE.match(line))


def throughput(step: Step, values: dict[str, str], epochs_before: int, seconds: float) -> dict | None:
    """Hours of audio trained per GPU-minute of the step (epochs it logged x manifest hours / step minutes).

    The step's whole wall time is the denominator (start-up, validation and test included), so this is a lower
    bound on the training loop's own rate.
    """
    if not step.throughput:
        return None
    log = pathlib.Path(fill(step.throughput["log"], values))
    manifest = pathlib.Path(fill(step.throughput["manifest"], values))
    epochs = epochs_logged(log) - epochs_before
    hours_per_epoch = audio_hours(manifest, step.throughput.get("tasks")) if manifest.is_file() else 0.0
    trained = epochs * hours_per_epoch
    significant = lambda value: float(f"{value:.6g}")  # noqa: E731 - tiny CPU runs give tiny figures
    return {"epochs": epochs, "audio_hours_per_epoch": significant(hours_per_epoch),
            "audio_hours": significant(trained), "audio_hours_per_gpu_minute": significant(trained / (seconds / 60))}


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


class ForkedChild:
    """A step run in a fork of this process, which has imported the config's `preload` modules once.

    Why: on a CPU test machine each step's interpreter spends most of its time importing torch, SpeechBrain and
    transformers; a fork starts with them imported. The child runs the step's script or `-m` module as
    `__main__` with its own argv, environment and session, exactly as the interpreter would, and exits with its
    status. Only for CPU runs: a process that has touched CUDA must not fork (the GPU config has no preload).
    Offers what `run_command` uses of `subprocess.Popen`: pid, stdout, wait(timeout), returncode.
    """

    def __init__(self, argv: list[str], env: dict[str, str]):
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            os.close(read_end)
            self._become_step(argv, env, write_end)
        os.close(write_end)
        self.stdout = os.fdopen(read_end, "r", errors="replace")
        self.returncode = None
        self._ended = threading.Event()
        threading.Thread(target=self._reap, daemon=True).start()

    @staticmethod
    def _become_step(argv: list[str], env: dict[str, str], output_fd: int) -> None:
        import runpy
        import traceback
        status = 1
        try:
            os.setsid()
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.chdir(REPO)
            os.environ.clear()
            os.environ.update(env)
            sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            if "torch" in sys.modules and env.get("OMP_NUM_THREADS", "").isdigit():  # read at import, long ago
                sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            arguments = argv[1:]
            if arguments[0] == "-m":
                sys.argv = [arguments[1], *arguments[2:]]
                runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = arguments
                sys.path.insert(0, str((REPO / arguments[0]).parent))
                runpy.run_path(str(REPO / arguments[0]), run_name="__main__")
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 - a step's crash is reported as the interpreter would
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _reap(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._ended.set()

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.returncode


def start_child(argv: list[str], env: dict[str, str], forked: bool):
    if forked:
        return ForkedChild(argv, env)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)


def run_command(argv: list[str], env: dict[str, str], log_path: pathlib.Path, limit_seconds: float,
                started: float, forked: bool = False) -> tuple[int, bool]:
    """Run one step's command: output to the log and (progress bars dropped) to the console, with elapsed time.

    At `limit_seconds` the process group gets SIGTERM (recipes save a checkpoint and exit), then SIGKILL after
    GRACE_SECONDS. Returns (exit status, cut off at the limit).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        child = start_child(argv, env, forked)

        def copy_output():
            for line in child.stdout:
                log.write(line)
                if not PROGRESS_LINE.search(line):
                    print(f"  [{clock(time.monotonic() - started)}] {line.rstrip()}", flush=True)

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        cut_off = False
        try:
            child.wait(timeout=limit_seconds)
        except subprocess.TimeoutExpired:
            cut_off = True
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        except KeyboardInterrupt:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()
            raise
        reader.join()
    return child.returncode, cut_off


def execute(run: Run, config: Config, step: Step, values: dict[str, str], env: dict[str, str]) -> tuple[int, bool]:
    """The step's own work: a folder copied, or its command run under its budget; (exit status, cut off)."""
    if step.fresh:
        for folder in step.produces:
            shutil.rmtree(run.work / folder, ignore_errors=True)
    if step.copy is not None:
        target = run.work / step.produces[0]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(REPO / step.copy, target)
        return 0, False
    argv = [sys.executable, *(fill(arg, values) for arg in step.run)]
    return run_command(argv, env, run.logs / f"{step.name}.log", float(step.budget_minutes) * 60,
                       time.monotonic(), forked=bool(config.preload) and not values["device"].startswith("cuda"))


def folder_mib(run: Run, step: Step) -> float | None:
    if not all((run.work / folder).is_dir() for folder in step.produces):
        return None
    return sum(path.stat().st_size for folder in step.produces for path in (run.work / folder).rglob("*")
               if path.is_file()) / 2**20


def remember_origin(run: Run, folders: list[str], identity: str) -> None:
    origin = json.loads(run.origin_file.read_text()) if run.origin_file.is_file() else {}
    origin.update(dict.fromkeys(folders, identity))
    run.origin_file.write_text(json.dumps(origin, indent=1))


def pack_step(run: Run, config: Config, step: Step, record: dict) -> None:
    """Pack what the step produced (or, for `pack: false`, note that this machine made it); sets pack_seconds."""
    present = [folder for folder in step.produces if (run.work / folder).is_dir()]
    if record["status"] != "done" and not present:
        record["status"] = "failed"  # nothing to resume from
    if not present:
        return
    if not step.pack:
        remember_origin(run, present, f"local:{step.name}")
        return
    started = time.monotonic()
    record["pack_seconds"] = None  # the index cannot hold its own packing time: the record file has it
    exclude = step.exclude + (step.exclude_when_done if record["status"] == "done" else [])
    index = pieces.pack(run.work, present, run.pieces, step.name, record=record, exclude=tuple(exclude),
                        piece_bytes=int(config.piece_mib * 2**20))
    remember_origin(run, present, pack_identity(index))
    record["pack_seconds"] = round(time.monotonic() - started, 1)


def run_step(run: Run, config: Config, step: Step, device: str, env: dict[str, str], mamba_ssm: bool = False) -> dict:
    """Run one step and pack what it produced; returns its record (status done, partial or failed).

    `mamba_ssm`: whether the carried mamba-ssm build was on the step's path (recorded beside its throughput).
    """
    values = template_values(run, config, step, device)
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.monotonic()
    before = epochs_logged(pathlib.Path(fill(step.throughput["log"], values))) if step.throughput else 0
    returncode, cut_off = execute(run, config, step, values, env)
    seconds = round(time.monotonic() - started, 2)  # the rate below divides by this same recorded figure
    record = {"step": step.name, "status": "done" if returncode in step.ok_returncodes and not cut_off else "partial",
              "seconds": seconds, "started": started_utc, "budget_minutes": float(step.budget_minutes),
              "host": socket.gethostname(), "device": device, "returncode": returncode, "cut_off": cut_off,
              "mamba_ssm": mamba_ssm}
    if record["status"] == "done":
        record["throughput"] = throughput(step, values, before, seconds)
        size = folder_mib(run, step)
        record["mib"] = None if size is None else round(size, 2)
        if step.max_mib is not None and (size is None or size > step.max_mib):
            record["status"] = "partial"
            record["error"] = f"produced {size} MiB, over max_mib {step.max_mib}"
    pack_step(run, config, step, record)
    record_path(run, step.name).write_text(json.dumps(record, indent=1))
    if (run.logs / f"{step.name}.log").is_file():  # the log travels beside the pieces (its last 4 MiB)
        text = (run.logs / f"{step.name}.log").read_bytes()[-4 * 2**20:]
        (run.pieces / f"{step.name}.log").write_bytes(text)
    return record


def record_path(run: Run, name: str) -> pathlib.Path:
    """The newest record of a step (done, partial or failed), beside the pieces; a pack's index holds its own."""
    return run.pieces / f"{name}.record.json"


def summary(run: Run, config: Config) -> str:
    """Markdown table of every step: status, budget, measured time, packing time, host, throughput."""
    lines = ["| step | status | budget (min) | time | pack | host | audio h / GPU-min |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    for step in config.steps:
        path = record_path(run, step.name)
        record = json.loads(path.read_text()) if path.is_file() else {}
        seconds = record.get("seconds")
        packing = record.get("pack_seconds")
        total += (seconds or 0.0) + (packing or 0.0)
        rate = (record.get("throughput") or {}).get("audio_hours_per_gpu_minute")
        lines.append(f"| {step.name} | {record.get('status', 'not run')} | {float(step.budget_minutes):g} | "
                     f"{clock(seconds) if seconds is not None else '-'} | "
                     f"{clock(packing) if packing is not None else '-'} | {record.get('host', '-')} | "
                     f"{rate if rate is not None else '-'}{' (mamba-ssm)' if rate and record.get('mamba_ssm') else ''} |")
    lines.append(f"| total (time + pack) | | {sum(float(s.budget_minutes) for s in config.steps):g} | "
                 f"{clock(total)} | | | |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.speedrun", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=pathlib.Path, required=True, help="e.g. hparams/speedrun/h200.yaml")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="run folder (work/, pieces/, logs/)")
    parser.add_argument("--carry", type=pathlib.Path, default=REPO / ".carry",
                        help="folder with debs/*.deb and wheels/*.whl (scripts/fetch_carry.sh); may be absent")
    parser.add_argument("--device", help="default: the config's")
    parser.add_argument("--call-minutes", type=float,
                        help="stop before a step whose budget would end past this many minutes from now")
    parser.add_argument("--stop-after", help="stop after this step")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every step of the config at toy size on this CPU (its rehearsal: section), to "
                             "find faults before a GPU lease; use its own --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        if args.rehearse:
            config = rehearsal(config)
        run = Run(args.out, carry=args.carry)
        if args.stop_after and args.stop_after not in {step.name for step in config.steps}:
            raise SpeedrunError(f"--stop-after {args.stop_after}: no such step in {args.config}")
        return speedrun(config, run, args)
    except (SpeedrunError, pieces.PiecesError, carry_setup.CarryError) as error:
        print(f"speedrun: error: {error}", file=sys.stderr)
        return 2


def claim_run_kind(run: Run, kind: str) -> None:
    """Mark OUT as a real run's or a rehearsal's, and refuse to mix them.

    Why: a rehearsal's toy steps are packed as done like any others; in a real run's folder they would be taken
    for the real steps and skipped. The mark is kept beside the pieces, so it travels with them."""
    mark = run.pieces / "run_kind.json"
    if mark.is_file():
        found = json.loads(mark.read_text()).get("kind")
        if found != kind:
            raise SpeedrunError(f"{run.out} holds a {found}'s steps; this is a {kind}. Give it its own --out "
                                f"(a rehearsal's toy steps must never stand in for a real run's).")
        return
    mark.write_text(json.dumps({"kind": kind}) + "\n")


def fit_to_call(step: Step, elapsed: float, call_minutes: float | None, header: str) -> Step | None:
    """The step as it can run in what is left of --call-minutes: whole, shortened (down to its
    min_budget_minutes), or None (stop here; the same command goes on later)."""
    if call_minutes is None:
        return step
    left = call_minutes - elapsed / 60
    if float(step.budget_minutes) <= left:
        return step
    if step.min_budget_minutes is not None and float(step.min_budget_minutes) <= left:
        # minutes, rounded down to tenths so that the step ends inside the call, never under its minimum (<= left)
        shorter = max(math.floor(left * 10) / 10, float(step.min_budget_minutes))
        print(f"{header}: shortened from {step.budget_minutes} to {shorter:g} min to end within --call-minutes "
              f"{call_minutes:g}", flush=True)
        return dataclasses.replace(step, budget_minutes=shorter)
    print(f"{header}: its {step.budget_minutes} min would end past --call-minutes {call_minutes:g}; "
          "stopping here (run the same command again to go on)", flush=True)
    return None


def speedrun(config: Config, run: Run, args: argparse.Namespace) -> int:
    call_started = time.monotonic()
    device = args.device or config.device
    run.pieces.mkdir(parents=True, exist_ok=True)
    claim_run_kind(run, "rehearsal" if args.rehearse else "run")  # before anything else is written there
    for folder in (run.work, run.logs):
        folder.mkdir(parents=True, exist_ok=True)
    restored = restore(run, config, read_indexes(run, config))
    if restored:
        print(f"speedrun: restored from pieces: {', '.join(restored)}", flush=True)
    base_env = {**os.environ, **config.env, "PYTHONUNBUFFERED": "1"}
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base_env.get("PYTHONPATH")]))

    def prepare_carry():  # a rehearsal keeps its own packages: the carried wheels are for the GPU machine's Python
        return carry_setup.prepare(args.carry, run.out / "tts", run.out / "site", base_env,
                                   with_wheels=not args.rehearse)

    plain_env, tools_env = prepare_carry()
    if any(step.tools for step in config.steps):
        carry_setup.check_programs(tools_env)
    kernels = args.carry / "mamba_site.txz" if args.carry is not None else None
    # CPU runs: steps fork from here with these imported (ForkedChild). Never on CUDA: a forked child cannot
    # initialise CUDA once an imported module has touched it, so there each step is a fresh interpreter.
    for module in config.preload if not device.startswith("cuda") else []:
        importlib.import_module(module)
    exit_status = 0
    for number, step in enumerate(config.steps, 1):
        record = done_record(run, config, step)
        header = f"speedrun: step {number}/{len(config.steps)} {step.name}"
        if record is not None:
            print(f"{header}: done earlier ({clock(record['seconds'])} on {record['host']}), skipped", flush=True)
            continue
        elapsed = time.monotonic() - call_started
        step = fit_to_call(step, elapsed, args.call_minutes, header)
        if step is None:
            break
        if kernels is not None and kernels.is_file():  # it may arrive after the start (a second lent-machine call)
            plain_env, tools_env = prepare_carry()
        print(f"{header}: started (budget {step.budget_minutes} min; call elapsed {clock(elapsed)})", flush=True)
        record = run_step(run, config, step, device, tools_env if step.tools else plain_env,
                          mamba_ssm=kernels is not None and kernels.is_file())
        print(f"{header}: {record['status']} in {clock(record['seconds'])}"
              f"{'; ' + record['error'] if record.get('error') else ''}"
              f"{' (cut off at its budget)' if record['cut_off'] else ''}; call elapsed "
              f"{clock(time.monotonic() - call_started)}", flush=True)
        if record["status"] != "done":
            print(f"speedrun: step {step.name} did not finish: see {run.logs / (step.name + '.log')}. Its folders "
                  "are packed as partial; the same command resumes it.", file=sys.stderr, flush=True)
            exit_status = 1
            break
        if args.stop_after == step.name:
            print(f"speedrun: stopping after {step.name} (--stop-after)", flush=True)
            break
    table = summary(run, config)
    (run.pieces / "summary.md").write_text(table + "\n")
    print(table, flush=True)
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
