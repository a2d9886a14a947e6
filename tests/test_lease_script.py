"""scripts/lease_speedrun.sh: the speedrun detached on a lent machine, followed, and its pieces brought back.

The driver runs a two-step chain of one-line Python steps; the script is called as the lent machine's calls
would call it (start, then follow, then collect into OUT)."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
WRITE = "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); "


def lease(tmp_path, *args, wait=120, **extra):
    env = {**os.environ, "RUN": str(tmp_path / "run"), "CONFIG": str(tmp_path / "chain.yaml"),
           "CARRY": str(tmp_path / "carry"), "WAIT": str(wait), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "NEURAL": str(tmp_path / "not-carried.tar"), "KERNELS": str(tmp_path / "not-carried.txz"), **extra}
    done = subprocess.run(["bash", "scripts/lease_speedrun.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def write_chain(tmp_path, seconds_of_second_step=0):
    steps = [{"name": "first", "budget_minutes": 1,
              "run": ["-c", WRITE + "(p / 'a.txt').write_text('A'); (p / 'train_log.txt').write_text('epoch: 1')",
                                                               "{work}/first"], "produces": ["first"]},
             {"name": "second", "budget_minutes": 1,
              "run": ["-c", WRITE + f"time.sleep({seconds_of_second_step}); (p / 'b.txt').write_text('B')",
                      "{work}/second"], "produces": ["second"]}]
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"total_budget_minutes": 60, "device": "cpu",
                                                         "steps": steps}))
    (tmp_path / "carry" / "debs").mkdir(parents=True)
    (tmp_path / "out").mkdir()


def test_start_follows_a_detached_run_to_its_end_and_collect_brings_the_pieces_back(tmp_path):
    write_chain(tmp_path, seconds_of_second_step=6)
    code, output = lease(tmp_path, "start", wait=1)  # the call ends while the run goes on
    assert code == 0 and "still running" in output, output
    code, output = lease(tmp_path, "follow")
    assert code == 0 and "the run has ended, exit status 0" in output and "second: done" in output, output
    assert "error" not in output.lower(), output
    code, output = lease(tmp_path, "collect", "first", "second")
    assert code == 0, output
    brought = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert brought == ["first.pieces.json", "first.tgz.000", "logs.tgz", "second.pieces.json", "second.tgz.000",
                       "summary.md"]
    with tarfile.open(tmp_path / "out" / "logs.tgz") as logs:
        names = logs.getnames()
        assert "driver.log" in names and "work/first/train_log.txt" in names
        assert any(name.startswith("logs/") for name in names)  # each step's own log
        assert logs.extractfile("work/first/train_log.txt").read() == b"epoch: 1"


def test_collect_refuses_a_step_without_a_complete_pack_and_more_than_a_call_brings_back(tmp_path):
    write_chain(tmp_path)
    assert lease(tmp_path, "start")[0] == 0
    code, output = lease(tmp_path, "collect", "third")
    assert code == 2 and "no complete pack of step third" in output
    pieces = tmp_path / "run" / "pieces"
    for number in range(1, 9):  # a pack of 9 pieces: over the 8 files a call brings back
        (pieces / f"first.tgz.{number:03d}").write_bytes(b"x")
    code, output = lease(tmp_path, "collect", "first")
    assert code == 2 and "collect fewer steps, or a piece range" in output
    assert not any((tmp_path / "out").iterdir())


def test_start_without_the_carry_folder_says_what_to_do(tmp_path):
    write_chain(tmp_path)
    (tmp_path / "carry" / "debs").rmdir()
    code, output = lease(tmp_path, "start")
    assert code == 2 and "scripts/fetch_carry.sh" in output


def test_stop_after_ends_the_run_after_that_step(tmp_path):
    write_chain(tmp_path)
    code, output = lease(tmp_path, "start", STOP_AFTER="first")
    assert code == 0 and "stopping after first" in output and "exit status 0" in output, output
    assert (tmp_path / "run" / "pieces" / "first.pieces.json").is_file()
    assert not (tmp_path / "run" / "pieces" / "second.pieces.json").exists()
    code, output = lease(tmp_path, "collect", "index:first")
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.pieces.json", "logs.tgz",
                                                                                 "summary.md"]


def test_the_logs_wait_for_a_call_of_their_own_when_a_collect_is_full(tmp_path):
    write_chain(tmp_path)
    assert lease(tmp_path, "start")[0] == 0
    for number in range(1, 6):  # index + 6 pieces + summary: 8 files, no room for the logs
        (tmp_path / "run" / "pieces" / f"first.tgz.{number:03d}").write_bytes(b"x")
    code, output = lease(tmp_path, "collect", "first")
    assert code == 0 and "logs.tgz left out" in output and "'collect logs' brings it" in output, output
    assert "logs.tgz" not in {path.name for path in (tmp_path / "out").iterdir()}
    code, output = lease(tmp_path, "collect", "first", "logs")
    assert code == 2 and "no room for logs.tgz in this call" in output
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").mkdir()
    code, output = lease(tmp_path, "collect", "logs")
    assert code == 0 and sorted(path.name for path in (tmp_path / "out").iterdir()) == ["logs.tgz", "summary.md"]


def test_neural_hands_the_pack_over_to_a_running_driver(tmp_path):
    """The pack carried by a later call lands whole in CARRY/neural/, where a step that starts after it finds it."""
    look = ("import pathlib, sys, time; time.sleep(4); p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); "
            "(p / 'seen.txt').write_text(str(pathlib.Path(sys.argv[2]).is_file()))")
    steps = [{"name": "first", "budget_minutes": 1, "run": ["-c", look, "{work}/first", "{carry}/neural/neural.tar"],
              "produces": ["first"]}]
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"total_budget_minutes": 60, "device": "cpu", "steps": steps}))
    (tmp_path / "carry" / "debs").mkdir(parents=True)
    pack = tmp_path / "made-ahead" / "neural.tar"
    pack.parent.mkdir()
    pack.write_bytes(b"a packed corpus")
    assert lease(tmp_path, "start", wait=0)[0] == 0
    code, output = lease(tmp_path, "neural", NEURAL=str(pack))
    assert code == 0 and "handed over" in output and "exit status 0" in output, output
    assert (tmp_path / "carry" / "neural" / "neural.tar").read_bytes() == b"a packed corpus"
    assert (tmp_path / "run" / "work" / "first" / "seen.txt").read_text() == "True"
    code, output = lease(tmp_path, "neural", NEURAL=str(tmp_path / "absent.tar"))
    assert code == 2 and "absent.tar missing" in output


def test_a_run_stopped_on_one_machine_goes_on_from_bundled_pieces_on_the_next(tmp_path):
    """Lease 1 stops after `first`; its pieces, dealt into bundles small enough for one call each, are received
    on a fresh machine (a new run folder) call by call, and the run there restores `first` and does `second` only."""
    from src import pieces
    write_chain(tmp_path)
    code, output = lease(tmp_path, "start", STOP_AFTER="first")
    assert code == 0 and "stopping after first" in output, output
    brought = tmp_path / "brought"
    brought.mkdir()
    for path in (tmp_path / "run" / "pieces").glob("first*"):
        (brought / path.name).write_bytes(path.read_bytes())
    largest = max(path.stat().st_size for path in brought.iterdir())
    bundles = pieces.bundle(brought, tmp_path / "bundles", max_bytes=largest)  # the piece alone fills one
    assert len(bundles) >= 2 and bundles[0].name == "a"
    assert sorted(p.name for folder in bundles for p in folder.iterdir()) == sorted(p.name for p in brought.iterdir())
    assert all(sum(p.stat().st_size for p in folder.iterdir()) <= largest for folder in bundles)
    fresh = {"RUN": str(tmp_path / "run2")}
    for folder in bundles:
        code, output = lease(tmp_path, "receive", str(folder), **fresh)
        assert code == 0 and "the run restores them" in output, output
    code, output = lease(tmp_path, "start", **fresh)
    assert code == 0 and "restored from pieces: first" in output and "second: done" in output, output
    assert "first: started" not in output
    code, output = lease(tmp_path, "receive", str(tmp_path / "not-carried"), **fresh)
    assert code == 2 and "name it in the call's carry" in output


def test_a_failed_run_shows_the_end_of_its_log_and_call_minutes_reaches_the_driver(tmp_path):
    steps = [{"name": "first", "budget_minutes": 1, "produces": ["first"],
              "run": ["-c", "import sys; print('the detail line of the failure'); sys.exit(3)"]}]
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"total_budget_minutes": 60, "device": "cpu", "steps": steps}))
    (tmp_path / "carry" / "debs").mkdir(parents=True)
    code, output = lease(tmp_path, "start")
    assert code == 0 and "the log's last lines" in output and "the detail line of the failure" in output, output
    code, output = lease(tmp_path, "start", CALL_MINUTES="0.5", RUN=str(tmp_path / "run-short"))
    assert code == 0 and "would end past --call-minutes 0.5" in output, output


def test_start_hands_over_what_earlier_calls_carried_before_the_first_step_looks(tmp_path):
    look = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); "
            "(p / 'seen.txt').write_text(' '.join(str(pathlib.Path(a).is_file()) for a in sys.argv[2:]))")
    steps = [{"name": "first", "budget_minutes": 1, "produces": ["first"],
              "run": ["-c", look, "{work}/first", "{carry}/neural/neural.tar", "{carry}/mamba_site.txz"]}]
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"total_budget_minutes": 60, "device": "cpu", "steps": steps}))
    (tmp_path / "carry" / "debs").mkdir(parents=True)
    (tmp_path / "neural.tar").write_bytes(b"a packed corpus")
    with tarfile.open(tmp_path / "kernels.txz", "w:xz") as packed:  # the driver unpacks it onto PYTHONPATH
        (tmp_path / "stand_in_kernel.py").write_text("")
        packed.add(tmp_path / "stand_in_kernel.py", arcname="stand_in_kernel.py")
    code, output = lease(tmp_path, "start", NEURAL=str(tmp_path / "neural.tar"), KERNELS=str(tmp_path / "kernels.txz"))
    assert code == 0 and "mamba-ssm handed over" in output and "neural-voice corpus handed over" in output, output
    assert (tmp_path / "run" / "work" / "first" / "seen.txt").read_text() == "True True"


def test_collect_brings_a_large_pack_back_over_calls_as_piece_ranges(tmp_path):
    write_chain(tmp_path)
    assert lease(tmp_path, "start")[0] == 0
    pieces = tmp_path / "run" / "pieces"
    for number in range(1, 9):  # 9 pieces: more files than one call brings back
        (pieces / f"first.tgz.{number:03d}").write_bytes(b"x")
    brought = set()
    for part in ("first:0-4", "first:5-8"):
        code, output = lease(tmp_path, "collect", part)
        assert code == 0, output
        brought |= {path.name for path in (tmp_path / "out").iterdir()}
    assert brought == {"first.pieces.json", "logs.tgz", "summary.md", *(f"first.tgz.{n:03d}" for n in range(9))}
    for bad, said in (("first:7-9", "no piece first.tgz.009"), ("first:two", "a piece range is FIRST-LAST")):
        code, output = lease(tmp_path, "collect", bad)
        assert code == 2 and said in output, output


def test_lease_tree_hides_the_embedded_model_from_what_a_call_sends_and_restores_it(tmp_path):
    """scripts/lease_tree.sh: `hide` leaves example/model/CKPT+* on disk but neither tracked nor untracked-not-
    ignored (what a lent-machine call sends); `restore` gives back the same index and exclude file."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "lease_tree.sh", repo / "scripts")
    (repo / "example" / "model" / "CKPT+1").mkdir(parents=True)
    (repo / "example" / "model" / "CKPT+1" / "model.ckpt").write_bytes(b"weights")
    (repo / "example" / "model" / "README.md").write_text("the model\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    sent = lambda: sorted(git("ls-files").split() + git("ls-files", "--others", "--exclude-standard").split())
    before, exclude = sent(), (repo / ".git" / "info" / "exclude").read_text()
    assert "example/model/CKPT+1/model.ckpt" in before
    subprocess.run(["bash", str(repo / "scripts" / "lease_tree.sh"), "hide"], check=True, capture_output=True)
    assert "example/model/CKPT+1/model.ckpt" not in sent() and "example/model/README.md" in sent()
    assert (repo / "example" / "model" / "CKPT+1" / "model.ckpt").read_bytes() == b"weights"
    subprocess.run(["bash", str(repo / "scripts" / "lease_tree.sh"), "restore"], check=True, capture_output=True)
    assert sent() == before and git("status", "--porcelain") == ""
    assert (repo / ".git" / "info" / "exclude").read_text() == exclude
