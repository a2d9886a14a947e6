"""Bit-exact resume (issue #17): a stage stopped by SIGTERM, or killed with SIGKILL, in the middle of an epoch and
run again ends with exactly the weights of a run that was never interrupted (tiny stage 3 on CPU, every part
trained so that dropout, speed perturbation, shuffling and the instruction draws all matter)."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from src.brain import DuplexBrain
from src.stages import run_stage
from tests.training_corpus import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # five short CPU trainings and one subprocess: about a minute on 2 cores
STEPS_PER_EPOCH = 5  # the 5 utterances of tests/training_corpus.py at batch size 1


def stage3_argv(corpus, out, *extra, epochs=2):
    return [str(ROOT / "hparams" / "tiny" / "train_stage3.yaml"), f"--data_folder={corpus}",
            f"--output_folder={out}", "--device=cpu", "--noprogressbar", f"--number_of_epochs={epochs}",
            "--init_from={folder: null}", "--trained_modules=[cnn, encoder, adapter, lm, normalizer]",
            "--frozen_modules=[]", "--test_max_new_tokens=0",
            "--train_dataloader_opts={batch_size: 1, shuffle: True}", *extra]


def final_weights(out):
    """model.ckpt of the epoch-2 checkpoint, and the validation loss recorded for each epoch."""
    folders = sorted((out / "save").glob("CKPT+*"))
    metas = {folder: (folder / "CKPT.yaml").read_text() for folder in folders}
    last = [folder for folder, meta in metas.items() if "\nepoch: 2\n" in meta]
    assert len(last) == 1, metas
    return torch.load(last[0] / "model.ckpt", weights_only=True), sorted(metas.values())


def assert_same_weights(resumed, uninterrupted):
    different = [key for key in uninterrupted if not torch.equal(resumed[key], uninterrupted[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus")


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_stage(DuplexBrain, stage3_argv(corpus, out))
    return final_weights(out)[0]


def signalling_brain(at_step, signum):
    """A Brain that sends itself `signum` just before optimiser step `at_step` runs."""

    class SignalsItself(DuplexBrain):
        def on_fit_batch_start(self, batch, should_step):
            if self.optimizer_step == at_step - 1 and not self.stop.requested:
                os.kill(os.getpid(), signum)
            super().on_fit_batch_start(batch, should_step)

    return SignalsItself


@pytest.mark.parametrize("at_step", [3, STEPS_PER_EPOCH])  # mid-epoch, and the epoch's last step
def test_sigterm_saves_stops_cleanly_and_resumes_bit_exactly(corpus, uninterrupted, tmp_path, at_step, capfd):
    """No intra-epoch interval at all: the signal alone makes the checkpoint, after the step it interrupted."""
    argv = stage3_argv(corpus, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_stage(signalling_brain(at_step, signal.SIGTERM), argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    output = capfd.readouterr()
    assert "Stopped by SIGTERM after saving a checkpoint" in output.out + output.err
    assert "KeyboardInterrupt" not in output.out + output.err and "TrainingStopped" not in output.out + output.err
    saved = list((tmp_path / "save").glob("CKPT+*"))
    assert len(saved) == 1 and "brain_intra_epoch_ckpt: true" in (saved[0] / "CKPT.yaml").read_text()
    assert f"optimizer_step: {at_step}" in (saved[0] / "brain.ckpt").read_text()

    brain = run_stage(DuplexBrain, argv)
    assert brain.optimizer_step == 2 * STEPS_PER_EPOCH
    assert_same_weights(final_weights(tmp_path)[0], uninterrupted)


def self_signalling_run(condition: str, signum: str) -> str:
    """Source of a stage run that sends itself `signum` before the optimiser step at which `condition` holds."""
    return textwrap.dedent(f"""
        import os, signal, sys
        from src.brain import DuplexBrain
        from src.stages import run_stage

        class SignalledRun(DuplexBrain):
            def on_fit_batch_start(self, batch, should_step):
                if {condition}:
                    os.kill(os.getpid(), signal.{signum})
                super().on_fit_batch_start(batch, should_step)

        run_stage(SignalledRun, sys.argv[1:])
    """)


KILLED = self_signalling_run("self.optimizer_step == 7", "SIGKILL")  # no handler runs: like the OOM killer


def test_sigkill_in_the_middle_of_an_epoch_then_resume_is_bit_exact(corpus, uninterrupted, tmp_path):
    argv = stage3_argv(corpus, tmp_path, "--ckpt_interval_steps=1")
    done = subprocess.run([sys.executable, "-c", KILLED, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    brain = run_stage(DuplexBrain, argv)
    assert brain.optimizer_step == 2 * STEPS_PER_EPOCH
    assert_same_weights(final_weights(tmp_path)[0], uninterrupted)


INTERRUPTED = self_signalling_run("self.optimizer_step == 1 and not self.stop.requested", "SIGINT")  # Ctrl-C


def test_ctrl_c_exits_with_one_line_and_no_traceback(corpus, tmp_path):
    argv = stage3_argv(corpus, tmp_path, epochs=1)
    done = subprocess.run([sys.executable, "-c", INTERRUPTED, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "Stopped by SIGINT after saving a checkpoint; run the same command again to resume." in output
    saved = list((tmp_path / "save").glob("CKPT+*"))
    assert len(saved) == 1 and "optimizer_step: 2" in (saved[0] / "brain.ckpt").read_text()
