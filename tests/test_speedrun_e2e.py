"""The speedrun end to end on the CPU (hparams/speedrun/tiny.yaml): the committed sample corpus, text pool, both
pre-trainings, stages 1 to 4, export, evaluation. The run is stopped after stage 1 and a fresh folder seeded only
with its pieces finishes it (what a second lent machine does); then the fp16 export is checked against the
float32 save folder it came from."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from scripts.export_demo_model import greedy_outputs
from src import pieces

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "hparams" / "speedrun" / "tiny.yaml"
TINY_YAML = ROOT / "duplex" / "duplex_tiny.yaml"
pytestmark = pytest.mark.slow  # nine short recipe runs: a few minutes on 2 loaded cores


def drive(out, *extra):
    done = subprocess.run([sys.executable, "-m", "src.speedrun", "--config", str(CONFIG), "--out", str(out),
                           "--carry", str(out / "no-carry"), "--device", "cpu", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(first call's output, second call's output, the second run's folder)."""
    base = tmp_path_factory.mktemp("speedrun")
    first = drive(base / "first", "--stop-after", "stage1")
    shutil.copytree(base / "first" / "pieces", base / "second" / "pieces")  # nothing else travels
    second = drive(base / "second")
    return first, second, base / "second"


def test_stops_after_stage1_and_a_fresh_folder_with_the_pieces_finishes(finished):
    first, second, run = finished
    assert "stopping after stage1" in first and "stage2: started" not in first
    assert "restored from pieces: corpus, text, lm, asr, stage1" in second
    for step in ("corpus", "text", "lm", "asr", "stage1"):
        assert f"{step}: done earlier" in second
    for step in ("stage2", "stage3", "stage4", "export", "evaluate"):
        assert f"{step}: done in" in second
    every_piece = list((run / "pieces").glob("*.tgz.*"))
    assert every_piece and all(piece.stat().st_size <= 15 * 2**20 for piece in every_piece)
    summary = (run / "pieces" / "summary.md").read_text()
    assert "| stage4 | done |" in summary and "| total (time + pack) |" in summary


def test_every_stage_records_its_audio_throughput(finished):
    run = finished[2]
    for step in ("asr", "stage1", "stage2", "stage3", "stage4"):
        record = pieces.read_index(run / "pieces", step)["record"]
        rate = record["throughput"]
        assert rate["epochs"] == 1 and rate["audio_hours_per_epoch"] > 0, (step, rate)
        assert rate["audio_hours_per_gpu_minute"] == pytest.approx(
            rate["audio_hours"] / (record["seconds"] / 60), rel=0.01)


def test_export_is_fp16_within_its_limit(finished):
    run = finished[2]
    record = pieces.read_index(run / "pieces", "export")["record"]
    assert record["status"] == "done" and record["mib"] <= 48
    (checkpoint,) = (run / "work" / "export" / "model").glob("CKPT+*")
    state = torch.load(checkpoint / "model.ckpt", weights_only=True)
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float16}


def test_evaluation_report_is_written(finished):
    """python -m src.evaluate on the fp16 export: WER, state scores and answers on the test manifest, and the
    sample's conversation scripts played through the duplex engine."""
    report = (finished[2] / "work" / "report")
    text = json.dumps(json.loads((report / "report.json").read_text())).lower()
    for measure in ("wer", "f1", "answer", "latency"):
        assert measure in text, measure
    assert (report / "report.md").is_file() and len(list(report.glob("confusion-*.png"))) == 2


def test_fp16_export_gives_the_greedy_outputs_of_the_float32_save_folder(finished):
    """The stored fp16 model and the float32 stage-4 save folder it was made from decide the same state token
    and write the same greedy reply on the sample's test and valid audio."""
    run = finished[2]
    wavs = sorted((run / "work" / "corpus").glob("test/**/*.flac")) + sorted(
        (run / "work" / "corpus").glob("valid/**/*.flac"))
    assert wavs
    exported = greedy_outputs(TINY_YAML, run / "work" / "export" / "model", wavs, max_new_tokens=8)
    original = greedy_outputs(TINY_YAML, run / "work" / "stage4" / "save", wavs, max_new_tokens=8)
    assert exported == original
    check = json.loads((run / "work" / "export" / "model" / "export_check.json").read_text())
    assert check["files"] == 4 and check["same_state_and_reply"] == 4 and check["differing"] == []  # the export step's own check
