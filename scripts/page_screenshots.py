"""Screenshots of the microphone page for docs/server.md: idle, and mid-conversation with the embedded demo model.

    python scripts/page_screenshots.py [--out docs] [--rows 5]

Serves the page on the demo model (duplex/duplex_demo.yaml, CPU) on a free loopback port and opens it in headless
Chromium (tests/browser.py) whose fake microphone plays a question, background talk and silence
(example/*.wav); writes page_idle.png and page_conversation.png.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import wave

import torch
from aiohttp import web

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.engine import load_engine  # noqa: E402
from duplex.server import DuplexServer, ServerConfig  # noqa: E402
from src.audio import load_audio  # noqa: E402
from tests.browser import chromium  # noqa: E402

MICROPHONE = ("question_capital.wav", "ignore_dinner.wav")


def microphone_wav(path: pathlib.Path) -> pathlib.Path:
    pieces = [load_audio(ROOT / "example" / name) for name in MICROPHONE] + [torch.zeros(9 * 16000)]
    wav = torch.cat(pieces)  # (N,) 16 kHz
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes((wav.clamp(-1, 1) * 32767).round().numpy().astype("<i2").tobytes())
    return path


async def shoot(out: pathlib.Path, rows: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    engine = load_engine(ROOT / "duplex" / "duplex_demo.yaml")
    runner = web.AppRunner(DuplexServer(engine, ServerConfig(), name="demo").make_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = pathlib.Path(scratch)
            async with chromium(scratch / "profile", microphone_wav(scratch / "mic.wav")) as page:
                await page.goto(f"http://127.0.0.1:{port}/")
                await page.screenshot(out / "page_idle.png")
                await page.click("start")
                await page.wait_for(f"document.querySelectorAll('#timeline tr').length >= {rows}", 120,
                                    f"{rows} slices")
                await page.screenshot(out / "page_conversation.png")
                await page.click("stop")
                await page.wait_for("document.getElementById('status').textContent.startsWith('Disconnected')", 120,
                                    "the conversation")
    finally:
        await runner.cleanup()
    print(f"wrote {out / 'page_idle.png'} and {out / 'page_conversation.png'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs (default docs/)")
    parser.add_argument("--rows", type=int, default=5, help="timeline rows before the mid-conversation shot")
    args = parser.parse_args(argv)
    asyncio.run(shoot(pathlib.Path(args.out), args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
