"""Serve DuplexMamba over WebSocket: one duplex conversation per connection, one shared model.

    python -m duplex.server duplex/duplex_tiny.yaml --host 127.0.0.1 --port 8765
    python -m duplex.server duplex/duplex.yaml --checkpoint SAVE_DIR --precision bf16

Then open http://127.0.0.1:8765/ (microphone page), or stream a file with
``python -m duplex.client example/question_capital.wav``. The protocol (versioned) is in docs/server.md.

Why it is built this way (the reference's Gradio demo, spec §6.4 / §8.5-6, shared one global conversation
between all browsers, never sent silence, so it could neither force a reply nor be interrupted):

* each WebSocket is one ``Conversation`` with its own ``DuplexSession`` (states, generators, transcript); the
  weights, the speech encoder and the tokenizer are loaded once in an ``Engine`` and shared;
* the audio stream is cut into slices of the YAML's ``slice_seconds``; an energy gate (slice RMS without its DC
  offset, in dBFS, below ``server.silence_threshold_dbfs``) turns quiet slices into ``None``, which is what lets
  the session force a reply when the user stops talking and barge in while it is answering;
* one model thread (``ModelLoop``) does all model work: connections hand it slices, it runs every slice that
  has arrived in one batched ``Scheduler.tick`` and routes the events back to each connection's ``Outbox``
  (one sender task per socket, bounded, so a client that does not read cannot stall anyone). The final reply
  after ``end`` streams one chunk per tick like any slice;
* a conversation outlives a dropped socket for ``server.reconnect_grace_s``: the client reconnects with the
  token of its ``ready`` frame and continues (docs/server.md).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import ipaddress
import json
import logging
import math
import os
import pathlib
import queue
import re
import secrets
import socket
import stat
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from src.audio import SAMPLE_RATE, to_mono_16k

PROTOCOL_VERSION = 2  # 2: session tokens and reconnecting, health figures; a version-1 client still works
SUPPORTED_PROTOCOLS = (1, 2)
STATIC_DIR = pathlib.Path(__file__).with_name("static")
MIN_CLIENT_RATE, MAX_CLIENT_RATE = 8000, 192000
MAX_SEED = 2**63 - 1  # the session seeds two generators, seed and seed + 1; both must fit torch's 64 bits
START_KEYS = frozenset({"type", "sample_rate", "seed", "protocol"})
CLOSE_TRY_AGAIN_LATER = 1013  # WebSocket close code: server full
CLOSE_INTERNAL_ERROR = 1011
CLOSE_BAD_TOKEN = 4001  # a resume with a session token that is unknown, expired or already ended

log = logging.getLogger("duplex.server")


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ServerConfig:
    """The ``server:`` block of duplex/duplex*.yaml (plain values only: no ``!ref``)."""

    silence_threshold_dbfs: float = -45.0  # a slice whose RMS is below this is silence (fed as None)
    max_connections: int = 3  # concurrent conversations; more are refused with an error frame (close 1013)
    idle_timeout_s: float = 120.0  # a connection that sends no audio or text frame for this long is closed
    max_frame_bytes: int = 1 << 20  # largest WebSocket message (1 MiB = 32 s of 16 kHz PCM16)
    send_timeout_s: float = 10.0  # a client that takes longer than this to accept one frame is dropped
    send_queue_frames: int = 256  # frames waiting for a slow client; one more and it is dropped
    # Browsers send any page's requests to any address, so a page the user opens could use this server: a
    # WebSocket whose Origin is neither listed nor the server's own page (Origin host = Host header) is refused
    # (403). Requests without an Origin (python clients) are not browsers and pass.
    allowed_origins: tuple = ()  # e.g. ["https://app.example.org"]; "*" allows every origin
    # DNS rebinding makes a page's own name point at 127.0.0.1: a Host header not listed is refused (403).
    # Empty: localhost, 127.0.0.1, ::1 and the address bound (any name when bound to 0.0.0.0 / ::).
    allowed_hosts: tuple = ()  # e.g. ["gpu-box.lan"]; "*" allows every name
    reconnect_grace_s: float = 60.0  # a dropped conversation waits this long for its client's token (0: ends)
    max_step_ms: float | None = None  # admit while a model step stays under this; None: half a slice
    persist_dir: str | None = None  # snapshot live conversations here on SIGTERM, restore them on start
    snapshot_every_slices: int = 0  # with persist_dir: also snapshot a conversation every N slices (0: never)

    def __post_init__(self):
        if self.max_connections < 1 or self.idle_timeout_s <= 0 or self.max_frame_bytes < 2:
            raise ValueError("ServerConfig: max_connections must be >= 1, idle_timeout_s > 0 and max_frame_bytes "
                             f">= 2; got {self.max_connections}, {self.idle_timeout_s}, {self.max_frame_bytes}.")
        if self.reconnect_grace_s < 0 or (self.max_step_ms is not None and self.max_step_ms <= 0):
            raise ValueError("ServerConfig: reconnect_grace_s must be >= 0 and max_step_ms > 0 (or null); got "
                             f"{self.reconnect_grace_s}, {self.max_step_ms}.")
        if self.snapshot_every_slices < 0 or (self.snapshot_every_slices and not self.persist_dir):
            raise ValueError("ServerConfig: snapshot_every_slices must be >= 0 and needs persist_dir; got "
                             f"{self.snapshot_every_slices} with persist_dir {self.persist_dir!r}.")
        if self.send_timeout_s <= 0 or self.send_queue_frames < 1:
            raise ValueError("ServerConfig: send_timeout_s must be > 0 and send_queue_frames >= 1; got "
                             f"{self.send_timeout_s}, {self.send_queue_frames}.")

    @classmethod
    def from_dict(cls, values: dict, source: str = "server config") -> "ServerConfig":
        """Build from a YAML mapping; unknown keys are an error (a typo must not be silently ignored)."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: `server:` must be a mapping, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in the server block; known keys: {sorted(known)}.")
        values = dict(values)
        for key in ("allowed_origins", "allowed_hosts"):
            if key in values:
                if not isinstance(values[key], (list, tuple)) or not all(isinstance(v, str) for v in values[key]):
                    raise ValueError(f"{source}: server.{key} must be a list of strings, got {values[key]!r}.")
                values[key] = tuple(values[key])
        return cls(**values)


class _PlainLoader(yaml.SafeLoader):
    """Reads an inference YAML without building anything: HyperPyYAML tags (``!include``, ``!ref``) become None."""


_PlainLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_server_config(yaml_path: str | pathlib.Path) -> ServerConfig:
    """The ``server:`` block of an inference YAML (defaults when absent), read before the model is loaded."""
    path = pathlib.Path(yaml_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: inference YAML not found (e.g. duplex/duplex_tiny.yaml).")
    data = yaml.load(path.read_text(), Loader=_PlainLoader) or {}
    block = data.get("server") if isinstance(data, dict) else None
    return ServerConfig() if block is None else ServerConfig.from_dict(block, source=str(path))


# ---------------------------------------------------------------------------------------------- audio
class ProtocolError(ValueError):
    """A frame the client got wrong; answered with an error frame, the connection stays open."""


def decode_pcm16(data: bytes) -> torch.Tensor:
    """Little-endian signed 16-bit mono PCM -> float32 samples in [-1, 1), shape (N,)."""
    if not data:
        raise ProtocolError("empty binary frame: send 16-bit little-endian mono PCM samples.")
    if len(data) % 2:
        raise ProtocolError(f"binary frame of {len(data)} bytes: PCM16 takes 2 bytes per sample, so the length "
                            "must be even; send whole samples.")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0  # (N,)
    return torch.from_numpy(samples)


def rms_dbfs(samples: torch.Tensor) -> float:
    """RMS level of float samples in dB relative to full scale (1.0 = 0 dBFS; -inf for digital silence)."""
    if samples.numel() == 0:
        return -math.inf
    rms = samples.double().pow(2).mean().sqrt().item()
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


class SliceCutter:
    """Buffers the client's stream at its own rate and cuts it into slices of ``slice_seconds``.

    Cutting happens before resampling, so each slice is resampled whole (no seams inside a slice). A live
    stream has no known end, so unlike ``engine.slice_audio`` a short last piece is not merged: ``flush()``
    returns it as a shorter slice.
    """

    def __init__(self, slice_seconds: float, sample_rate: int = SAMPLE_RATE):
        self.slice_seconds = slice_seconds
        self.sample_rate = sample_rate
        self.received = 0  # samples pushed so far
        self._pending: list[torch.Tensor] = []
        self._pending_count = 0

    @property
    def slice_length(self) -> int:
        return int(round(self.slice_seconds * self.sample_rate))

    def push(self, samples: torch.Tensor) -> list[torch.Tensor]:
        """Add (N,) samples; return the slices (at the client rate) that are now complete."""
        self._pending.append(samples)
        self._pending_count += samples.numel()
        self.received += samples.numel()
        slices = []
        while self._pending_count >= self.slice_length:
            buffer = torch.cat(self._pending)  # (pending,)
            slices.append(buffer[:self.slice_length])
            self._pending, self._pending_count = [buffer[self.slice_length:]], buffer.numel() - self.slice_length
        return slices

    def flush(self) -> torch.Tensor | None:
        """The buffered remainder (shorter than a slice), or None when nothing is left."""
        if self._pending_count == 0:
            return None
        rest = torch.cat(self._pending)  # (pending,)
        self._pending, self._pending_count = [], 0
        return rest


def gate_slice(samples: torch.Tensor, sample_rate: int, threshold_dbfs: float) -> torch.Tensor | None:
    """The energy gate: a slice quieter than ``threshold_dbfs`` is silence (None), else 16 kHz speech (N',).

    The level is measured without the slice's DC offset (its mean): a constant offset, which cheap microphones
    and sound cards add, is no sound, and at -40 dBFS it used to open the gate. What is fed on is unchanged.
    """
    if samples.numel() == 0 or rms_dbfs(samples - samples.double().mean().float()) < threshold_dbfs:
        return None
    return to_mono_16k(samples, sample_rate)  # (N',)


# ---------------------------------------------------------------------------------------------- sending
class Outbox:
    """The frames one connection still has to send, sent in order by one task of their own.

    Nothing else in the server awaits a client: a client that never reads cannot stall the model or hold its
    slot. It is bounded twice: at most ``limit`` frames wait, and one send may take at most ``timeout`` seconds;
    past either the connection is aborted (``failure`` says why) and its handler ends.
    """

    _CLOSE = object()

    def __init__(self, ws: web.WebSocketResponse, transport, limit: int, timeout: float):
        self.ws, self.transport, self.limit, self.timeout = ws, transport, limit, timeout
        self.failure: str | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    def put(self, frame: dict) -> None:
        """Queue one JSON frame (never blocks; dropped once the connection is gone or failed)."""
        if self.failure is not None or self._task.done():
            return
        if self._queue.qsize() >= self.limit:
            self.abort(f"{self._queue.qsize()} frames waiting: the client does not read")
            return
        self._queue.put_nowait(frame)

    def error(self, message: str) -> None:
        self.put({"type": "error", "message": message})

    async def close(self, code: int = 1000) -> None:
        """Send what is queued, then the close frame; returns when done or the client failed."""
        if not self._task.done():
            self._queue.put_nowait((self._CLOSE, code))
        await asyncio.shield(self._task)

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            frame = await self._queue.get()
            try:
                if isinstance(frame, tuple) and frame[0] is self._CLOSE:
                    await asyncio.wait_for(self.ws.close(code=frame[1]), self.timeout)
                    return
                if self.ws.closed:
                    return
                await asyncio.wait_for(self.ws.send_str(json.dumps(frame)), self.timeout)
            except asyncio.TimeoutError:
                self.abort(f"one frame took over {self.timeout:g} s to send: the client does not read")
                return
            except ConnectionError:  # the client left; its frames are dropped
                return

    def abort(self, reason: str) -> None:
        self.failure = reason
        log.info("dropping a connection: %s", reason)
        if self.transport is not None:
            self.transport.abort()  # the handler's receive() then returns CLOSED


# ---------------------------------------------------------------------------------------------- persistence
def token_key(token: str) -> str:
    """What the server keeps of a session token: its sha256 (files and tables never hold the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


class ConversationStore:
    """``server.persist_dir``: each live conversation as ``<key>.snapshot`` (``duplex.snapshot``: the session)
    and ``<key>.json`` (the server's side: client rate, acknowledged samples, recent slice frames), where key
    is the sha256 of its token. Written only by the server: the folder is made with mode 0700, and an existing
    one that others may write to, or that another user owns, is refused."""

    VERSION = 1

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ValueError(f"server.persist_dir {self.directory}: must be owned by this user and writable by no "
                             f"one else (it is mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid}); "
                             f"`chmod 700 {self.directory}` or choose another folder.")

    def paths(self, key: str) -> tuple[pathlib.Path, pathlib.Path]:
        return self.directory / f"{key}.snapshot", self.directory / f"{key}.json"

    def save(self, session, record: dict, fingerprint: dict) -> None:
        """Snapshot ``session`` and its record (model thread, between ticks); each file replaced atomically."""
        from duplex.snapshot import snapshot, write_atomically
        session_path, record_path = self.paths(record["key"])
        snapshot(session, session_path, fingerprint=fingerprint)
        write_atomically(record_path, json.dumps({"version": self.VERSION, **record}).encode())

    def delete(self, key: str) -> None:
        for path in self.paths(key):
            path.unlink(missing_ok=True)

    def records(self) -> list[dict]:
        """The saved records (a file that is not one is logged and set aside as ``*.refused``)."""
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if record.get("version") != self.VERSION or record.get("key") != path.stem:
                    raise ValueError(f"version {record.get('version')!r} or key does not match its name")
                found.append(record)
            except (ValueError, OSError) as error:
                log.warning("%s: not a conversation record (%s); set aside as .refused", path, error)
                path.rename(path.with_suffix(".refused"))
        return found


# ---------------------------------------------------------------------------------------------- the model loop
def _percentile(values, q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


class ModelLoop:
    """The one thread that does model work, for every connection: submit slices, tick, route events back.

    Connections never call the model. They hand commands to this thread (``open``, ``submit``, ``finish``,
    ``close``: thread-safe, never blocking), and it runs them in order between ticks; each tick runs the slices
    of all conversations that arrived meanwhile as one batch (``duplex.scheduler``). Events go back to each
    conversation on the event loop (``loop.call_soon_threadsafe``). The thread owns the scheduler, the sessions
    and the runtime: nothing else touches them, so there is no lock.
    """

    def __init__(self, engine, scheduler, loop: asyncio.AbstractEventLoop, history: int = 1000):
        self.engine, self.scheduler, self.loop = engine, scheduler, loop
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._latency_ms: collections.deque = collections.deque(maxlen=history)  # slice cut -> event routed
        self._ticks: collections.deque = collections.deque(maxlen=50)  # (ms, sessions with work) of recent ticks
        self.ticks = 0  # ticks run so far
        self._sessions: dict = {}  # conversation -> its DuplexSession (model thread only)
        self._finishing: set = set()
        self._cut_times: dict = {}  # conversation -> deque of (perf_counter when cut, samples) of its slices
        self._progress: dict = {}  # conversation -> {"samples": acknowledged samples, "slices": n, "events": deque}
        self.store: ConversationStore | None = None  # persistence (server.persist_dir), with:
        self.fingerprint: dict | None = None  # the engine's model fingerprint (duplex.snapshot)
        self.snapshot_every = 0  # slices between snapshots of a conversation (0: only snapshot_all)
        self.keep_snapshots = False  # set by snapshot_all: closing conversations then keeps their files
        self._thread = threading.Thread(target=self._run, name="duplex-model", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- called on the event loop
    def open(self, conversation, **overrides) -> None:
        self._commands.put(("open", conversation, overrides))

    def submit(self, conversation, wav, duration_s: float, cut_at: float, samples: int) -> None:
        """Queue one slice (``samples`` long at the client's rate, cut at ``cut_at``: perf_counter)."""
        self._commands.put(("submit", conversation, wav, duration_s, (cut_at, samples)))

    def adopt(self, conversation, session, samples: int, slices: int, events: list) -> None:
        """Take a restored ``session`` (made on this thread) into the loop as ``conversation``'s."""
        self._commands.put(("adopt", conversation, session, samples, slices, events))

    def finish(self, conversation) -> None:
        self._commands.put(("finish", conversation))

    def close(self, conversation) -> None:
        self._commands.put(("close", conversation))

    async def call(self, function, *args):
        """Run ``function(*args)`` on the model thread between ticks (warm-up, snapshots); its result."""
        future = self.loop.create_future()
        self._commands.put(("call", function, args, future))
        return await future

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join()

    @property
    def step_ms(self) -> dict:
        """Recent tick durations: the last, p50, p99 (ms) and the sessions the last one served."""
        ticks = list(self._ticks)
        times = [ms for ms, _ in ticks]
        return {"last": times[-1] if times else None, "p50": _percentile(times, 0.5),
                "p99": _percentile(times, 0.99), "sessions_last": ticks[-1][1] if ticks else 0, "ticks": self.ticks}

    def predicted_step_ms(self, sessions: int) -> float | None:
        """A tick's duration with ``sessions`` busy, scaled linearly from each recent tick (pessimistic: batching
        makes the cost grow slower than that); the 90th percentile; None before the first tick."""
        predictions = [ms * sessions / busy for ms, busy in list(self._ticks) if busy]
        return _percentile(predictions, 0.9)

    @property
    def latency_ms(self) -> dict:
        values = list(self._latency_ms)
        return {"p50": _percentile(values, 0.5), "p99": _percentile(values, 0.99), "slices": len(values)}

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            commands = [self._commands.get()] if not self.scheduler.has_work() else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is None:
                    self._shutdown()
                    return
                self._apply(command)
            if self.scheduler.has_work():
                self._tick()

    def _apply(self, command) -> None:
        kind, conversation = command[0], command[1]
        try:
            if kind == "call":
                _, function, args, future = command
                result = function(*args)
                self.loop.call_soon_threadsafe(_resolve, future, result, None)
            elif kind == "open":
                self._add(conversation, self.engine.new_session(**command[2]), 0, 0, [])
            elif kind == "adopt":
                self._add(conversation, *command[2:])
            elif kind == "submit":
                _, _, wav, duration, cut = command
                session = self._sessions.get(conversation)
                if session is not None:
                    self.scheduler.submit(session, wav, duration_s=duration)
                    self._cut_times[conversation].append(cut)
            elif kind == "finish":
                if conversation in self._sessions:
                    self.scheduler.submit_finish(self._sessions[conversation])
                    self._finishing.add(conversation)
            elif kind == "close":
                self._drop(conversation)
        except Exception as error:  # noqa: BLE001 - a bad command ends its conversation, never the loop
            if kind == "call":
                self.loop.call_soon_threadsafe(_resolve, command[3], None, error)
            else:
                self._fail([conversation], error)

    def _add(self, conversation, session, samples: int, slices: int, events: list) -> None:
        self.scheduler.add(session)
        self._sessions[conversation] = session
        self._cut_times[conversation] = collections.deque()
        self._progress[conversation] = {"samples": samples, "slices": slices,
                                        "events": collections.deque(events, maxlen=conversation.sent.maxlen)}

    def snapshot_all(self) -> int:
        """Snapshot every conversation that can be resumed (model thread, between ticks); their files are kept
        when they close from now on (the server is stopping). Returns how many were saved."""
        self.keep_snapshots = True
        saved = 0
        for conversation in list(self._sessions):
            saved += self._save(conversation)
        return saved

    def _save(self, conversation) -> bool:
        """Snapshot one conversation as of its last completed slice (queued slices are not in its state yet, and
        not counted as acknowledged: the client re-sends them)."""
        if self.store is None or conversation in self._finishing or conversation.ended:
            return False
        progress = self._progress[conversation]
        record = {"key": conversation.key, "sample_rate": conversation.cutter.sample_rate, "seed": conversation.seed,
                  "acked_samples": progress["samples"], "slices": progress["slices"],
                  "events": list(progress["events"])}
        try:
            self.store.save(self._sessions[conversation], record, self.fingerprint)
        except (OSError, ValueError) as error:  # a full disk must not end the conversation
            log.warning("could not snapshot a conversation: %s", error)
            return False
        return True

    def _tick(self) -> None:
        busy = [c for c, s in self._sessions.items() if self.scheduler.pending(s)]
        began = time.perf_counter()
        try:
            routed = self.scheduler.tick()
        except Exception as error:  # noqa: BLE001 - the conversations of this tick end, the others go on
            self._fail(busy, error)
            return
        self._ticks.append((1e3 * (time.perf_counter() - began), len(busy)))
        self.ticks += 1
        owners = {id(s): c for c, s in self._sessions.items()}
        now = time.perf_counter()
        advanced = set()
        for session, event in routed:
            conversation = owners[id(session)]
            if event.input != "final" and self._cut_times[conversation]:
                cut_at, samples = self._cut_times[conversation].popleft()
                self._latency_ms.append(1e3 * (now - cut_at))
                progress = self._progress[conversation]
                progress["samples"] += samples
                progress["slices"] += 1
                progress["events"].append({"type": "slice", **event.to_json()})
                if self.snapshot_every and progress["slices"] % self.snapshot_every == 0:
                    advanced.add(conversation)
        for conversation in advanced:  # on disk before its events go out: what a client saw acknowledged is saved
            self._save(conversation)
        for session, event in routed:
            self.loop.call_soon_threadsafe(owners[id(session)].on_event, event)
        for conversation in [c for c in self._finishing if not self.scheduler.pending(self._sessions[c])]:
            text = self._sessions[conversation].conversation_text()
            self._drop(conversation)  # its states go back now, not when the server stops
            self.loop.call_soon_threadsafe(conversation.on_finished, text)

    def _fail(self, conversations, error: Exception) -> None:
        log.error("model work failed for %d conversation(s): %s: %s", len(conversations), type(error).__name__,
                  error, exc_info=error)
        for conversation in conversations:
            self._drop(conversation)
            self.loop.call_soon_threadsafe(conversation.on_failure, f"{type(error).__name__}: {error}")

    def _drop(self, conversation) -> None:
        session = self._sessions.pop(conversation, None)
        self._finishing.discard(conversation)
        self._cut_times.pop(conversation, None)
        self._progress.pop(conversation, None)
        if session is not None:
            self.scheduler.remove(session)  # its branches' states go back to the runtime
            if self.store is not None and not self.keep_snapshots:
                self.store.delete(conversation.key)  # over: nothing to restore

    def _shutdown(self) -> None:
        for conversation in list(self._sessions):
            self._drop(conversation)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ---------------------------------------------------------------------------------------------- one conversation
class Conversation:
    """One conversation: its audio buffer, its place in the model loop, the socket it is attached to (if any).

    It outlives a dropped socket for ``reconnect_grace_s``: a client that comes back with the ``token`` of its
    ``ready`` frame is attached again and continues (docs/server.md, "Reconnecting"). Every frame it is sent
    goes through ``emit``, which keeps the recent ``slice`` frames for a client that missed them.
    """

    def __init__(self, model: ModelLoop, config: ServerConfig, slice_seconds: float, key: str, on_over=None):
        self.model, self.config, self.key = model, config, key  # key: token_key(its token)
        self.cutter = SliceCutter(slice_seconds)
        self.outbox: Outbox | None = None
        # recent slice frames, for a resume: half the outbox, so that a replay never overflows it
        self.sent: collections.deque = collections.deque(maxlen=max(1, config.send_queue_frames // 2))
        self.opened = self.started = self.ended = self.over = False
        self.seed: int | None = None
        self.detached_since: float | None = None
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()  # text, or error message
        self._on_over = on_over  # called once when the conversation is over (frees its slot)

    # ---------------------------------------------------------------- client frames
    def on_text(self, text: str) -> bool:
        """Handle a JSON control frame; False when the client said ``end``."""
        message = _parse_control(text)
        if message["type"] == "start":
            self._start(message)
            return True
        self.end()
        return False

    def on_audio(self, data: bytes) -> None:
        samples = decode_pcm16(data)  # (N,)
        for piece in self.cutter.push(samples):
            self._submit(piece)

    def end(self) -> None:
        """The user is done: the buffered remainder, then the final reply streamed (one frame per tick)."""
        if self.ended:
            return
        self.ended = True
        rest = self.cutter.flush()
        if rest is not None:
            self._submit(rest)
        self._open()
        self.model.finish(self)

    # ---------------------------------------------------------------- from the model loop (event loop thread)
    def on_event(self, event) -> None:
        frame = {"type": "slice", **event.to_json()}
        self.sent.append(frame)
        self.emit(frame)

    def on_finished(self, text: str) -> None:
        self.emit({"type": "conversation", "text": text})
        self._set_over()
        _resolve(self.finished, 1000, None)

    def on_failure(self, message: str) -> None:
        self.emit({"type": "error", "message": f"internal error: {message}"})
        self._set_over()
        _resolve(self.finished, CLOSE_INTERNAL_ERROR, None)

    # ---------------------------------------------------------------- sockets
    def emit(self, frame: dict) -> None:
        if self.outbox is not None:
            self.outbox.put(frame)

    def attach(self, outbox: Outbox, last_slice_index: int | None = None) -> None:
        """Send to ``outbox`` from now on; on a resume, first the slice frames after ``last_slice_index``."""
        self.outbox, self.detached_since = outbox, None
        if last_slice_index is not None:
            for frame in self.sent:
                if frame["slice_index"] > last_slice_index:
                    outbox.put(frame)

    def detach(self, outbox: Outbox) -> None:
        if self.outbox is outbox:
            self.outbox, self.detached_since = None, time.monotonic()

    def close(self) -> None:
        """End the conversation for good: its session leaves the model loop (its states are given back)."""
        if self.opened:
            self.model.close(self)
        self._set_over()
        _resolve(self.finished, 1000, None)

    def restored(self, record: dict) -> None:
        """Continue a conversation saved in ``record`` (ConversationStore): its acknowledged audio, its frames."""
        self.cutter.sample_rate, self.cutter.received = record["sample_rate"], record["acked_samples"]
        self.seed, self.started, self.opened = record["seed"], True, True
        self.sent.extend(record["events"])
        self.detached_since = time.monotonic()

    def _set_over(self) -> None:
        if not self.over:
            self.over = True
            if self._on_over is not None:
                self._on_over(self)

    # ---------------------------------------------------------------- internals
    def _start(self, message: dict) -> None:
        unknown = sorted(set(message) - START_KEYS)
        if unknown:
            raise ProtocolError(f"start frame: unknown key(s) {unknown}; known keys: {sorted(START_KEYS)}.")
        if self.started:
            raise ProtocolError("a second start frame: a conversation takes one, before any audio; its settings "
                                "stay as the first one said.")
        if self.opened or self.cutter.received:
            raise ProtocolError("start frame after the conversation began: send it first, before any audio.")
        version = message.get("protocol", PROTOCOL_VERSION)
        if version not in SUPPORTED_PROTOCOLS:
            raise ProtocolError(f"start frame: protocol {version!r} is not supported; this server speaks "
                                f"protocol {PROTOCOL_VERSION} (docs/server.md).")
        rate = message.get("sample_rate", SAMPLE_RATE)
        if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_CLIENT_RATE <= rate <= MAX_CLIENT_RATE:
            raise ProtocolError(f"start frame: sample_rate must be an integer from {MIN_CLIENT_RATE} to "
                                f"{MAX_CLIENT_RATE} Hz, got {rate!r}.")
        seed = message.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
            shown = repr(seed) if len(repr(seed)) <= 40 else repr(seed)[:37] + "..."
            raise ProtocolError(f"start frame: seed must be an integer from 0 to 2**63 - 1, got {shown}.")
        self.cutter.sample_rate, self.seed, self.started = rate, seed, True

    def _open(self) -> None:
        if not self.opened:
            self.opened = True
            self.model.open(self, **({} if self.seed is None else {"seed": self.seed}))

    def _submit(self, samples: torch.Tensor) -> None:
        """Gate one slice (client rate) and hand it to the model loop; its event comes back by ``on_event``."""
        duration = samples.numel() / self.cutter.sample_rate
        wav = gate_slice(samples, self.cutter.sample_rate, self.config.silence_threshold_dbfs)  # (N',) or None
        self._open()
        self.model.submit(self, wav, duration, time.perf_counter(), samples.numel())


def _parse_control(text: str) -> dict:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"text frame is not JSON ({error}); send {{\"type\": \"start\"|\"end\"}}.") from error
    except RecursionError as error:  # nesting deeper than the interpreter's recursion limit
        raise ProtocolError("text frame nests JSON too deeply: control frames are flat objects.") from error
    except ValueError as error:  # an integer over sys.get_int_max_str_digits() digits
        raise ProtocolError(f"text frame has a number the server will not read ({error}).") from error
    if not isinstance(message, dict) or message.get("type") not in ("start", "end"):
        raise ProtocolError(f"unknown control frame {text[:80]!r}: expected {{\"type\": \"start\", "
                            "\"sample_rate\": N}} or {\"type\": \"end\"} (audio goes in binary frames).")
    return message


# ---------------------------------------------------------------------------------------------- who may connect
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _host_name(netloc: str) -> str:
    """'Example.org:8765' -> 'example.org'; '[::1]:8765' -> '::1'."""
    return (urllib.parse.urlsplit("//" + netloc).hostname or "").lower()


def host_allowed(host_header: str, allowed_hosts: tuple, bound_host: str | None) -> bool:
    """Whether the Host header names this server (see ``ServerConfig.allowed_hosts``)."""
    if "*" in allowed_hosts:
        return True
    if not allowed_hosts and bound_host is not None and bound_host in ("0.0.0.0", "::", ""):
        return True  # bound to every interface: the names it is reached by are not known
    names = {n.lower() for n in allowed_hosts} or {*LOOPBACK_NAMES, *([bound_host.lower()] if bound_host else [])}
    return _host_name(host_header) in names


def origin_allowed(origin: str | None, host_header: str, allowed_origins: tuple) -> bool:
    """Whether a WebSocket's Origin may use the server (see ``ServerConfig.allowed_origins``)."""
    if origin is None:
        return True  # not a browser
    if "*" in allowed_origins or origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed_origins}:
        return True
    parts = urllib.parse.urlsplit(origin)  # the server's own page
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.lower()


# ---------------------------------------------------------------------------------------------- the server
def rows_needed(max_connections: int) -> int:
    """State rows the runtime must hold for ``max_connections`` conversations.

    Between ticks a session holds at most two branches (speaker, listener); inside a tick its state-token probe
    forks a third, and every session of the tick may probe at once (``duplex.scheduler``): 3 rows each.
    """
    return 3 * max_connections


def check_state_pool(runtime, max_connections: int) -> None:
    """Refuse a ``max_connections`` the runtime's state pool (GPU backend: ``max_rows``) cannot serve."""
    rows = getattr(runtime, "max_rows", None)  # the CPU runtime allocates freely: no limit
    if rows is not None and rows < rows_needed(max_connections):
        fits = rows // 3
        raise ValueError(f"server: max_connections {max_connections} needs {rows_needed(max_connections)} state "
                         f"rows but the runtime's pool holds {rows}; set server.max_connections (or "
                         f"--max-connections) to at most {fits}, or build the runtime with more rows.")


class DuplexServer:
    """The shared engine + the HTTP routes: ``/`` (microphone page), ``/health`` (JSON), ``/ws`` (protocol)."""

    def __init__(self, engine, config: ServerConfig | None = None, name: str = "", warm_up: bool = True,
                 bound_host: str | None = None):
        self.config = config or ServerConfig()
        self.bound_host = bound_host  # the --host address (None: loopback names only, as in tests)
        check_state_pool(engine.runtime, self.config.max_connections)
        self.engine = engine
        self.name = name
        self.warm_up = warm_up
        self.model: ModelLoop | None = None  # made with the app, stopped with it
        self.conversations: dict[str, Conversation] = {}  # token_key -> live conversation (attached or in grace)
        self.stopping = False  # set on shutdown: sockets closed by it do not end their conversations
        self.attached = 0  # open sockets with a conversation

    @property
    def max_step_ms(self) -> float:
        """Longest tick that still keeps real time with a margin (admission; ``server.max_step_ms``)."""
        if self.config.max_step_ms is not None:
            return self.config.max_step_ms
        return 500.0 * self.engine.config.slice_seconds  # half a slice

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._check_host])
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ws", self.websocket)
        app.router.add_static("/static", STATIC_DIR)
        app.on_startup.append(self._start_model)
        app.on_shutdown.append(self._close_sockets)
        app.on_cleanup.append(self._stop_model)
        return app

    @web.middleware
    async def _check_host(self, request: web.Request, handler):
        if not host_allowed(request.host, self.config.allowed_hosts, self.bound_host):
            log.warning("refused a request for host %r (server.allowed_hosts)", request.host)
            raise web.HTTPForbidden(text=f"host {request.host!r} is not served here; add it to "
                                         "server.allowed_hosts if it should be.\n")
        return await handler(request)

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok", "protocol": PROTOCOL_VERSION, "model": self.name,
            "connections": self.attached, "sessions": len(self.conversations),
            "max_connections": self.config.max_connections, "admitting": self._refusal() is None,
            "step_ms": self.model.step_ms, "max_step_ms": self.max_step_ms, "latency_ms": self.model.latency_ms,
            "sample_rate": SAMPLE_RATE, "slice_seconds": self.engine.config.slice_seconds,
            "silence_threshold_dbfs": self.config.silence_threshold_dbfs,
            "device": str(getattr(self.engine.runtime, "device", "cpu")),
        })

    # ---------------------------------------------------------------- the WebSocket
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.host, self.config.allowed_origins):
            log.warning("refused a WebSocket from origin %r (server.allowed_origins)", origin)
            raise web.HTTPForbidden(text=f"origin {origin!r} may not use this server; add it to "
                                         "server.allowed_origins if it should.\n")
        # aiohttp refuses a message of exactly max_msg_size bytes; max_frame_bytes is the largest one accepted
        ws = web.WebSocketResponse(max_msg_size=self.config.max_frame_bytes + 1)
        await ws.prepare(request)
        outbox = Outbox(ws, request.transport, self.config.send_queue_frames, self.config.send_timeout_s)
        conversation = self._resume(request, outbox) if "resume" in request.query else self._admit(outbox)
        if conversation is None:  # refused: the error frame is queued
            await outbox.close(CLOSE_BAD_TOKEN if "resume" in request.query else CLOSE_TRY_AGAIN_LATER)
            return ws
        self.attached += 1
        log.info("conversation %s by %s (%d open)", "resumed" if "resume" in request.query else "opened",
                 request.remote, len(self.conversations))
        try:
            code = await self._serve(ws, conversation, outbox)
            if code is not None:
                await outbox.close(code)
        finally:
            outbox.cancel()
            self.attached -= 1
            conversation.detach(outbox)
            if outbox.failure is not None and conversation.outbox is None and not self.stopping:
                conversation.close()  # a client that does not read gets no grace
            dropped = not conversation.over and conversation.outbox is None
            if dropped:
                self._keep_for_grace(conversation)
            log.info("conversation of %s %s after %.1f s of audio%s", request.remote,
                     "detached" if dropped else "closed",
                     conversation.cutter.received / conversation.cutter.sample_rate,
                     f" ({outbox.failure})" if outbox.failure else "")
        return ws

    def _admit(self, outbox: Outbox) -> Conversation | None:
        """A new conversation, or None (refused with an error frame and close 1013)."""
        refusal = self._refusal()
        if refusal is not None:
            outbox.error(refusal)
            return None
        token = secrets.token_urlsafe(32)
        conversation = Conversation(self.model, self.config, self.engine.config.slice_seconds, token_key(token),
                                    on_over=self._forget)
        self.conversations[conversation.key] = conversation
        outbox.put(self._ready_frame(token))
        conversation.attach(outbox)
        return conversation

    def _resume(self, request: web.Request, outbox: Outbox) -> Conversation | None:
        """The conversation of ``?resume=TOKEN``, attached to this socket; None (close 4001) when unknown."""
        token = request.query["resume"]
        conversation = self.conversations.get(token_key(token))
        last = request.query.get("last_slice", "-1")
        if conversation is None or conversation.ended or not re.fullmatch(r"-1|\d{1,9}", last):
            outbox.error("unknown or expired session token (or a bad last_slice): start a new conversation."
                         if conversation is None or conversation.ended
                         else f"last_slice must be the slice_index of the last slice frame received, got {last!r}.")
            return None
        if conversation.outbox is not None:  # the old socket is still open (half-open connection): replaced
            conversation.outbox.abort("the client resumed on another connection")
        outbox.put({**self._ready_frame(token), "resumed": True,
                    "received_samples": conversation.cutter.received, "client_sample_rate": conversation.cutter.sample_rate})
        conversation.attach(outbox, last_slice_index=int(last))
        return conversation

    def _refusal(self) -> str | None:
        """Why one more conversation would be refused now, or None (admission)."""
        open_now = len(self.conversations)
        if open_now >= self.config.max_connections:
            return (f"server full: {open_now} conversations of {self.config.max_connections} are open; try again "
                    "later.")
        predicted = self.model.predicted_step_ms(open_now + 1) if self.model is not None else None
        if predicted is not None and predicted > self.max_step_ms:
            return (f"server busy: with one more conversation a model step would take about {predicted:.0f} ms, "
                    f"over the {self.max_step_ms:.0f} ms that keep real time; try again later.")
        return None

    def _forget(self, conversation: Conversation) -> None:
        if self.conversations.get(conversation.key) is conversation:
            del self.conversations[conversation.key]

    def _keep_for_grace(self, conversation: Conversation) -> None:
        """A dropped socket: the conversation waits ``reconnect_grace_s`` for its client, then ends."""
        if self.config.reconnect_grace_s <= 0:
            conversation.close()
            return
        detached_since = conversation.detached_since
        asyncio.get_running_loop().call_later(self.config.reconnect_grace_s, self._expire, conversation,
                                              detached_since)

    def _expire(self, conversation: Conversation, detached_since: float) -> None:
        if conversation.detached_since == detached_since and not conversation.over:
            log.info("a detached conversation expired (no reconnect in %g s)", self.config.reconnect_grace_s)
            conversation.close()

    async def _serve(self, ws: web.WebSocketResponse, conversation: Conversation, outbox: Outbox) -> int | None:
        """Receive frames until ``end`` and the final reply, a close, the idle timeout or a model failure.

        Returns the close code to send, or None when the socket is gone (the conversation may be resumed).
        Only audio and text frames are activity: pings (answered by aiohttp inside ``receive``) do not keep a
        connection open, so the idle deadline bounds the whole wait, not each frame."""
        receiving = asyncio.ensure_future(self._receive(ws, conversation))
        try:
            done, _ = await asyncio.wait({receiving, conversation.finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receiving.done():
                receiving.cancel()
        if receiving not in done:  # the conversation ended first: a model failure (or a takeover)
            return conversation.finished.result()
        outcome = receiving.result()
        if outcome == "end":  # the final reply streams through the model loop, one frame per tick
            return await conversation.finished
        if outcome in ("idle", "closed"):
            return 1000
        if conversation.finished.done():
            return conversation.finished.result()
        return None  # "gone": the client dropped; the conversation may be resumed

    async def _receive(self, ws: web.WebSocketResponse, conversation: Conversation) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.idle_timeout_s
        while not ws.closed:
            try:
                message = await asyncio.wait_for(ws.receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                conversation.emit({"type": "error", "message": f"no audio or text frame for "
                                   f"{self.config.idle_timeout_s:g} s: closing the conversation."})
                conversation.close()
                return "idle"
            if message.type == WSMsgType.CLOSE and message.data == 1000:
                conversation.close()  # here, not in the handler: aiohttp may cancel that once the socket is gone
                return "closed"  # the client closed normally: it is done with the conversation
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break  # CLOSE 1001 etc. / CLOSED / ERROR (e.g. a frame over max_frame_bytes: close 1009)
            deadline = loop.time() + self.config.idle_timeout_s
            try:
                if message.type == WSMsgType.BINARY:
                    conversation.on_audio(message.data)
                elif not conversation.on_text(message.data):
                    return "end"
            except ProtocolError as error:
                conversation.emit({"type": "error", "message": str(error)})
        return "gone"

    def _ready_frame(self, token: str) -> dict:
        return {"type": "ready", "protocol": PROTOCOL_VERSION, "sample_rate": SAMPLE_RATE,
                "slice_seconds": self.engine.config.slice_seconds,
                "silence_threshold_dbfs": self.config.silence_threshold_dbfs, "token": token,
                "reconnect_grace_s": self.config.reconnect_grace_s}

    # ---------------------------------------------------------------- lifecycle
    async def _start_model(self, app: web.Application) -> None:
        scheduler = self.engine.new_scheduler(max_sessions=self.config.max_connections)
        self.model = ModelLoop(self.engine, scheduler, asyncio.get_running_loop())
        if self.warm_up:
            log.info("warming up the model")
            await self.model.call(warmup, self.engine)  # on the model thread: every model call runs there
        if self.config.persist_dir:
            await self._restore_conversations(ConversationStore(self.config.persist_dir))

    async def _restore_conversations(self, store: ConversationStore) -> None:
        """Take back the conversations saved in ``store``; each waits ``reconnect_grace_s`` for its client."""
        from duplex.snapshot import engine_fingerprint, read_snapshot, restore
        self.model.store, self.model.snapshot_every = store, self.config.snapshot_every_slices
        self.model.fingerprint = await self.model.call(engine_fingerprint, self.engine)
        for record in store.records():
            session_path, record_path = store.paths(record["key"])
            try:
                saved_slices = read_snapshot(session_path)[0]["slice_index"]
                if saved_slices != record["slices"]:  # killed between writing the two files
                    raise ValueError(f"the snapshot holds {saved_slices} slices but its record {record['slices']}; "
                                     "the pair is not from one moment")
                session = await self.model.call(restore, self.engine, session_path, self.model.fingerprint)
            except (ValueError, OSError) as error:
                log.warning("%s not restored: %s; set aside as *.refused", session_path, error)
                record_path.rename(record_path.with_suffix(".refused"))
                if session_path.exists():
                    session_path.rename(session_path.with_suffix(".snapshot.refused"))
                continue
            conversation = Conversation(self.model, self.config, self.engine.config.slice_seconds, record["key"],
                                        on_over=self._forget)
            conversation.restored(record)
            self.model.adopt(conversation, session, record["acked_samples"], record["slices"], record["events"])
            self.conversations[conversation.key] = conversation
            self._keep_for_grace(conversation)
        if self.conversations:
            log.info("restored %d conversation(s) from %s", len(self.conversations), store.directory)

    async def _close_sockets(self, app: web.Application) -> None:
        self.stopping = True
        for conversation in list(self.conversations.values()):
            if conversation.outbox is not None:
                conversation.outbox.abort("the server is shutting down")

    async def _stop_model(self, app: web.Application) -> None:
        if self.model.store is not None:
            saved = await self.model.call(self.model.snapshot_all)
            log.info("saved %d conversation(s) to %s", saved, self.model.store.directory)
        for conversation in list(self.conversations.values()):
            conversation.close()
        await asyncio.get_running_loop().run_in_executor(None, self.model.stop)


# ---------------------------------------------------------------------------------------------- command line
class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log without query strings: ``/ws?resume=TOKEN`` must not write the token to a log."""

    def log(self, request, response, time: float) -> None:
        self.logger.info("%s %s %s %s %.3fs", request.remote, request.method, request.path, response.status, time)


def warmup(engine) -> None:
    """One throw-away slice so the first user does not pay for lazy initialisation (any device), and on the GPU
    backend every CUDA graph captured up front (a capture inside a live tick stalled every conversation for up
    to a second: bench/load_ws.py on the H200, session 6)."""
    capture = getattr(engine.runtime, "capture_graphs", None)
    if capture is not None:
        capture()
    session = engine.new_session()
    try:
        session.feed(0.05 * torch.randn(SAMPLE_RATE, generator=torch.Generator().manual_seed(0)))  # (16000,)
    finally:
        session.close()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml", help="inference YAML with duplex: and server: blocks (duplex/duplex_tiny.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--checkpoint", help="save folder (CKPT+* averaged) or one CKPT folder; default: YAML")
    parser.add_argument("--device", help="cpu or cuda[:N]; default: the YAML's device")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: the YAML's precision")
    parser.add_argument("--max-connections", type=int, help="default: server.max_connections")
    parser.add_argument("--idle-timeout", type=float, help="seconds; default: server.idle_timeout_s")
    parser.add_argument("--silence-dbfs", type=float, help="energy gate; default: server.silence_threshold_dbfs")
    parser.add_argument("--persist-dir", help="snapshot live conversations here on SIGTERM and restore them on "
                                              "start; default: server.persist_dir (none)")
    parser.add_argument("--snapshot-every", type=int, help="with --persist-dir: also snapshot each conversation "
                                                           "every N slices (bounds what kill -9 loses); default: "
                                                           "server.snapshot_every_slices")
    parser.add_argument("--ssl-cert", help="PEM certificate: serve https/wss (browsers give the microphone only "
                                           "to https pages or localhost)")
    parser.add_argument("--ssl-key", help="PEM private key for --ssl-cert")
    return parser.parse_args(argv)


def _config_with_flags(config: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    flags = {"max_connections": args.max_connections, "idle_timeout_s": args.idle_timeout,
             "silence_threshold_dbfs": args.silence_dbfs, "persist_dir": args.persist_dir,
             "snapshot_every_slices": args.snapshot_every}
    return dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})


def _ssl_context(args: argparse.Namespace):
    if not args.ssl_cert and not args.ssl_key:
        return None
    if not (args.ssl_cert and args.ssl_key):
        raise ValueError("--ssl-cert and --ssl-key go together: give both PEM files, or neither for plain http.")
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.ssl_cert, args.ssl_key)
    return context


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is reported at once, not a minute later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}); is another server running "
                      "there? choose another --port or --host.") from error


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    from duplex.engine import load_engine
    sock = None
    try:
        config = _config_with_flags(read_server_config(args.yaml), args)
        ssl_context = _ssl_context(args)
        sock = listen_socket(args.host, args.port)
        engine = load_engine(args.yaml, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                             state_rows=rows_needed(config.max_connections))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        if sock is not None:
            sock.close()
        return 2
    if not _is_loopback(args.host):
        log.warning("binding to %s: anyone who can reach this address can use the model (no authentication)",
                    args.host)
    try:
        server = DuplexServer(engine, config, name=pathlib.Path(args.yaml).name, bound_host=args.host)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sock.close()
        return 2
    web.run_app(server.make_app(), sock=sock, ssl_context=ssl_context, print=log.info, access_log_class=AccessLogger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
