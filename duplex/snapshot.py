"""Session snapshots: a live duplex conversation saved to one file and continued later, elsewhere.

A Mamba conversation is a few fixed-size tensors (the speaker's and the listener's ``MambaState``) plus a
little bookkeeping, so it can be saved between two slices and restored in another process or on another
server: the restored session then produces exactly the events and text it would have produced had it never
stopped (greedy or sampled: the two sampling generators are saved too).

File format (one file, written atomically: a temporary file in the same folder, fsync, rename)::

    a safetensors file
      tensors:   "<branch>.conv" (n_layer, 1, d_inner, d_conv) model dtype, "<branch>.ssm" (..., d_state) fp32,
                 "<branch>.next_logits" (1, V) when present, "rng.state" / "rng.reply" (uint8 generator states)
                 for branch in speaker, listener (when the session has it)
      metadata:  "duplex_snapshot"         the JSON below
                 "duplex_snapshot_sha256"  sha256 over the JSON text and every tensor (name, dtype, shape, bytes)

    JSON: {"format": "duplex-session-snapshot", "version": 1, "model": {identity + hash}, "device": "cpu"|"cuda",
           "config": DuplexConfig, "tokens": TurnTokens, "slice_index", "clock_s", "transcript": [Turn...],
           "branches": {"speaker"|"listener": {seqlen, start_tokens, user_turn (transcript index), pending,
                        reply_ids, reply_turn (index or null), emitted, finished, next_logits (bool)}}}

Refusals (``SnapshotError``, a ``ValueError``) happen before anything changes, i.e. before a state or a
pool row is taken: a file that is not a snapshot, a truncated or corrupted one (checksum), another format
version, another model (identity or weight hash), another tokenizer, another device type (generator states
are device-specific), or state shapes that do not fit the runtime.

Model hash (``model_fingerprint``): sha256 over every parameter and buffer's name, shape and dtype and
``SAMPLES_PER_TENSOR`` values at evenly spaced positions of each (taken on the device, one transfer), of the
LM and of the speech encoder when the session's encoder exposes its module. Hashing all 5.6 GB of the
2.8B model would take seconds per snapshot; the sample takes milliseconds and tells apart any two trained
checkpoints (training changes nearly every weight), but not two models that differ in a few weights only.
A server computes it once per engine and passes it to ``snapshot`` / ``restore`` (``fingerprint=``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import struct
import tempfile

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from duplex.events import Turn
from duplex.session import DuplexConfig, DuplexSession, TurnPrompts, TurnTokens, _Branch

FORMAT = "duplex-session-snapshot"
VERSION = 1
SAMPLES_PER_TENSOR = 256
BRANCHES = ("speaker", "listener")
JSON_KEY, CHECKSUM_KEY = "duplex_snapshot", "duplex_snapshot_sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SnapshotError(ValueError):
    """A snapshot that cannot be restored here (says which file, what is wrong and what to do)."""


# ---------------------------------------------------------------------------------------------- fingerprint
def encoder_module(encode) -> torch.nn.Module | None:
    """The speech encoder module behind a session's ``encode`` callable (engine wrappers keep it as
    ``speech_encoder`` or ``encoder``), or None for a plain function."""
    for name in ("speech_encoder", "encoder"):
        module = getattr(encode, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return encode if isinstance(encode, torch.nn.Module) else None


@torch.no_grad()
def _module_digest(module: torch.nn.Module, digest) -> None:
    """Add names, shapes, dtypes and a strided value sample of every tensor of ``module`` to ``digest``."""
    samples = []
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        flat = tensor.reshape(-1)  # (numel,)
        if flat.numel() == 0:
            continue
        count = min(flat.numel(), SAMPLES_PER_TENSOR)
        # integer positions (a float linspace is inexact past 2**24 elements and may differ between devices)
        positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)  # (count,)
        samples.append(flat[positions].double())  # exact for every float and integer dtype we use
    if samples:
        digest.update(torch.cat(samples).cpu().numpy().tobytes())


def model_fingerprint(runtime, encode=None, tokenizer=None) -> dict:
    """Identity and weight hash of the model a session runs on (see the module docstring for the cost)."""
    model = runtime.model
    digest = hashlib.sha256()
    _module_digest(model, digest)
    encoder = encoder_module(encode) if encode is not None else None
    if encoder is not None:
        digest.update(b"encoder;")
        _module_digest(encoder, digest)
    config = model.config
    return {"lm": type(model).__name__, "n_layer": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "dtype": str(runtime.dtype).removeprefix("torch."),
            "encoder": None if encoder is None else type(encoder).__name__,
            "tokenizer_size": _size(tokenizer),
            "sha256": digest.hexdigest()}


def _size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:  # a tokenizer without a vocabulary size (test stand-ins)
        return None


def engine_fingerprint(engine) -> dict:
    """``model_fingerprint`` of an ``Engine`` (compute once, pass to every snapshot/restore)."""
    return model_fingerprint(engine.runtime, engine.encode, engine.tokenizer)


# ---------------------------------------------------------------------------------------------- snapshot
def snapshot(session: DuplexSession, path, fingerprint: dict | None = None) -> pathlib.Path:
    """Write ``session`` (between two slices) to ``path`` atomically; returns the path.

    The session is not changed and continues normally. ``fingerprint``: ``engine_fingerprint(engine)`` when
    the caller has it (saves hashing the weights again).
    """
    path = pathlib.Path(path)
    scheduler = getattr(session, "_scheduler", None)
    queued = 0 if scheduler is None else scheduler.pending(session)
    if queued:
        raise ValueError(f"snapshot: the session has {queued} job(s) queued in its scheduler (slices submitted, or "
                         "a final round under way); a snapshot holds the conversation between slices only: take it "
                         "after the tick that ran them.")
    if fingerprint is None:
        fingerprint = model_fingerprint(session.runtime, session._encode, session.tokenizer)
    tensors, branches = {}, {}
    for name in BRANCHES:
        branch = getattr(session, f"_{name}")
        if branch is not None:
            branches[name] = _branch_record(branch, session.transcript)
            tensors.update(_branch_tensors(name, branch))
    tensors["rng.state"] = session._state_generator.get_state()  # (S,) uint8
    tensors["rng.reply"] = session._reply_generator.get_state()  # (S,) uint8
    record = {"format": FORMAT, "version": VERSION, "model": fingerprint,
              "device": torch.device(session._state_generator.device).type,
              "config": dataclasses.asdict(session.config), "tokens": dataclasses.asdict(session.tokens),
              "slice_index": session._slice_index, "clock_s": session._clock_s,
              "transcript": [dataclasses.asdict(turn) for turn in session.transcript], "branches": branches}
    text = json.dumps(record, ensure_ascii=False, sort_keys=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    blob = save_tensors(tensors, metadata={JSON_KEY: text, CHECKSUM_KEY: _checksum(text, tensors)})
    write_atomically(path, blob)
    return path


def _branch_record(branch: _Branch, transcript: list[Turn]) -> dict:
    return {"seqlen": branch.state.seqlen[0], "start_tokens": branch.start_tokens,
            "user_turn": _turn_index(branch.user_turn, transcript),
            "reply_turn": None if branch.reply_turn is None else _turn_index(branch.reply_turn, transcript),
            "pending": branch.pending, "reply_ids": list(branch.reply_ids), "emitted": branch.emitted,
            "finished": branch.finished, "next_logits": branch.next_logits is not None}


def _branch_tensors(name: str, branch: _Branch) -> dict[str, torch.Tensor]:
    state = branch.state
    if state.batch_size != 1:
        raise ValueError(f"snapshot: the {name} branch has {state.batch_size} rows; a session branch has one.")
    tensors = {f"{name}.conv": state.conv.clone(), f"{name}.ssm": state.ssm.clone()}  # pool views: copy rows
    if branch.next_logits is not None:
        tensors[f"{name}.next_logits"] = branch.next_logits
    return tensors


def _turn_index(turn: Turn, transcript: list[Turn]) -> int:
    """Where a branch's turn sits in the transcript (the same object: restored as the same object)."""
    for index, candidate in enumerate(transcript):
        if candidate is turn:
            return index
    raise ValueError("snapshot: a branch's turn is missing from the transcript (the session was changed by hand?).")


def _checksum(text: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    return digest.hexdigest()


def write_atomically(path: pathlib.Path, blob: bytes) -> None:
    """Temporary file beside ``path``, fsync, rename: a reader sees the old file or the whole new one. The file is
    readable by the owner only (``mkstemp``'s mode 0600). Also the server's conversation records (duplex/server.py)."""
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(blob)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- restore
def read_snapshot(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON record and the tensors of a snapshot file, checked for format and integrity (not for a model)."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"{path}: cannot read the session snapshot ({error.strerror}).") from error
    metadata = _safetensors_metadata(path, data)
    if JSON_KEY not in metadata:
        raise SnapshotError(f"{path}: a safetensors file but not a duplex session snapshot (no {JSON_KEY!r} "
                            "metadata); give a file written by duplex.snapshot.snapshot.")
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors raises its own error types for a damaged layout
        raise SnapshotError(f"{path}: the snapshot's tensors cannot be read ({error}); the file is corrupted.") from error
    text = metadata[JSON_KEY]
    if metadata.get(CHECKSUM_KEY) != _checksum(text, tensors):
        raise SnapshotError(f"{path}: checksum mismatch: the snapshot is corrupted (changed after it was written); "
                            "restore from another copy.")
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a duplex session snapshot (format {record.get('format')!r}).")
    if record.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot protocol version {record.get('version')!r}; this code reads "
                            f"version {VERSION}. Restore it with the code version that wrote it.")
    return record, tensors


def _safetensors_metadata(path: pathlib.Path, data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file, with a clear error for anything that is not one."""
    not_one = f"{path}: not a duplex session snapshot (not a safetensors file"
    if len(data) < 8:
        raise SnapshotError(f"{not_one}: {len(data)} bytes).")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > MAX_HEADER_BYTES:
        raise SnapshotError(f"{not_one}: header size field {header_size}).")
    if 8 + header_size > len(data):
        raise SnapshotError(f"{path}: the snapshot is truncated ({len(data)} bytes, its header alone needs "
                            f"{8 + header_size}); restore from another copy.")
    try:
        header = json.loads(data[8:8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SnapshotError(f"{not_one}: unreadable header, {error}).") from error
    if not isinstance(header, dict):
        raise SnapshotError(f"{not_one}: header is not a mapping).")
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError) as error:
        raise SnapshotError(f"{not_one}: tensor entries without data_offsets).") from error
    if 8 + header_size + max(ends, default=0) > len(data):
        raise SnapshotError(f"{path}: the snapshot is truncated ({len(data)} bytes of "
                            f"{8 + header_size + max(ends)}); restore from another copy.")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def restore(engine, path, fingerprint: dict | None = None) -> DuplexSession:
    """A ``DuplexSession`` of ``engine`` continuing the conversation saved in ``path``.

    Everything is checked first (``SnapshotError``): nothing is allocated for a refused file. The session's
    branch states are new states of ``engine.runtime`` (pool rows on the GPU backend), filled from the file.
    """
    path = pathlib.Path(path)
    record, tensors = read_snapshot(path)
    if fingerprint is None:
        fingerprint = engine_fingerprint(engine)
    _check_compatible(path, record, tensors, engine, fingerprint)
    config = _config_from(path, record["config"])
    session = engine.new_session(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    try:
        _fill(session, record, tensors)
    except BaseException:
        session.close()
        raise
    return session


def _check_compatible(path, record: dict, tensors: dict, engine, fingerprint: dict) -> None:
    saved = record.get("model") or {}
    if saved != fingerprint:
        differ = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key))
        raise SnapshotError(f"{path}: the snapshot was taken on another model ({', '.join(differ)} differ: "
                            f"snapshot {[saved.get(k) for k in differ]}, this engine "
                            f"{[fingerprint.get(k) for k in differ]}); restore it on the model that wrote it.")
    runtime = engine.runtime
    device = torch.device(getattr(runtime, "device", "cpu")).type
    if record.get("device") != device:
        raise SnapshotError(f"{path}: the snapshot was taken on a {record.get('device')} runtime, this engine runs "
                            f"on {device}: the sampling generators' states do not carry over; restore it on a "
                            f"{record.get('device')} engine.")
    want_tokens = dataclasses.asdict(TurnTokens.from_tokenizer(engine.tokenizer, TurnPrompts.default()))
    if _tuples_to_lists(want_tokens) != record.get("tokens"):
        raise SnapshotError(f"{path}: the snapshot's prompt token ids differ from this engine's tokenizer; "
                            "restore it with the tokenizer that wrote it.")
    _check_record(path, record, tensors, device)
    n_layer = len(runtime.backbone.layers)
    shapes = {"conv": ((n_layer, 1, runtime.d_inner, runtime.d_conv), runtime.dtype),
              "ssm": ((n_layer, 1, runtime.d_inner, runtime.d_state), torch.float32)}
    for name in record.get("branches", {}):
        if name not in BRANCHES:
            raise SnapshotError(f"{path}: unknown branch {name!r} in the snapshot.")
        for kind, (shape, dtype) in shapes.items():
            tensor = tensors.get(f"{name}.{kind}")
            if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                found = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
                raise SnapshotError(f"{path}: {name}.{kind} is {found}, this runtime needs {(shape, dtype)}.")


def _check_record(path, record: dict, tensors: dict, device: str) -> None:
    """Fields a well-formed snapshot has (a file with a valid checksum but hand-made content fails here, not
    half-way through filling a session)."""
    turns = len(record.get("transcript", []))
    for name, branch in record.get("branches", {}).items():
        indices = [branch.get("user_turn"), *([] if branch.get("reply_turn") is None else [branch["reply_turn"]])]
        if not all(isinstance(i, int) and 0 <= i < turns for i in indices):
            raise SnapshotError(f"{path}: the {name} branch names turns {indices} of a {turns}-turn transcript.")
        if branch.get("next_logits") and f"{name}.next_logits" not in tensors:
            raise SnapshotError(f"{path}: the {name} branch's next_logits tensor is missing.")
    size = torch.Generator(device=device).get_state().numel()
    for key in ("rng.state", "rng.reply"):
        tensor = tensors.get(key)
        if tensor is None or tensor.dtype != torch.uint8 or tuple(tensor.shape) != (size,):
            raise SnapshotError(f"{path}: {key} is not a {device} generator state ({size} bytes).")


def _tuples_to_lists(value):
    return json.loads(json.dumps(value))


def _config_from(path, values: dict) -> DuplexConfig:
    try:
        return DuplexConfig.from_dict(values, source=str(path))
    except (ValueError, TypeError) as error:
        raise SnapshotError(f"{path}: the snapshot's duplex config is not valid here ({error}).") from error


def _fill(session: DuplexSession, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put the saved conversation into a fresh session of the right engine and config."""
    device = session._state_generator.device
    session._state_generator.set_state(tensors["rng.state"])
    session._reply_generator.set_state(tensors["rng.reply"])
    session.transcript = [Turn(**turn) for turn in record["transcript"]]
    session._slice_index = int(record["slice_index"])
    session._clock_s = float(record["clock_s"])
    for name, saved in record["branches"].items():
        setattr(session, f"_{name}", _restored_branch(session, name, saved, tensors, device))


def _restored_branch(session: DuplexSession, name: str, saved: dict, tensors: dict, device) -> _Branch:
    runtime = session.runtime
    state = runtime.new_state(1)  # a pool row on the GPU backend
    try:
        state.conv.copy_(tensors[f"{name}.conv"])
        state.ssm.copy_(tensors[f"{name}.ssm"])
        state.set_seqlen([saved["seqlen"]])
    except BaseException:
        runtime.release(state)
        raise
    transcript = session.transcript
    next_logits = tensors[f"{name}.next_logits"].to(device) if saved["next_logits"] else None
    return _Branch(state=state, start_tokens=saved["start_tokens"], user_turn=transcript[saved["user_turn"]],
                   pending=saved["pending"], next_logits=next_logits, reply_ids=list(saved["reply_ids"]),
                   reply_turn=None if saved["reply_turn"] is None else transcript[saved["reply_turn"]],
                   emitted=saved["emitted"], finished=saved["finished"])
