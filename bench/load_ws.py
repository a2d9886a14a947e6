"""WebSocket load benchmark: N paced real-time clients against a duplex server on the loopback.

    python bench/load_ws.py --yaml duplex/duplex_demo.yaml --clients 1 4 8 --seconds 30         # CPU
    python bench/load_ws.py --yaml duplex/duplex_demo.yaml --device cuda --clients 16 64 256 --seconds 60

For each N the script starts ``python -m duplex.server`` on 127.0.0.1 (a free port, ``--max-connections N``),
waits for ``/health``, and runs N clients in one asyncio process. Each client streams a script of the example
recordings (a question, silence for the reply, background talk, an interruption, silence) as 16 kHz PCM16 in
100 ms frames, paced like a microphone (a frame leaves once all of it has been "recorded"), starting at a
random offset within one slice so that slices do not all complete at once. ``--url`` measures a server that
is already running instead (loopback addresses only).

Measured per N:
* slice latency: arrival of a slice's event minus the moment its last sample left the client (p50, p99, max);
* send lateness: how late each frame left against its real-time schedule (the client side keeping up, p99);
* refused connections (close 1013) and failed ones; the server's own /health figures at the end (tick time
  p50/p99, its latency p50/p99).

Bounded: at most 512 clients and 600 s per N; loopback only. Results: bench/results/load_ws_<tag>.json and a
markdown table on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import pathlib
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import torch  # noqa: E402

from duplex.client import encode_pcm16  # noqa: E402
from src.audio import load_audio  # noqa: E402

RATE = 16000
CHUNK_SECONDS = 0.1
MAX_CLIENTS, MAX_SECONDS = 512, 600
SCRIPT = [("question_capital.wav", 0), (None, 6), ("ignore_dinner.wav", 0), (None, 3), ("question_math.wav", 0),
          ("interrupt_mountain.wav", 0), (None, 6), ("question_spider.wav", 0), (None, 6)]


def script_audio() -> torch.Tensor:
    """One pass of the scripted conversation as (N,) float samples (about 40 s)."""
    pieces = [torch.zeros(int(seconds * RATE)) if name is None else load_audio(ROOT / "example" / name)
              for name, seconds in SCRIPT]
    return torch.cat(pieces)


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


async def run_client(url: str, audio: torch.Tensor, seconds: float, offset: float, result: dict) -> None:
    """Stream ``seconds`` of ``audio`` (looped) in real time after ``offset`` s; record latencies and lateness."""
    await asyncio.sleep(offset)
    total = int(seconds * RATE)
    stream = audio.repeat(total // audio.numel() + 1)[:total]
    chunk = int(CHUNK_SECONDS * RATE)
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, max_msg_size=0)
        except aiohttp.ClientError as error:
            result["failed"] = f"{type(error).__name__}: {error}"
            return
        async with ws:
            ready = await ws.receive()
            frame = json.loads(ready.data) if ready.type == aiohttp.WSMsgType.TEXT else {}
            if frame.get("type") != "ready":
                result["refused"] = frame.get("message", str(ready.type))
                return
            began = time.monotonic()
            receiver = asyncio.create_task(receive(ws, began, result))
            await ws.send_json({"type": "start", "sample_rate": RATE})
            for start in range(0, total, chunk):
                due = began + (start + chunk) / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                result["lateness"].append(time.monotonic() - due)
                if receiver.done():
                    break
                await ws.send_bytes(encode_pcm16(stream[start:start + chunk]))
            if not receiver.done():
                await ws.send_json({"type": "end"})
            await asyncio.wait_for(receiver, 120)


async def receive(ws, began: float, result: dict) -> None:
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        frame = json.loads(message.data)
        if frame["type"] == "slice" and frame["input"] != "final":
            sent_end = began + frame["start_s"] + frame["duration_s"]
            result["latency"].append(time.monotonic() - sent_end)
        elif frame["type"] == "error":
            result.setdefault("errors", []).append(frame["message"])


async def run_load(url: str, clients: int, seconds: float, seed: int, stagger_s: float = 3.0) -> dict:
    """Run ``clients`` clients, each starting at a random offset in [0, ``stagger_s``) (one slice by default)."""
    audio = script_audio()
    rng = random.Random(seed)
    results = [{"latency": [], "lateness": []} for _ in range(clients)]
    await asyncio.gather(*(run_client(url, audio, seconds, rng.uniform(0, stagger_s), result)
                           for result in results))
    latency = [x for r in results for x in r["latency"]]
    lateness = [x for r in results for x in r["lateness"]]
    return {
        "clients": clients, "seconds": seconds, "slices": len(latency),
        "latency_s": {"p50": percentile(latency, 0.5), "p99": percentile(latency, 0.99), "max": max(latency, default=None)},
        "send_lateness_s": {"p50": percentile(lateness, 0.5), "p99": percentile(lateness, 0.99),
                            "max": max(lateness, default=None)},
        "refused": sum("refused" in r for r in results), "failed": sum("failed" in r for r in results),
        "errors": sorted({e for r in results for e in r.get("errors", [])})[:5],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, clients: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "duplex.server", args.yaml, "--host", "127.0.0.1", "--port", str(port),
               "--max-connections", str(clients)]
    for flag in ("device", "precision", "checkpoint"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    log = open(args.out_dir / f"load_ws_server_{clients}.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


async def wait_healthy(base: str, process: subprocess.Popen | None, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready (see its log)")
            try:
                async with http.get(base + "/health") as response:
                    return await response.json()
            except aiohttp.ClientError:
                await asyncio.sleep(0.5)
    raise RuntimeError(f"no /health from {base} in {timeout:g} s")


def check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise SystemExit(f"--url {url}: this benchmark only runs against a server on the loopback (127.0.0.1).")


def measure(args, clients: int) -> dict:
    process = None
    if args.url:
        base = args.url.replace("ws://", "http://").rsplit("/ws", 1)[0]
    else:
        process, base = start_server(args, clients)
    try:
        before = asyncio.run(wait_healthy(base, process))
        began = time.monotonic()
        result = asyncio.run(run_load(base.replace("http://", "ws://") + "/ws", clients, args.seconds, args.seed))
        result["wall_s"] = time.monotonic() - began
        result["server_health"] = asyncio.run(wait_healthy(base, process))
        result["server_model"] = before.get("model"), before.get("device")
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    return result


def row(r: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{1000 * value:.0f}"
    health = r["server_health"]
    step = health.get("step_ms") or {}
    return (f"| {r['clients']} | {r['slices']} | {ms(r['latency_s']['p50'])} | {ms(r['latency_s']['p99'])} | "
            f"{ms(r['latency_s']['max'])} | {ms(r['send_lateness_s']['p99'])} | {r['refused']} | "
            f"{step.get('p50') and round(step['p50'])} / {step.get('p99') and round(step['p99'])} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yaml", default="duplex/duplex_demo.yaml", help="inference YAML the server loads")
    parser.add_argument("--url", help="measure a running server instead (ws://127.0.0.1:PORT/ws; loopback only)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="numbers of clients to run")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio each client streams (per N)")
    parser.add_argument("--device"), parser.add_argument("--precision"), parser.add_argument("--checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="start offsets")
    parser.add_argument("--tag", help="results file suffix (default: cpu or the GPU name)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if any(not 1 <= n <= MAX_CLIENTS for n in args.clients) or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    if args.url:
        check_loopback(args.url)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("cpu" if (args.device or "cpu") == "cpu" else torch.cuda.get_device_name().replace(" ", "_"))
    runs = [measure(args, n) for n in args.clients]
    report = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
              "yaml": args.yaml, "host": platform.node(), "cpus": os.cpu_count(), "runs": runs}
    path = args.out_dir / f"load_ws_{tag}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("| clients | slices | latency p50 ms | p99 ms | max ms | send lateness p99 ms | refused | server tick p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(row(r))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
