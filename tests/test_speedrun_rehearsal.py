"""The rehearsal of the H200 speedrun (`python -m src.speedrun --config hparams/speedrun/h200.yaml --rehearse`):
every step of the real config, with its own YAMLs, model sizes and hand-overs, at toy size on the CPU. It is
what stands between a config fault and a wasted GPU lease, so CI runs it whole."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from src import pieces, speedrun
from tests.test_real_speech import fake_alsa_root

ROOT = pathlib.Path(__file__).resolve().parents[1]
H200 = ROOT / "hparams" / "speedrun" / "h200.yaml"


def write_config(tmp_path, rehearsal_section: str) -> pathlib.Path:
    path = tmp_path / "config.yaml"
    path.write_text("total_budget_minutes: 20\ndevice: cuda:0\nsteps:\n"
                    "  - {name: corpus, budget_minutes: 3, produces: [corpus],\n"
                    "     run: [-m, src.corpus, --hours, '10', --jobs, '{jobs}', --speakers, '240']}\n"
                    "  - {name: lm, budget_minutes: 2, produces: [lm], run: [train_lm.py, lm.yaml]}\n"
                    "  - {name: corpus-copy, budget_minutes: 1, produces: [copy], copy: tests/data/corpus}\n"
                    + rehearsal_section)
    return path


def test_rehearsal_replaces_option_values_appends_arguments_and_sets_cpu_budgets(tmp_path):
    config = speedrun.load_config(write_config(tmp_path, (
        "rehearsal:\n  device: cpu\n  env: {OMP_NUM_THREADS: 2}\n  budget_minutes: 10\n"
        "  options: {--hours: '0.04', --speakers: '24'}\n  append: {lm: [--number_of_epochs=1]}\n")))
    rehearsed = speedrun.rehearsal(config)
    corpus, lm, copy = rehearsed.steps
    assert corpus.run == ["-m", "src.corpus", "--hours", "0.04", "--jobs", "{jobs}", "--speakers", "24"]
    assert lm.run == ["train_lm.py", "lm.yaml", "--number_of_epochs=1"]
    assert copy.run is None and copy.copy == "tests/data/corpus"
    assert [step.budget_minutes for step in rehearsed.steps] == [10, 10, 10]
    assert rehearsed.total_budget_minutes == 30 and rehearsed.device == "cpu"
    assert rehearsed.env == {"OMP_NUM_THREADS": "2"}
    assert config.steps[0].run[3] == "10" and config.device == "cuda:0"  # the config itself is left as it was


@pytest.mark.parametrize("section, message", [
    ("", "no rehearsal section"),
    ("rehearsal:\n  devices: cpu\n", "unknown key 'devices'"),
    ("rehearsal:\n  append: {stage9: [--x]}\n", "no step named 'stage9'"),
])
def test_a_rehearsal_that_cannot_be_made_is_a_readable_error(tmp_path, section, message):
    config = speedrun.load_config(write_config(tmp_path, section))
    with pytest.raises(speedrun.SpeedrunError, match=message):
        speedrun.rehearsal(config)


def carry_with_recordings(tmp_path) -> pathlib.Path:
    """A carry folder as the lease gets it, made here: a .deb with alsa-utils' recordings (stand-ins) for the
    `real` step, and a wheel this machine cannot install, which a rehearsal must leave alone (it runs with the
    developer's own packages; the carried wheels are for the GPU machine's Python)."""
    package = fake_alsa_root(tmp_path / "pkg")
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN" / "control").write_text("Package: fake-alsa-sounds\nVersion: 1.0\nArchitecture: all\n"
                                                "Maintainer: t <t@t>\nDescription: test\n")
    carry = tmp_path / "carry"
    (carry / "debs").mkdir(parents=True)
    (carry / "wheels").mkdir()
    subprocess.run(["dpkg-deb", "--build", str(package), str(carry / "debs" / "fake-alsa-sounds.deb")],
                   check=True, capture_output=True)
    (carry / "wheels" / "cffi-2.1.1-cp312-cp312-manylinux2014_x86_64.whl").write_bytes(b"not for this Python")
    return carry


@pytest.mark.slow  # every step of the H200 config at toy size: about 4 minutes on 2 cores
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build the carried package")
def test_the_h200_config_rehearses_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "src.speedrun", "--config", str(H200), "--rehearse",
                           "--out", str(out), "--carry", str(carry_with_recordings(tmp_path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    config = speedrun.load_config(H200)
    for step in config.steps:
        assert f"{step.name}: done in" in done.stdout, step.name
    for step in ("lm", "asr", "stage1", "stage2", "stage3", "stage4"):
        record = pieces.read_index(out / "pieces", step)["record"]
        assert record["status"] == "done" and record["device"] == "cpu", record
    export = pieces.read_index(out / "pieces", "export")["record"]
    assert 20 < export["mib"] <= 48, export  # the real speedrun model in fp16, under the embedded model's limit
    check = json.loads((out / "work" / "export" / "model" / "export_check.json").read_text())
    assert check["files"] > 0 and check["same_state_token"] == check["files"], check  # fp16 = fp32 greedily
    results = json.loads((out / "work" / "report" / "report.json").read_text())["results"]
    evaluated = {pathlib.Path(name).name: result for name, result in results.items()}
    for name in ("test.csv", "test-engine.csv", "real.csv"):
        assert {"asr", "state", "answer"} <= set(evaluated[name]), name
    for name in ("conversations", "conversations-engine"):
        assert {"slice_state", "answer", "latency_s"} <= set(evaluated[name]), name


def test_a_rehearsal_and_a_real_run_never_share_a_folder(tmp_path):
    """Toy steps packed as done must never be skipped over by a real run in the same folder, nor the reverse."""
    config = write_config(tmp_path, "rehearsal:\n  budget_minutes: 1\n")
    out = tmp_path / "out"
    run = speedrun.Run(out)
    out.mkdir()
    (out / "pieces").mkdir()
    speedrun.claim_run_kind(run, "rehearsal")
    speedrun.claim_run_kind(run, "rehearsal")  # the same kind goes on
    code = speedrun.main(["--config", str(config), "--out", str(out), "--carry", str(tmp_path / "none")])
    assert code == 2  # refused before any step
    assert not (out / "logs").exists() and not (out / "work").exists()  # nothing written past the mark
    other = speedrun.Run(tmp_path / "real")
    (tmp_path / "real" / "pieces").mkdir(parents=True)
    speedrun.claim_run_kind(other, "run")
    with pytest.raises(speedrun.SpeedrunError, match="holds a run's steps; this is a rehearsal"):
        speedrun.claim_run_kind(other, "rehearsal")
