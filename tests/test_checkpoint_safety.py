"""Crash-safe checkpoints (issue #17): a save killed half-way leaves the previous checkpoint usable, a damaged
checkpoint is named with what to delete, and inference serves the checkpoints the stage's test averaged."""
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from modules.checkpoint import (TESTED_FILE, DamagedCheckpointError, IncompleteCheckpointError, SafeCheckpointer,
                                find_checkpoints,
                                load_reference_checkpoint, record_tested_checkpoints, save_reference_checkpoint)
from modules.model import load_model_hparams

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A child process saves one good checkpoint, then starts a second save whose model file is half written when the
# process is killed with SIGKILL (no handler, no cleanup: what a power cut or the OOM killer does).
KILLED_MID_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from modules.checkpoint import SafeCheckpointer
    from speechbrain.utils.checkpoints import Checkpointer
    save_dir, kind = sys.argv[1], sys.argv[2]
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)

    def half_then_kill(obj, path):
        buffer = io.BytesIO()
        torch.save(obj.state_dict(), buffer)
        data = buffer.getvalue()
        with open(path, "wb") as stream:
            stream.write(data[: len(data) // 2])
            stream.flush()
            os.fsync(stream.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    checkpointer = (SafeCheckpointer if kind == "safe" else Checkpointer)(save_dir)
    checkpointer.add_recoverable("model", layer)
    checkpointer.save_checkpoint(meta={"n": 1})
    with torch.no_grad():
        layer.weight.fill_(2.0)
    checkpointer = (SafeCheckpointer if kind == "safe" else Checkpointer)(save_dir)
    checkpointer.add_recoverable("model", layer, custom_save_hook=half_then_kill)
    checkpointer.save_checkpoint(meta={"n": 2})
""")


def kill_during_second_save(save_dir, kind):
    done = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(save_dir), kind], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr  # really killed, inside the second save


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_usable(tmp_path):
    kill_during_second_save(tmp_path, "safe")
    layer = torch.nn.Linear(4, 4)
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"model": layer})
    recovered = checkpointer.recover_if_possible()
    assert recovered.meta["n"] == 1 and torch.equal(layer.weight, torch.ones(4, 4))
    assert [p.name for p in tmp_path.iterdir()] == [recovered.path.name]  # the half-written folder is cleaned up


def test_speechbrain_alone_leaves_a_damaged_newest_checkpoint_that_is_named(tmp_path):
    """What the issue saw (plain Checkpointer, or a checkpoint damaged on disk): the newest CKPT folder has a
    truncated model.ckpt. Loading it names the folder and says what to delete, instead of PytorchStreamReader."""
    kill_during_second_save(tmp_path, "plain")
    newest = max(Checkpointer(tmp_path).list_checkpoints(), key=lambda c: c.meta["unixtime"])
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(DamagedCheckpointError) as error:
        SafeCheckpointer(tmp_path, recoverables={"model": layer}).recover_if_possible()
    message = str(error.value)
    assert str(newest.path / "model.ckpt") in message and f"Delete the folder {newest.path}" in message
    assert "resume from the previous checkpoint" in message


def test_safe_saves_keep_speechbrains_layout(tmp_path):
    layer = torch.nn.Linear(2, 2)
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"model": layer})
    checkpointer.save_and_keep_only(meta={"loss": 2.0}, min_keys=["loss"], num_to_keep=1)
    checkpointer.save_and_keep_only(meta={"loss": 1.0}, min_keys=["loss"], num_to_keep=1)
    found = Checkpointer(tmp_path).list_checkpoints()  # SpeechBrain itself reads the folders
    assert [c.meta["loss"] for c in found] == [1.0]
    assert sorted(p.name for p in found[0].path.iterdir()) == ["CKPT.yaml", "model.ckpt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_damaged_reference_checkpoint_names_the_folder_to_delete(tmp_path):
    net = load_model_hparams(overrides={"num_state_tokens": 1})
    folder = save_reference_checkpoint(net["model"], tmp_path, normalizer=net["normalizer"])
    data = (folder / "model.ckpt").read_bytes()
    (folder / "model.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"Delete the folder {folder}")):
        load_reference_checkpoint(load_model_hparams(overrides={"num_state_tokens": 1})["model"], tmp_path)


def test_inference_serves_the_checkpoints_the_test_averaged(tmp_path):
    """Three checkpoints; the test used the middle one: inference loads that one, not the average of three."""
    nets = [load_model_hparams(overrides={"seed": 20 + k, "num_state_tokens": 3}) for k in range(3)]
    folders = [save_reference_checkpoint(n["model"], tmp_path, normalizer=n["normalizer"]) for n in nets]
    record_tested_checkpoints(tmp_path, [folders[1]], folders[1], "min PPL, 1 best")
    target = load_model_hparams(overrides={"seed": 1, "num_state_tokens": 3})
    used = load_reference_checkpoint(target["model"], tmp_path, normalizer=target["normalizer"], use_tested=True)
    assert used == [folders[1]]
    expected = nets[1]["model"].state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in target["model"].state_dict().items())


def test_inference_says_when_it_cannot_serve_the_tested_set(tmp_path, caplog):
    nets = [load_model_hparams(overrides={"seed": 30 + k, "num_state_tokens": 3}) for k in range(2)]
    for n in nets:
        save_reference_checkpoint(n["model"], tmp_path, normalizer=n["normalizer"])
    target = load_model_hparams(overrides={"num_state_tokens": 3})
    with caplog.at_level("WARNING"):
        used = load_reference_checkpoint(target["model"], tmp_path, use_tested=True)
    assert len(used) == 2 and f"no {TESTED_FILE}" in caplog.text and "not necessarily the model" in caplog.text
    record_tested_checkpoints(tmp_path, [tmp_path / "CKPT+gone"], tmp_path / "CKPT+gone", "latest")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_reference_checkpoint(target["model"], tmp_path, use_tested=True) == find_checkpoints(tmp_path)
    assert "CKPT+gone" in caplog.text and "NOT the model the test scored" in caplog.text


def test_output_folder_instead_of_save_folder_says_which_folder_to_pass(tmp_path):
    (tmp_path / "save").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"output folder: pass its save folder, {tmp_path / 'save'}")):
        find_checkpoints(tmp_path)


def test_every_training_yaml_saves_through_the_safe_checkpointer():
    """A crash during a save must never leave a half-written checkpoint that the next run loads: every recipe
    that declares a checkpointer uses modules.checkpoint.SafeCheckpointer."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "hparams"
    declared = {path: line for path in root.rglob("*.yaml") for line in path.read_text().splitlines()
                if line.startswith("checkpointer:")}
    assert len(declared) >= 15
    unsafe = {str(path.relative_to(root)): line for path, line in declared.items()
              if "modules.checkpoint.SafeCheckpointer" not in line}
    assert unsafe == {}


def _model_and_optimizer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    return layer, optimizer


def _save_trained(folder):
    """One Adam step, then a checkpoint of model + optimizer; returns the model's weights."""
    layer, optimizer = _model_and_optimizer()
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    checkpointer = SafeCheckpointer(folder, recoverables={"model": layer, "optimizer": optimizer})
    saved = checkpointer.save_checkpoint(meta={"epoch": 3})
    return layer.weight.detach().clone(), saved.path


def test_a_checkpoint_packed_without_its_optimizer_resumes_with_a_fresh_one(tmp_path, caplog):
    """A finished speedrun step's pack leaves optimizer.ckpt out; going on from it (or testing it again) restores
    the model and starts the optimizer over, and the log says so. SpeechBrain alone refuses it."""
    weights, folder = _save_trained(tmp_path)
    (folder / "optimizer.ckpt").unlink()
    layer, optimizer = _model_and_optimizer()
    plain = Checkpointer(tmp_path)
    plain.add_recoverable("model", layer)
    plain.add_recoverable("optimizer", optimizer)  # as speechbrain's Brain adds it
    with pytest.raises(RuntimeError, match="missing a load path for optimizer"):
        plain.recover_if_possible()
    layer, optimizer = _model_and_optimizer()
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"model": layer, "optimizer": optimizer})
    with caplog.at_level("WARNING", logger="modules.checkpoint"):
        recovered = checkpointer.recover_if_possible()
    assert recovered.meta["epoch"] == 3 and torch.equal(layer.weight, weights)
    assert optimizer.state_dict()["state"] == {}  # fresh: no Adam moments
    assert f"{folder}: has no optimizer.ckpt" in caplog.text and "the optimizer starts fresh" in caplog.text
    assert not checkpointer.optional_recoverables.get("optimizer")  # only for that load


def test_a_checkpoint_with_its_optimizer_restores_it(tmp_path):
    _, folder = _save_trained(tmp_path)
    layer, optimizer = _model_and_optimizer()
    SafeCheckpointer(tmp_path, recoverables={"model": layer, "optimizer": optimizer}).recover_if_possible()
    assert set(optimizer.state_dict()["state"]) == {0, 1}  # weight and bias moments back


def test_a_checkpoint_without_its_model_file_is_named(tmp_path):
    _, folder = _save_trained(tmp_path)
    (folder / "model.ckpt").unlink()
    layer, optimizer = _model_and_optimizer()
    with pytest.raises(IncompleteCheckpointError) as error:
        SafeCheckpointer(tmp_path, recoverables={"model": layer, "optimizer": optimizer}).recover_if_possible()
    message = str(error.value)
    assert f"{folder}: has no model.ckpt, which this run restores" in message and f"delete {folder}" in message
