"""Stream an audio file to a duplex server and print its events as they arrive.

    python -m duplex.server duplex/duplex_tiny.yaml &
    python -m duplex.client example/question_capital.wav --url ws://127.0.0.1:8765/ws --realtime

The file (any rate and channel count, read with ``src.audio.load_audio``) is sent as 16 kHz PCM16 in chunks,
followed by ``--silence`` seconds of digital silence (so the server's energy gate sees the user stop, as a
microphone would), then ``{"type": "end"}``; the server answers with the final reply and the conversation,
which is printed last. ``--realtime`` paces the chunks at the speed of speech; without it the file is sent as
fast as the server reads it. A lost connection is resumed with the conversation's token (``--reconnects``), and
nothing is lost or doubled. Protocol: docs/server.md.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
import torch

# Imported here, not at the first frame: a lazy import would run inside the timed stream and inflate the
# latency figure of --realtime (the first slice's event would wait for it).
from duplex_inference import format_row
from src.audio import load_audio

SAMPLE_RATE = 16000


def encode_pcm16(wav: torch.Tensor) -> bytes:
    """float samples (N,) -> little-endian PCM16 bytes, clipped to full scale (no wrap-around, unlike spec §8.6)."""
    scaled = torch.clamp(wav.reshape(-1).float(), -1.0, 1.0) * 32767.0  # (N,)
    return scaled.round().numpy().astype("<i2").tobytes()


# Close codes by which the server ends a conversation on purpose (docs/server.md): no reconnect after them.
FINAL_CLOSE_CODES = {1000, 1009, 1011, 1013, 4001}


async def stream(url: str, wav: torch.Tensor, *, sample_rate: int = SAMPLE_RATE, chunk_seconds: float = 0.1,
                 silence_seconds: float = 0.0, realtime: bool = False, seed: int | None = None,
                 on_frame=None, arrivals: list[float] | None = None, reconnects: int = 3,
                 reconnect_delay: float = 0.5) -> list[dict]:
    """Send ``wav`` (N,) at ``sample_rate``, then silence, then ``end``; return every JSON frame received (and a
    ``{"type": "reconnecting"}`` frame of the client's own where a connection was lost).

    ``on_frame(frame)`` is called for each frame as it arrives (printing, a UI); ``arrivals``, when given,
    gets each frame's arrival time in seconds since the stream began (latency measurements).
    A connection lost before the conversation frame (a network drop, a server restart) is resumed up to
    ``reconnects`` times with the conversation's token (protocol 2): the server says how much audio it has, the
    rest is sent again, and no slice is lost or doubled. Returns when the server closes for good.
    """
    silence = torch.zeros(int(round(silence_seconds * sample_rate)))  # (S,)
    audio = torch.cat([wav.reshape(-1).float(), silence])  # (N + S,)
    chunk = max(1, int(round(chunk_seconds * sample_rate)))
    start = {"type": "start", "sample_rate": sample_rate, **({} if seed is None else {"seed": seed})}
    frames: list[dict] = []
    began = time.monotonic()  # time zero of the stream: the start frame, audio follows at once
    record = _stamped(on_frame, arrivals, began)
    token, dropped = None, 0
    async with aiohttp.ClientSession() as http:
        while True:
            target = url if token is None else f"{url}?resume={token}&last_slice={_last_slice(frames)}"
            try:
                async with http.ws_connect(target, max_msg_size=0) as ws:
                    ready = await _first_frame(ws, frames, record)
                    token = token or ready.get("token")
                    if ready.get("type") == "ready":
                        await _converse(ws, audio, chunk, sample_rate, began if realtime else None, frames, record,
                                        start=None if ready.get("resumed") else start,
                                        offset=int(ready.get("received_samples", 0)))
                    code = ws.close_code
            except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError, ConnectionError):
                if token is None:
                    raise  # never connected: nothing to resume
                code = None
            finished = any(frame.get("type") == "conversation" for frame in frames)
            if finished or code in FINAL_CLOSE_CODES or token is None or dropped >= reconnects:
                return frames
            dropped += 1
            note = {"type": "reconnecting", "attempt": dropped, "close_code": code}  # the client's own frame
            frames.append(note)
            record(note)
            await asyncio.sleep(reconnect_delay)


def _last_slice(frames: list[dict]) -> int:
    """The slice_index of the last slice frame received (-1: none), as a resume asks for what follows it."""
    return max((frame["slice_index"] for frame in frames if frame.get("type") == "slice"), default=-1)


async def _first_frame(ws, frames: list[dict], record) -> dict:
    """The server's first frame: `ready` (fresh or resumed), or the `error` of a refusal."""
    message = await ws.receive()
    if message.type != aiohttp.WSMsgType.TEXT:
        return {}
    frame = message.json()
    frames.append(frame)
    record(frame)
    return frame


async def _converse(ws, audio, chunk, sample_rate, realtime_from, frames, record, *, start, offset) -> None:
    """One connection's share: `start` (fresh only), the audio from sample `offset` on, `end`; frames until the
    server closes or the connection is lost."""
    receiver = asyncio.create_task(_receive(ws, frames, record))
    try:
        if start is not None:
            await ws.send_json(start)
        await _send_audio(ws, audio, offset, chunk, sample_rate, realtime_from, receiver)
    except ConnectionError:
        pass  # lost while sending: the receiver sees the end of the socket too
    await receiver


async def _send_audio(ws, audio: torch.Tensor, offset: int, chunk: int, sample_rate: int,
                      realtime_from: float | None, receiver: asyncio.Task) -> None:
    """PCM16 frames of ``audio[offset:]``, paced from ``realtime_from`` (a monotonic time; a chunk leaves once its
    last sample has been "recorded", so re-sent audio goes at once) or as fast as possible, then ``end``."""
    for first in range(offset, audio.numel(), chunk):
        if receiver.done():
            return  # the server closed (full, idle, error) or the connection is gone
        piece = audio[first:first + chunk]  # (<= chunk,)
        if realtime_from is not None:  # as a microphone
            await asyncio.sleep(max(0.0, realtime_from + (first + piece.numel()) / sample_rate - time.monotonic()))
        await ws.send_bytes(encode_pcm16(piece))
    if not receiver.done():
        await ws.send_json({"type": "end"})


def _stamped(on_frame, arrivals: list[float] | None, began: float):
    """A frame callback that also records arrival times (seconds since ``began``) into ``arrivals``."""
    def record(frame: dict) -> None:
        if arrivals is not None:
            arrivals.append(time.monotonic() - began)
        if on_frame is not None:
            on_frame(frame)
    return record


async def _receive(ws, frames: list[dict], on_frame) -> None:
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        frame = message.json()
        frames.append(frame)
        on_frame(frame)


def print_frame(frame: dict) -> None:
    """The two-column console line of duplex_inference.py for slices; the transcript; errors to stderr."""
    kind = frame.get("type")
    if kind == "slice":
        print(format_row(frame, None), flush=True)
    elif kind == "conversation":
        print("\n" + frame["text"], flush=True)
    elif kind == "ready":
        verb = "resumed" if frame.get("resumed") else "connected"
        print(f"{verb}: protocol {frame['protocol']}, slices of {frame['slice_seconds']} s", flush=True)
    elif kind == "reconnecting":
        print(f"connection lost (close code {frame['close_code']}); reconnecting, attempt {frame['attempt']}",
              file=sys.stderr, flush=True)
    elif kind == "error":
        print(f"server error: {frame['message']}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", help="audio file to stream (wav, flac, ogg; any rate, any channels)")
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="server WebSocket URL")
    parser.add_argument("--realtime", action="store_true", help="send at the speed of speech")
    parser.add_argument("--silence", type=float, default=6.0, help="seconds of silence sent after the file "
                                                                   "(default 6: two 3 s slices)")
    parser.add_argument("--chunk-ms", type=float, default=100.0, help="audio per binary frame (default 100)")
    parser.add_argument("--seed", type=int, help="sampling seed of this conversation (default: the server's)")
    parser.add_argument("--reconnects", type=int, default=3,
                        help="times a lost connection is resumed with the conversation's token (default 3; 0: none)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        wav = load_audio(args.audio)  # (N,) 16 kHz mono
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{'#':>4} {'time':>7}  {'USER':<48}| ASSISTANT")
    arrivals: list[float] = []
    try:
        frames = asyncio.run(stream(args.url, wav, chunk_seconds=args.chunk_ms / 1000, silence_seconds=args.silence,
                                    realtime=args.realtime, seed=args.seed, on_frame=print_frame,
                                    arrivals=arrivals, reconnects=args.reconnects))
    except (aiohttp.ClientError, OSError) as error:
        print(f"error: cannot talk to {args.url} ({error}); is `python -m duplex.server` running?", file=sys.stderr)
        return 2
    if args.realtime:
        print(describe_latency(slice_latencies(frames, arrivals)))
    return 0 if any(frame.get("type") == "conversation" for frame in frames) else 1


def slice_latencies(frames: list[dict], arrivals: list[float]) -> list[float]:
    """Seconds from the end of each live slice (as sent in real time) to the arrival of its event."""
    return [arrival - (frame["start_s"] + frame["duration_s"]) for frame, arrival in zip(frames, arrivals)
            if frame.get("type") == "slice" and frame["input"] != "final"]


def describe_latency(latencies: list[float]) -> str:
    if not latencies:
        return "latency: no live slice was answered"
    ordered = sorted(latencies)
    return (f"latency from the end of a slice to its event over {len(ordered)} slices: "
            f"median {ordered[len(ordered) // 2]:.3f} s, max {ordered[-1]:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
