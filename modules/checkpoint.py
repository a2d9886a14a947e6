"""Read and write checkpoints in the reference's SpeechBrain layout (spec §4).

A save folder holds `CKPT+<date>+<time>+NN/` folders, each with `model.ckpt` (the torch state dict of the
ModuleList [cnn, encoder, adapter, lm]), `normalizer.ckpt` (global feature statistics) and `CKPT.yaml`.

Loading averages the `model.ckpt` of every CKPT folder found, as the reference does before each stage and at
inference, then loads strictly into `DuplexMambaModel`. Two keys are dropped by name: the reference's ConMamba
stores positional-encoding buffers it never uses (`1.positional_encoding.inv_freq`, (256,), and
`1.positional_encoding_decoder.pe`, (1, 2500, 512)); our encoder has no such buffers. Writing recreates them
(`modules.conmamba.reference_positional_buffers`) so the reference code can load our checkpoints strictly.

Averaging is out of place. SpeechBrain's `average_state_dicts` adds in place, and in a reference `model.ckpt` the
tied `3.model.backbone.embeddings.weight` and `3.model.lm_head.weight` share one storage, so every later
checkpoint is added twice to that matrix; here each key is summed once.

The normaliser statistics are not averaged: they come from the newest CKPT folder (its running statistics
already cover all the data seen). Unlike the reference, inference loads them.

Inference serves what the stage's test scored: the test writes `tested_checkpoints.yaml` into the save folder
(which CKPT folders it averaged, and which one gave the normaliser), and `load_reference_checkpoint(...,
use_tested=True)` loads exactly those; a save folder without that record is averaged whole, with a warning.

Writes are crash-safe: every checkpoint is written into a hidden `.partial-CKPT+...` folder and renamed to its
`CKPT+...` name once complete (`SafeCheckpointer` for training, `save_reference_checkpoint` for exports), so a
crash during a save leaves the previous checkpoints as they were. A file that still cannot be read (written by an
older version, or damaged on disk) is reported with its folder and what to delete.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
import warnings

import torch
import yaml
from speechbrain.utils.checkpoints import Checkpoint, Checkpointer
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from modules.conmamba import reference_positional_buffers
from modules.lm import resize_vocabulary

MODEL_FILE = "model.ckpt"
NORMALIZER_FILE = "normalizer.ckpt"
META_FILE = "CKPT.yaml"
DROPPED_BUFFERS = ("1.positional_encoding.inv_freq", "1.positional_encoding_decoder.pe")
EMBEDDING_KEY = "3.model.backbone.embeddings.weight"
LM_HEAD_KEY = "3.model.lm_head.weight"
MAX_LISTED = 12
TESTED_FILE = "tested_checkpoints.yaml"  # in a save folder: the CKPT folders its stage's test averaged
PARTIAL_PREFIX = ".partial-"  # a checkpoint being written; renamed to CKPT+... when complete

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists every difference."""


class DamagedCheckpointError(CheckpointMismatchError):
    """A checkpoint file that cannot be read; the message names the CKPT folder and what to delete."""


class IncompleteCheckpointError(DamagedCheckpointError):
    """A checkpoint without a file this run must restore (not an optimizer's: that one starts fresh)."""


def damaged_message(folder: pathlib.Path, file_name: str, error: Exception) -> str:
    """Which checkpoint is damaged, why, and how to get going again (the folders around it stay usable)."""
    folder = pathlib.Path(folder)
    return (f"{folder / file_name}: damaged checkpoint, cannot be read ({type(error).__name__}: {error}). "
            f"It was probably cut short by a crash while it was written. Delete the folder {folder} (rm -r) to "
            f"resume from the previous checkpoint in {folder.parent}, or delete {folder.parent} to start the "
            "stage over.")


def find_checkpoints(path: str | pathlib.Path) -> list[pathlib.Path]:
    """CKPT folders to use: `path` itself if it holds model.ckpt, else every `path/CKPT+*` with one (sorted,
    oldest first, since the names carry the save time)."""
    path = pathlib.Path(path)
    if (path / MODEL_FILE).is_file():
        return [path]
    folders = sorted(p for p in path.glob("CKPT+*") if (p / MODEL_FILE).is_file())
    if not folders:
        raise FileNotFoundError(f"{path}: no checkpoint found; expected {MODEL_FILE} in this folder or in "
                                f"CKPT+*/ sub-folders. {_folder_level_hint(path)}")
    return folders


def _folder_level_hint(path: pathlib.Path) -> str:
    """Say which folder to pass: a stage writes <output_folder>/save/CKPT+*/model.ckpt."""
    if (path / "save").is_dir():
        return f"This looks like a stage's output folder: pass its save folder, {path / 'save'}."
    if not path.exists():
        return (f"{path} does not exist. Pass a stage's save folder, <output_folder>/save (the folder that holds "
                "the CKPT+* folders), or one CKPT+* folder.")
    return ("Pass a stage's save folder, <output_folder>/save (the folder that holds the CKPT+* folders), or one "
            "CKPT+* folder.")


def served_checkpoints(path: str | pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path]:
    """(CKPT folders to average, folder whose normaliser to load) for inference from `path`.

    A save folder whose stage was tested names the folders its test averaged (`tested_checkpoints.yaml`): those
    are served, so the served model is the tested one. Without that record (an older or untested folder), or
    when a listed folder is gone, every checkpoint is averaged and a warning says so.
    """
    path = pathlib.Path(path)
    folders = find_checkpoints(path)
    record = path / TESTED_FILE
    if not record.is_file():
        if len(folders) > 1:
            logger.warning("%s: no %s (the stage was not tested, or by an older version): serving the average of "
                           "all %d checkpoints, which is not necessarily the model the test scored.",
                           path, TESTED_FILE, len(folders))
        return folders, folders[-1]
    tested = yaml.safe_load(record.read_text()) or {}
    chosen = [path / name for name in tested.get("checkpoints", [])]
    missing = [folder.name for folder in chosen if not (folder / MODEL_FILE).is_file()]
    if missing or not chosen:
        logger.warning("%s: the tested checkpoint(s) %s are gone: serving the average of all %d checkpoints, NOT "
                       "the model the test scored.", path, missing or "(none listed)", len(folders))
        return folders, folders[-1]
    logger.info("Serving the %d checkpoint(s) the stage's test averaged: %s", len(chosen),
                ", ".join(folder.name for folder in chosen))
    return chosen, path / tested.get("normalizer_from", chosen[0].name)


def record_tested_checkpoints(save_folder: str | pathlib.Path, folders, normalizer_from, selection: str) -> None:
    """Write `tested_checkpoints.yaml` (atomically) so that inference serves what the test scored."""
    save_folder = pathlib.Path(save_folder)
    record = {"checkpoints": [pathlib.Path(f).name for f in folders],
              "normalizer_from": pathlib.Path(normalizer_from).name, "selection": selection}
    _atomic_write_text(save_folder / TESTED_FILE, yaml.safe_dump(record))


def read_model_state(path) -> dict[str, torch.Tensor]:
    """The averaged `model.ckpt` state of every checkpoint under `path` (one checkpoint: read as is), or of the
    given list of CKPT folders."""
    folders = find_checkpoints(path) if isinstance(path, (str, pathlib.Path)) else list(path)
    if len(folders) == 1:
        return _load(folders[0] / MODEL_FILE)
    return average_state_dicts(_load(folder / MODEL_FILE) for folder in folders)


def average_state_dicts(state_dicts) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with equal keys, summed out of place (tied tensors counted once)."""
    total, count = None, 0
    with torch.no_grad():
        for state in state_dicts:
            if total is None:
                total = {key: value.clone() for key, value in state.items()}
            else:
                _check_same_keys(total, state)
                for key, value in state.items():
                    total[key] = total[key] + value
            count += 1
    if total is None:
        raise ValueError("no state dicts to average")
    return {key: value / count if value.is_floating_point() else value for key, value in total.items()}


def load_reference_checkpoint(model, path, normalizer=None, grow_vocabulary=False, prefixes=None, seed=0,
                              use_tested=False):
    """Load (and average) the checkpoints under `path` into `model`; returns the CKPT folders used.

    Arguments
    ---------
    model : DuplexMambaModel (may live on the meta device: tensors are then assigned, not copied).
    path : a CKPT folder or a save folder of CKPT+* folders.
    normalizer : a SpeechBrain InputNormalization to restore from the newest folder's normalizer.ckpt.
    grow_vocabulary : accept a checkpoint with fewer vocabulary rows (stage 2 -> stage 3) and append
        N(0, 0.01^2) rows, drawn once for the tied matrix with `seed`.
    prefixes : only keys starting with one of these are compared and loaded (e.g. the encoder part of a
        Mamba-ASR checkpoint: ("0.", "1.custom_src_module.", "1.encoder.")); None = every key, strictly.
    use_tested : inference: only the CKPT folders the stage's test averaged (`served_checkpoints`); otherwise
        every CKPT folder (the stage hand-off, spec §3) and the newest folder's normaliser.
    """
    if use_tested:
        folders, normalizer_folder = served_checkpoints(path)
    else:
        folders = find_checkpoints(path)
        normalizer_folder = folders[-1]
    state = read_model_state(folders)
    for key in DROPPED_BUFFERS:
        state.pop(key, None)
    _check_tied(state, path)
    lm = model.lm.model
    grow_to = None
    rows = _rows(state)
    if grow_vocabulary and rows is not None and rows < lm.config.vocab_size:
        grow_to = lm.config.vocab_size
        resize_vocabulary(lm, rows)
    expected = _select(model.state_dict(), prefixes)
    state = _select(state, prefixes)
    check_state_dict(expected, state, source=str(path))
    state = _cast_like(state, expected)
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=prefixes is None, assign=on_meta)
    if on_meta:
        lm.lm_head.weight = lm.get_input_embeddings().weight  # assign replaced the tied parameter twice
    if grow_to is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resize_vocabulary(lm, grow_to)
    if normalizer is not None:
        load_normalizer(normalizer, normalizer_folder)
    return folders


def load_normalizer(normalizer, folder: str | pathlib.Path) -> None:
    """Restore SpeechBrain InputNormalization statistics (count, glob_mean, glob_std) from normalizer.ckpt."""
    file = pathlib.Path(folder) / NORMALIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: normalizer statistics missing; the speech features would not be "
                                f"normalised as in training. Use a checkpoint saved with its normalizer.")
    try:
        normalizer._load(str(file))
    except Exception as error:  # truncated or foreign file: say which checkpoint and what to delete
        raise DamagedCheckpointError(damaged_message(file.parent, NORMALIZER_FILE, error)) from error


def check_state_dict(expected: dict, state: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and mis-shaped keys (and a vocabulary hint)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                 for key in expected if key in state and state[key].shape != expected[key].shape]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: the checkpoint does not fit this model configuration"]
    vocabulary = _vocabulary_hint(expected, state)
    if vocabulary:
        lines.append(f"  vocabulary: {vocabulary}")
    for title, keys in (("missing (model keys absent from the checkpoint)", missing),
                        ("unexpected (checkpoint keys the model does not have)", unexpected),
                        ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:MAX_LISTED]) + (f", ... ({len(keys) - MAX_LISTED} more)"
                                                    if len(keys) > MAX_LISTED else "")
            lines.append(f"  {len(keys)} {title}: {shown}")
    raise CheckpointMismatchError("\n".join(lines))


def save_reference_checkpoint(model, save_dir, normalizer=None, meta=None) -> pathlib.Path:
    """Write `model` (and the normaliser statistics) as a new CKPT+* folder under `save_dir`; returns it.

    The state dict gets the two dead positional buffers back, so the reference code loads it strictly.
    Written into a hidden staging folder first and renamed when complete (crash-safe, see the module docstring).
    """
    folder = _new_checkpoint_folder(pathlib.Path(save_dir))
    staging = folder.with_name(PARTIAL_PREFIX + folder.name)
    folder.rmdir()  # the name is reserved by its staging folder until the rename
    staging.mkdir()
    state = dict(model.state_dict())  # tied embeddings / lm_head share storage: saved once
    buffers = reference_positional_buffers(d_model=model.encoder.d_model)
    state.update({f"1.{name}": tensor for name, tensor in buffers.items()})
    torch.save(state, staging / MODEL_FILE)
    if normalizer is not None:
        normalizer._save(str(staging / NORMALIZER_FILE))
    with open(staging / META_FILE, "w") as stream:
        stream.write("# yamllint disable\n")
        yaml.safe_dump({"end-of-epoch": True, "unixtime": time.time(), **(meta or {})}, stream)
    publish_folder(staging, folder)
    return folder


def publish_folder(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Flush every file of a complete staging folder to disk, then rename it to its final name (atomic)."""
    for file in staging.iterdir():
        _fsync(file)
    _fsync(staging)
    os.rename(staging, final)
    _fsync(final.parent)


def remove_leftovers(save_dir: pathlib.Path) -> list[pathlib.Path]:
    """Remove staging folders left by a crash during a save; returns what was removed."""
    save_dir = pathlib.Path(save_dir)
    if not save_dir.is_dir():
        return []
    leftovers = sorted(p for p in save_dir.iterdir()
                       if p.is_dir() and p.name.startswith(PARTIAL_PREFIX))
    for leftover in leftovers:
        logger.warning("%s: removing an incomplete checkpoint left by a crash during a save", leftover)
        shutil.rmtree(leftover)
    return leftovers


class SafeCheckpointer(Checkpointer):
    """SpeechBrain's Checkpointer with crash-safe saves and readable errors for damaged checkpoints.

    Why: SpeechBrain writes CKPT.yaml first and then each file straight into the final CKPT+* folder, so a crash
    during a save leaves a folder that looks complete, with a truncated model.ckpt; the next start "recovers" it
    and dies with "PytorchStreamReader failed", naming neither the file nor the fix. Here the files go to a
    hidden `.partial-CKPT+...` folder that is renamed to CKPT+... only once every file is flushed (older
    checkpoints are deleted only after that), and a checkpoint that still cannot be loaded raises
    `DamagedCheckpointError` naming the folder to delete.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._staging = False

    def _new_checkpoint_dirpath(self):
        final = super()._new_checkpoint_dirpath()
        return final.with_name(PARTIAL_PREFIX + final.name) if self._staging else final

    def _custom_checkpoint_dirpath(self, name):
        final = super()._custom_checkpoint_dirpath(name)
        return final.with_name(PARTIAL_PREFIX + final.name) if self._staging else final

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):  # noqa: B006 (SB's)
        self._staging = True
        try:
            staged = super().save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name,
                                             verbosity=logging.DEBUG)
        finally:
            self._staging = False
        ddp_barrier()  # every process has written its files into the staging folder
        if not if_main_process():
            return None
        final = staged.path.with_name(staged.path.name[len(PARTIAL_PREFIX):])
        publish_folder(staged.path, final)
        logger.log(verbosity, "Saved an %s checkpoint in %s", "end-of-epoch" if end_of_epoch else "intra-epoch",
                   final)
        return Checkpoint(final, staged.meta, {key: final / path.name for key, path in staged.paramfiles.items()})

    def recover_if_possible(self, *args, **kwargs):
        if if_main_process():
            remove_leftovers(self.checkpoints_dir)
        ddp_barrier()
        return super().recover_if_possible(*args, **kwargs)

    def _call_load_hooks(self, checkpoint):
        fresh = self._optimizers_to_start_fresh(checkpoint)
        saved_optional = {name: self.optional_recoverables.get(name, False) for name in fresh}
        self.optional_recoverables.update({name: True for name in fresh})
        try:
            with warnings.catch_warnings():  # ours below says it once, with the reason
                warnings.filterwarnings("ignore", message=".*marked as optional", category=UserWarning)
                super()._call_load_hooks(checkpoint)
        except Exception as error:
            culprit = _unreadable_file(checkpoint)
            raise DamagedCheckpointError(damaged_message(checkpoint.path, culprit, error)) from error
        finally:
            self.optional_recoverables.update(saved_optional)

    def _optimizers_to_start_fresh(self, checkpoint) -> list[str]:
        """The optimizers to start fresh because `checkpoint` has no file for them; raises for any other gap.

        Why: a finished step's pack leaves optimizer.ckpt out (the next stage takes the weights only), and going on
        from such a checkpoint, or testing it again, is legitimate: the model, epoch counter and schedule are
        restored and only the optimizer's moments start over, which the log says. A missing model file is not
        legitimate, and SpeechBrain's "missing a load path" does not say which file or why."""
        missing = [name for name in self.recoverables if name not in checkpoint.paramfiles
                   and "dataloader" not in name and not self.optional_recoverables.get(name, False)]
        if self.allow_partial_load or not missing:
            return []
        fresh = [name for name in missing if isinstance(self.recoverables[name], torch.optim.Optimizer)]
        absent = [name for name in missing if name not in fresh]
        if absent:
            files = ", ".join(f"{name}.ckpt" for name in absent)
            raise IncompleteCheckpointError(
                f"{checkpoint.path}: has no {files}, which this run restores. It was saved by a different "
                f"configuration, or packed without it. Point the run at a checkpoint that has it, or delete "
                f"{checkpoint.path} (rm -r) to resume from the previous checkpoint in {checkpoint.path.parent}.")
        logger.warning("%s: has no %s (a pack without the optimizer, e.g. a finished speedrun step's); the model, "
                       "counters and schedule are restored, and the optimizer starts fresh", checkpoint.path,
                       ", ".join(f"{name}.ckpt" for name in fresh))
        return fresh

    @staticmethod
    def _construct_checkpoint_objects(checkpoint_dirs):
        checkpoints = []
        for folder in checkpoint_dirs:
            try:
                checkpoints.extend(Checkpointer._construct_checkpoint_objects([folder]))
            except Exception as error:  # unreadable CKPT.yaml
                raise DamagedCheckpointError(damaged_message(folder, META_FILE, error)) from error
        return checkpoints


def _unreadable_file(checkpoint) -> str:
    """The name of the first file of `checkpoint` that is empty or a torch archive torch cannot open."""
    for path in sorted(checkpoint.paramfiles.values()):
        with open(path, "rb") as stream:
            head = stream.read(2)
        if not head:
            return path.name
        if head == b"PK":  # torch.save's zip archive (SpeechBrain's own small files are YAML/text)
            try:
                torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - any failure marks the culprit
                return path.name
    return "(one of its files)"


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write a small file through a temporary sibling and a rename, so readers see the old or the new text."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    _fsync(temporary)
    os.replace(temporary, path)


def _vocabulary_hint(expected: dict, state: dict) -> str | None:
    if EMBEDDING_KEY not in expected or EMBEDDING_KEY not in state:
        return None
    have, need = state[EMBEDDING_KEY].shape[0], expected[EMBEDDING_KEY].shape[0]
    if have == need:
        return None
    stage = {50278: "a stage-1/2 checkpoint (1 added token)", 50280: "a stage-3/4 checkpoint (3 added tokens)"}
    fix = ("set num_state_tokens: 1 to use it as is, or load with grow_vocabulary=True to start stage 3"
           if have < need else "set num_state_tokens: 3 (stages 3-4 and inference)")
    return (f"checkpoint has {have} rows but this configuration needs {need}: this is "
            f"{stage.get(have, 'a checkpoint for another vocabulary')}; {fix}")


def _check_tied(state: dict, path) -> None:
    """The LM ties its embeddings and head; a checkpoint where they differ cannot be loaded faithfully."""
    if EMBEDDING_KEY in state and LM_HEAD_KEY in state:
        emb, head = state[EMBEDDING_KEY], state[LM_HEAD_KEY]
        if emb.shape == head.shape and not torch.equal(emb, head):
            raise CheckpointMismatchError(f"{path}: {EMBEDDING_KEY} and {LM_HEAD_KEY} differ, but the LM ties "
                                          f"them (one matrix); this checkpoint is not from a tied Mamba LM")


def _check_same_keys(total: dict, state: dict) -> None:
    if set(total) != set(state):
        raise CheckpointMismatchError("cannot average checkpoints with different keys: "
                                      f"{sorted(set(total) ^ set(state))[:MAX_LISTED]}")


def _rows(state: dict):
    return state[EMBEDDING_KEY].shape[0] if EMBEDDING_KEY in state else None


def _select(state: dict, prefixes) -> dict:
    if prefixes is None:
        return dict(state)
    return {key: value for key, value in state.items() if key.startswith(tuple(prefixes))}


def _cast_like(state: dict, expected: dict) -> dict:
    """Floating tensors in the model's dtype: a checkpoint stored in fp16/bf16 to be small (example/model/)
    loads into an fp32 model, also on the meta device, where tensors are assigned rather than copied."""
    return {key: value.to(expected[key].dtype)
            if value.is_floating_point() and expected[key].is_floating_point() else value
            for key, value in state.items()}


def _load(file: pathlib.Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # corrupt or foreign file: say which one and what to delete
        raise DamagedCheckpointError(damaged_message(file.parent, file.name, error)) from error


def _new_checkpoint_folder(save_dir: pathlib.Path) -> pathlib.Path:
    """SpeechBrain's naming, CKPT+YYYY-MM-DD+HH-MM-SS+NN, NN counting saves within the same second."""
    stamp = time.strftime("%Y-%m-%d+%H-%M-%S")
    for index in range(100):
        folder = save_dir / f"CKPT+{stamp}+{index:02d}"
        if not folder.exists():
            folder.mkdir(parents=True)
            return folder
    raise RuntimeError(f"{save_dir}: more than 100 checkpoints saved within one second")
