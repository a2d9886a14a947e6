"""Run control pieces (issue #17): intra-epoch checkpoints on by default, our command-line switches, the stop
signal handler, instruction draws that need no saved state, and hand-off errors that name the right folder."""
import os
import re
import signal

import pytest
from speechbrain.utils.run_opts import RunOptions

from modules.model import TINY_YAML, load_model_hparams
from src.handoff import load_previous_stage
from src.run_control import GracefulStop, StopNow
from src.stages import DEFAULT_CKPT_INTERVAL_MINUTES, PromptDraws, split_run_flags, with_checkpoint_interval


def options(**given):
    return RunOptions(**given, overridden_args=set(given))


def test_intra_epoch_checkpoints_are_on_by_default():
    """Before: SpeechBrain's default (0: never), although the README promised resuming where it stopped."""
    chosen = with_checkpoint_interval(options(), {})
    assert chosen.ckpt_interval_minutes == DEFAULT_CKPT_INTERVAL_MINUTES > 0 and chosen.ckpt_interval_steps == 0
    assert "ckpt_interval_minutes" in chosen.overridden_args  # so the Brain takes it over any YAML default


def test_an_interval_given_anywhere_wins_over_the_default():
    assert with_checkpoint_interval(options(ckpt_interval_minutes=0), {}).ckpt_interval_minutes == 0  # off
    by_steps = with_checkpoint_interval(options(ckpt_interval_steps=5), {"ckpt_interval_minutes": 30})
    assert (by_steps.ckpt_interval_minutes, by_steps.ckpt_interval_steps) == (0, 5)  # SB refuses both at once
    from_yaml = with_checkpoint_interval(options(), {"ckpt_interval_minutes": 30})
    assert "ckpt_interval_minutes" not in from_yaml.overridden_args  # the Brain reads the YAML's 30


def test_force_and_skip_bad_rows_are_switches_taken_before_speechbrain_parses():
    rest, flags = split_run_flags(["a.yaml", "--force", "--data_folder=x", "--skip_bad_rows"])
    assert rest == ["a.yaml", "--data_folder=x"] and flags == {"force": True, "skip_bad_rows": True}
    assert split_run_flags(["a.yaml", "--force=False"])[1]["force"] is False
    with pytest.raises(SystemExit, match="--force takes no value"):
        split_run_flags(["--force=yes"])


def test_a_signal_outside_training_stops_at_once_and_a_second_one_too():
    stop = GracefulStop()
    with stop.installed():
        with pytest.raises(StopNow):  # data checks, test: nothing to save
            os.kill(os.getpid(), signal.SIGTERM)
        stop.in_training = True
        os.kill(os.getpid(), signal.SIGINT)  # first one in training: noted, the step goes on
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is not stop.handle  # handlers given back


def test_instruction_draws_depend_on_seed_epoch_and_id_only():
    """No generator state to checkpoint, and DataLoader workers draw what one process would."""
    draws = PromptDraws(seed=3407, train=True)
    first = [draws.rng(f"u{i}").random() for i in range(5)]
    assert [draws.rng(f"u{i}").random() for i in reversed(range(5))] == first[::-1]  # order does not matter
    draws.epoch = 2
    assert [draws.rng(f"u{i}").random() for i in range(5)] != first  # a new draw each epoch
    fixed = PromptDraws(seed=1, train=False)
    assert fixed.rng("u1").random() == PromptDraws(seed=2, train=False).rng("u1").random()


def test_previous_stage_not_found_names_the_folder_level_to_pass(tmp_path):
    net = load_model_hparams(TINY_YAML, {"num_state_tokens": 1})
    (tmp_path / "stage1" / "save").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        load_previous_stage({"folder": str(tmp_path / "stage1" / "save" / "save")}, net["model"], net["normalizer"])
    message = str(error.value)
    assert "--previous_output_folder=<the previous stage's output folder>, the folder that holds save/" in message
    assert re.search(r"does not exist", message)
