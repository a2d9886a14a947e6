"""Serve DuplexMamba over WebSocket: one duplex conversation per connection, one shared model.

    python -m duplex.server duplex/duplex_tiny.yaml --host 127.0.0.1 --port 8765
    python -m duplex.server duplex/duplex.yaml --checkpoint SAVE_DIR --precision bf16

Then open http://127.0.0.1:8765/ (microphone page), or stream a file with
``python -m duplex.client example/question_capital.wav``. The protocol (versioned) is in docs/server.md.

Why it is built this way (the reference's Gradio demo, spec §6.4 / §8.5-6, shared one global conversation
between all browsers, never sent silence, so it could neither force a reply nor be interrupted):

* each WebSocket owns a ``DuplexSession`` (its states, generators, transcript); the weights, the speech
  encoder and the tokenizer are loaded once in an ``Engine`` and shared;
* the audio stream is cut into slices of the YAML's ``slice_seconds``; an energy gate (slice RMS in dBFS
  below ``server.silence_threshold_dbfs``) turns quiet slices into ``None``, which is what lets the session
  force a reply when the user stops talking and barge in while it is answering;
* every model call runs on one worker thread (``ModelWorker``), never on the event loop, so sockets stay
  responsive while a slice is encoded and decoded.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import ipaddress
import json
import logging
import math
import pathlib
import socket
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from aiohttp import WSMsgType, web

from src.audio import SAMPLE_RATE, to_mono_16k

PROTOCOL_VERSION = 1
STATIC_DIR = pathlib.Path(__file__).with_name("static")
MIN_CLIENT_RATE, MAX_CLIENT_RATE = 8000, 192000
MAX_SEED = 2**63 - 1  # the session seeds two generators, seed and seed + 1; both must fit torch's 64 bits
START_KEYS = frozenset({"type", "sample_rate", "seed", "protocol"})
CLOSE_TRY_AGAIN_LATER = 1013  # WebSocket close code: server full
CLOSE_INTERNAL_ERROR = 1011

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

    def __post_init__(self):
        if self.max_connections < 1 or self.idle_timeout_s <= 0 or self.max_frame_bytes < 2:
            raise ValueError("ServerConfig: max_connections must be >= 1, idle_timeout_s > 0 and max_frame_bytes "
                             f">= 2; got {self.max_connections}, {self.idle_timeout_s}, {self.max_frame_bytes}.")
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


# ---------------------------------------------------------------------------------------------- model worker
class ModelWorker:
    """Runs every model call of every connection on one thread, one call at a time, in arrival order.

    The single thread is the lock: the shared weights (and the GPU backend's state pool) are touched by one
    call at a time, and the event loop never blocks on the model. To batch later, replace ``call`` by a queue
    that gathers the pending ``feed``s of several sessions into one runtime call; callers stay unchanged.
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-model")

    async def call(self, function, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------- sending
class ClientTooSlow(ConnectionError):
    """The client does not take its frames (never reads, or reads slower than the server produces)."""


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
            self._abort(f"{self._queue.qsize()} frames waiting: the client does not read")
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
                self._abort(f"one frame took over {self.timeout:g} s to send: the client does not read")
                return
            except ConnectionError:  # the client left; its frames are dropped
                return

    def _abort(self, reason: str) -> None:
        self.failure = reason
        log.info("dropping a connection: %s", reason)
        if self.transport is not None:
            self.transport.abort()  # the handler's receive() then returns CLOSED


# ---------------------------------------------------------------------------------------------- one conversation
class Conversation:
    """One WebSocket connection: its ``DuplexSession`` (made at the first start/audio frame) and its audio buffer."""

    def __init__(self, outbox: Outbox, engine, worker: ModelWorker, config: ServerConfig):
        self.outbox, self.engine, self.worker, self.config = outbox, engine, worker, config
        self.cutter = SliceCutter(engine.config.slice_seconds)
        self.session = None
        self._seed: int | None = None
        self._started = False  # a valid start frame was received

    async def on_text(self, text: str) -> bool:
        """Handle a JSON control frame; False when the conversation is over."""
        message = _parse_control(text)
        if message["type"] == "start":
            self._start(message)
            return True
        await self.end()
        return False

    async def on_audio(self, data: bytes) -> None:
        samples = decode_pcm16(data)  # (N,)
        for piece in self.cutter.push(samples):
            await self._feed(piece)

    async def end(self) -> None:
        """The user is done: the buffered remainder, the final reply, then the conversation text."""
        rest = self.cutter.flush()
        if rest is not None:
            await self._feed(rest)
        session = await self._session()
        for event in await self.worker.call(session.finish):
            self.outbox.put({"type": "slice", **event.to_json()})
        self.outbox.put({"type": "conversation", "text": session.conversation_text()})

    async def close(self) -> None:
        """Give the session's states back; shielded, so it still runs when aiohttp cancels a handler whose
        client vanished (a skipped close would leak the GPU backend's pool rows)."""
        if self.session is not None:
            await asyncio.shield(self.worker.call(self.session.close))

    def _start(self, message: dict) -> None:
        unknown = sorted(set(message) - START_KEYS)
        if unknown:
            raise ProtocolError(f"start frame: unknown key(s) {unknown}; known keys: {sorted(START_KEYS)}.")
        if self._started:
            raise ProtocolError("a second start frame: a conversation takes one, before any audio; its settings "
                                "stay as the first one said.")
        if self.session is not None or self.cutter.received:
            raise ProtocolError("start frame after the conversation began: send it first, before any audio.")
        version = message.get("protocol", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
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
        self.cutter.sample_rate, self._seed, self._started = rate, seed, True

    async def _session(self):
        if self.session is None:
            overrides = {} if self._seed is None else {"seed": self._seed}
            self.session = await self.worker.call(self.engine.new_session, **overrides)
        return self.session

    async def _feed(self, samples: torch.Tensor) -> None:
        """Gate one slice (client rate), feed it to the session, send its events."""
        duration = samples.numel() / self.cutter.sample_rate
        wav = gate_slice(samples, self.cutter.sample_rate, self.config.silence_threshold_dbfs)  # (N',) or None
        session = await self._session()
        for event in await self.worker.call(session.feed, wav, duration_s=duration):
            self.outbox.put({"type": "slice", **event.to_json()})


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

    Between slices a session holds at most two branches (speaker, listener); inside a ``feed`` the state-token
    probe forks a third, released before the call returns. Calls run one at a time (``ModelWorker``), so at
    most one probe exists: 2 rows per conversation + 1.
    """
    return 2 * max_connections + 1


def check_state_pool(runtime, max_connections: int) -> None:
    """Refuse a ``max_connections`` the runtime's state pool (GPU backend: ``max_rows``) cannot serve."""
    rows = getattr(runtime, "max_rows", None)  # the CPU runtime allocates freely: no limit
    if rows is not None and rows < rows_needed(max_connections):
        fits = (rows - 1) // 2
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
        self.worker: ModelWorker | None = None  # made with the app, shut down with it
        self.active = 0  # open conversations

    def make_app(self) -> web.Application:
        self.worker = ModelWorker()
        app = web.Application(middlewares=[self._check_host])
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ws", self.websocket)
        app.router.add_static("/static", STATIC_DIR)
        app.on_startup.append(self._warmup)
        app.on_cleanup.append(self._shutdown)
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
            "connections": self.active, "max_connections": self.config.max_connections,
            "sample_rate": SAMPLE_RATE, "slice_seconds": self.engine.config.slice_seconds,
            "silence_threshold_dbfs": self.config.silence_threshold_dbfs,
            "device": str(getattr(self.engine.runtime, "device", "cpu")),
        })

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
        if self.active >= self.config.max_connections:
            outbox.error(f"server full: {self.active} conversations of {self.config.max_connections} are open; "
                         "try again later.")
            await outbox.close(CLOSE_TRY_AGAIN_LATER)
            return ws
        self.active += 1
        log.info("conversation opened by %s (%d of %d)", request.remote, self.active, self.config.max_connections)
        conversation = Conversation(outbox, self.engine, self.worker, self.config)
        try:
            outbox.put(self._ready_frame())
            code = await self._serve(ws, conversation)
            await outbox.close(code)
        finally:
            outbox.cancel()
            self.active -= 1
            log.info("conversation of %s closed after %.1f s of audio%s", request.remote,
                     conversation.cutter.received / conversation.cutter.sample_rate,
                     f" ({outbox.failure})" if outbox.failure else "")
            await conversation.close()
        return ws

    async def _serve(self, ws: web.WebSocketResponse, conversation: Conversation) -> int:
        """Receive frames until ``end``, a close, the idle timeout or an engine failure; the close code.

        Only audio and text frames are activity: pings (answered by aiohttp inside ``receive``) do not keep a
        connection open, so the idle deadline bounds the whole wait, not each frame."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.idle_timeout_s
        while not ws.closed:
            try:
                message = await asyncio.wait_for(ws.receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                conversation.outbox.error(f"no audio or text frame for {self.config.idle_timeout_s:g} s: closing "
                                          "the conversation.")
                break
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break  # CLOSE / CLOSING / CLOSED / ERROR (e.g. a frame over max_frame_bytes: close 1009)
            deadline = loop.time() + self.config.idle_timeout_s
            try:
                if message.type == WSMsgType.BINARY:
                    await conversation.on_audio(message.data)
                elif not await conversation.on_text(message.data):
                    break
            except ProtocolError as error:
                conversation.outbox.error(str(error))
            except Exception as error:  # an engine failure ends this conversation, never the server
                log.exception("conversation failed")
                conversation.outbox.error(f"internal error: {type(error).__name__}: {error}")
                return CLOSE_INTERNAL_ERROR
        return 1000

    def _ready_frame(self) -> dict:
        return {"type": "ready", "protocol": PROTOCOL_VERSION, "sample_rate": SAMPLE_RATE,
                "slice_seconds": self.engine.config.slice_seconds,
                "silence_threshold_dbfs": self.config.silence_threshold_dbfs}

    async def _warmup(self, app: web.Application) -> None:
        if self.warm_up:
            log.info("warming up the model")
            await self.worker.call(warmup, self.engine)  # on the worker: every model call runs on that thread

    async def _shutdown(self, app: web.Application) -> None:
        self.worker.shutdown()


# ---------------------------------------------------------------------------------------------- command line
def warmup(engine) -> None:
    """One throw-away slice so the first user does not pay for lazy initialisation (any device)."""
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
    parser.add_argument("--ssl-cert", help="PEM certificate: serve https/wss (browsers give the microphone only "
                                           "to https pages or localhost)")
    parser.add_argument("--ssl-key", help="PEM private key for --ssl-cert")
    return parser.parse_args(argv)


def _config_with_flags(config: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    flags = {"max_connections": args.max_connections, "idle_timeout_s": args.idle_timeout,
             "silence_threshold_dbfs": args.silence_dbfs}
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
    web.run_app(server.make_app(), sock=sock, ssl_context=ssl_context, print=log.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
