"""src.train_curves reads what SpeechBrain's FileTrainLogger writes, and plots it."""
import pathlib

import pytest
from speechbrain.utils.train_logger import FileTrainLogger

from src import train_curves


def write_log(path: pathlib.Path) -> pathlib.Path:
    """A log as a resumed training writes it: epochs 1-2, a test pass, epoch 3 appended, another test pass."""
    logger = FileTrainLogger(str(path))
    logger.log_stats({"epoch": 1, "lr": 8.64e-4, "steps": 216}, train_stats={"loss": 109.0},
                     valid_stats={"loss": 82.29, "ACC": 0.596, "WER_ctc": 96.43})
    logger.log_stats({"epoch": 2, "lr": 1.73e-3, "steps": 432}, train_stats={"loss": 75.18},
                     valid_stats={"loss": 71.75, "ACC": 0.691, "WER_ctc": 102.0})
    logger.log_stats({"Epoch loaded": 2}, test_stats={"loss": 70.1, "ACC": 0.7, "WER_ctc": 99.5})
    with open(path, "a") as stream:
        stream.write("some other line: not an epoch\n")
    FileTrainLogger(str(path)).log_stats({"epoch": 3, "lr": 1.76e-3, "steps": 648}, train_stats={"loss": 68.57},
                                         valid_stats={"loss": 66.65, "ACC": 0.726, "WER_ctc": 94.42})
    FileTrainLogger(str(path)).log_stats({"Epoch loaded": 3}, test_stats={"loss": 65.0, "ACC": 0.73, "WER_ctc": 93.0})
    return path


def test_reads_speechbrain_lines_epoch_by_epoch(tmp_path):
    epochs = train_curves.read_log(write_log(tmp_path / "train_log.txt"))
    assert [entry.epoch for entry in epochs] == [1, 2, 2, 3, 3]
    assert epochs[0].figures["train"] == {"loss": 109.0}
    assert epochs[1].figures["valid"] == {"loss": 71.75, "ACC": 0.691, "WER_ctc": 102.0}
    assert epochs[1].figures[""] == {"lr": 1.73e-3, "steps": 432}
    assert epochs[2].figures == {"test": {"loss": 70.1, "ACC": 0.7, "WER_ctc": 99.5}}
    assert train_curves.series(epochs, "valid", "WER_ctc") == ([1, 2, 3], [96.43, 102.0, 94.42])
    assert train_curves.series(epochs, "test", "WER_ctc") == ([2, 3], [99.5, 93.0])
    assert train_curves.metrics_of(epochs) == ["loss", "ACC", "WER_ctc"]


def test_the_command_plots_and_names_the_last_test(tmp_path, capsys):
    (tmp_path / "asr").mkdir()
    log = write_log(tmp_path / "asr" / "train_log.txt")
    out = tmp_path / "plots" / "asr.png"
    assert train_curves.main([str(log), "--out", str(out), "--metric", "loss", "WER_ctc"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "asr: 3 epochs; last (epoch 3): test loss 65, test ACC 0.73, test WER_ctc 93" in printed


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("speechbrain.core - Info: not a train log\n", "no 'epoch: N, ...'"),
])
def test_bad_logs_are_named(tmp_path, capsys, content, message):
    log = tmp_path / "train_log.txt"
    if content is not None:
        log.write_text(content)
    assert train_curves.main([str(log), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert str(log) in error and message in error
    assert not (tmp_path / "x.png").exists()


def test_an_unknown_metric_is_refused_with_the_known_ones(tmp_path, capsys):
    log = write_log(tmp_path / "train_log.txt")
    assert train_curves.main([str(log), "--out", str(tmp_path / "x.png"), "--metric", "WER"]) == 2
    assert "no such metric in the logs: WER; they hold: ACC, WER_ctc, loss" in capsys.readouterr().err
