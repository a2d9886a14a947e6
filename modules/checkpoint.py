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
"""
from __future__ import annotations

import pathlib
import time

import torch
import yaml

from modules.conmamba import reference_positional_buffers
from modules.lm import resize_vocabulary

MODEL_FILE = "model.ckpt"
NORMALIZER_FILE = "normalizer.ckpt"
META_FILE = "CKPT.yaml"
DROPPED_BUFFERS = ("1.positional_encoding.inv_freq", "1.positional_encoding_decoder.pe")
EMBEDDING_KEY = "3.model.backbone.embeddings.weight"
LM_HEAD_KEY = "3.model.lm_head.weight"
MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists every difference."""


def find_checkpoints(path: str | pathlib.Path) -> list[pathlib.Path]:
    """CKPT folders to use: `path` itself if it holds model.ckpt, else every `path/CKPT+*` with one (sorted,
    oldest first, since the names carry the save time)."""
    path = pathlib.Path(path)
    if (path / MODEL_FILE).is_file():
        return [path]
    folders = sorted(p for p in path.glob("CKPT+*") if (p / MODEL_FILE).is_file())
    if not folders:
        raise FileNotFoundError(f"{path}: no checkpoint found; expected {MODEL_FILE} in this folder or in "
                                f"CKPT+*/ sub-folders (a SpeechBrain save folder). Pass the stage's save folder.")
    return folders


def read_model_state(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """The averaged `model.ckpt` state of every checkpoint under `path` (one checkpoint: read as is)."""
    folders = find_checkpoints(path)
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


def load_reference_checkpoint(model, path, normalizer=None, grow_vocabulary=False, prefixes=None, seed=0):
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
    """
    folders = find_checkpoints(path)
    state = read_model_state(path)
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
        load_normalizer(normalizer, folders[-1])
    return folders


def load_normalizer(normalizer, folder: str | pathlib.Path) -> None:
    """Restore SpeechBrain InputNormalization statistics (count, glob_mean, glob_std) from normalizer.ckpt."""
    file = pathlib.Path(folder) / NORMALIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: normalizer statistics missing; the speech features would not be "
                                f"normalised as in training. Use a checkpoint saved with its normalizer.")
    normalizer._load(str(file))


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
    """
    folder = _new_checkpoint_folder(pathlib.Path(save_dir))
    state = dict(model.state_dict())  # tied embeddings / lm_head share storage: saved once
    buffers = reference_positional_buffers(d_model=model.encoder.d_model)
    state.update({f"1.{name}": tensor for name, tensor in buffers.items()})
    torch.save(state, folder / MODEL_FILE)
    if normalizer is not None:
        normalizer._save(str(folder / NORMALIZER_FILE))
    with open(folder / META_FILE, "w") as stream:
        stream.write("# yamllint disable\n")
        yaml.safe_dump({"end-of-epoch": True, "unixtime": time.time(), **(meta or {})}, stream)
    return folder


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
    except Exception as error:  # corrupt or foreign file: say which one
        raise CheckpointMismatchError(f"{file}: cannot be read as a torch state dict ({error})") from error


def _new_checkpoint_folder(save_dir: pathlib.Path) -> pathlib.Path:
    """SpeechBrain's naming, CKPT+YYYY-MM-DD+HH-MM-SS+NN, NN counting saves within the same second."""
    stamp = time.strftime("%Y-%m-%d+%H-%M-%S")
    for index in range(100):
        folder = save_dir / f"CKPT+{stamp}+{index:02d}"
        if not folder.exists():
            folder.mkdir(parents=True)
            return folder
    raise RuntimeError(f"{save_dir}: more than 100 checkpoints saved within one second")
