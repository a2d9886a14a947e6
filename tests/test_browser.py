"""The microphone page in a real browser: headless Chromium (Debian's `chromium`, installed by .ci/run) with a fake
microphone playing a wav, driven through the DevTools protocol (tests/browser.py).

* the page connects, streams, and its timeline shows exactly the slices that the audio it sent gives through
  duplex/client.py (the page's WebSocket sends are recorded in the page, then replayed by the client);
* Stop shows the conversation, and the level meter is back to idle (no "-728 dBFS");
* a full server's refusal is shown on the page;
* Reconnect continues with the ready frame's token (`/ws?resume=TOKEN&last_slice=K`, docs/server.md
  "Reconnecting"), re-sends the audio the server did not receive and keeps the timeline; a refused resume
  leaves only Start (against a stand-in server that speaks that part of the protocol).

Set PAGE_SCREENSHOTS=folder to keep screenshots of the page (idle, mid-conversation); scripts/page_screenshots.py
makes the ones in docs/.
"""
import asyncio
import base64
import dataclasses
import json
import os
import pathlib
import wave

import numpy as np
import pytest
import torch
from aiohttp import WSMsgType, web

from duplex.client import stream
from duplex.server import STATIC_DIR, DuplexServer, ServerConfig
from src.audio import load_audio
from tests.browser import chromium, find_chromium

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "duplex" / "duplex_tiny.yaml"

# Local runs without chromium skip; CI (.ci/run sets DUPLEX_REQUIRE_BROWSER) fails instead.
pytestmark = [pytest.mark.skipif(find_chromium() is None and not os.environ.get("DUPLEX_REQUIRE_BROWSER"),
                                 reason="chromium is not installed (CI installs it: .ci/run; locally: "
                                        "apt-get install chromium)"),
              pytest.mark.slow]

# Every WebSocket.send of the page, recorded before the page's own scripts run: text as is, binary as base64.
RECORD_SENDS = """
window.__sent = [];
const __send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (typeof data === "string") window.__sent.push({ text: data });
  else {
    let chars = "";
    for (const byte of new Uint8Array(data)) chars += String.fromCharCode(byte);
    window.__sent.push({ binary: btoa(chars) });
  }
  return __send.call(this, data);
};
"""

# The timeline as the page shows it: one object per row.
READ_ROWS = """Array.from(document.querySelectorAll("#timeline tr")).map((row) => ({
  n: row.cells[0].textContent, t: row.cells[1].textContent, user: row.cells[2].textContent,
  tags: Array.from(row.cells[3].querySelectorAll(".tag")).map((tag) => tag.textContent),
  text: Array.from(row.cells[3].childNodes).filter((node) => node.nodeType === 3).map((node) => node.textContent)
    .join("")}))"""
STATE_NAMES = {"<|endofuser|>": "respond", "<|incomplete|>": "incomplete", "<|ignore|>": "ignore"}


@pytest.fixture(scope="module")
def engine():
    from duplex.engine import load_engine
    loaded = load_engine(TINY_YAML)
    return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, max_branch_tokens=64))


def expected_row(frame: dict) -> dict:
    """How app.js's addRow shows a slice frame (kept in step with it by this test)."""
    if frame["input"] == "speech":
        state = "" if frame["state_token"] is None else \
            f"[{STATE_NAMES.get(frame['state_token'], frame['state_token'])}] "
        user = f"speech {state}({frame['speech_positions']} pos)"
    else:
        user = "(silence)" if frame["input"] == "silence" else "(end of input)"
    return {"n": str(frame["slice_index"]), "t": f"{frame['start_s']:.1f} s", "user": user,
            "tags": frame["changes"], "text": frame["text"]}


def microphone_wav(path: pathlib.Path) -> pathlib.Path:
    """A question, then 7 s of silence (the fake microphone loops it): speech, then silence forcing a reply."""
    wav = torch.cat([load_audio(ROOT / "example" / "question_capital.wav"), torch.zeros(7 * 16000)])  # (N,)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes((wav.clamp(-1, 1) * 32767).round().numpy().astype("<i2").tobytes())
    return path


async def serve(app: web.Application):
    """Serve ``app`` on a free loopback port; returns (runner, port)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def sent_audio(sent: list[dict]) -> tuple[list[dict], torch.Tensor]:
    """The page's control frames and its audio as floats that duplex.client re-encodes to the same PCM16."""
    controls = [json.loads(item["text"]) for item in sent if "text" in item]
    pcm = b"".join(base64.b64decode(item["binary"]) for item in sent if "binary" in item)
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32)  # the page clips to +-32767
    return controls, torch.from_numpy(samples / 32767.0)


def screenshot_folder() -> pathlib.Path | None:
    folder = os.environ.get("PAGE_SCREENSHOTS")
    return pathlib.Path(folder) if folder else None


async def converse(page, port: int, rows: int, shots: pathlib.Path | None = None) -> dict:
    """Load the page, Start, wait for ``rows`` timeline rows, Stop, wait for the conversation; what it showed."""
    await page.send("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_SENDS})
    await page.goto(f"http://127.0.0.1:{port}/")
    if shots:
        await page.screenshot(shots / "page_idle.png")
    await page.click("start")
    await page.wait_for(f"document.querySelectorAll('#timeline tr').length >= {rows}", 90, f"{rows} slices")
    level_while_talking = await page.evaluate("document.getElementById('dbfs').textContent")
    if shots:
        await page.screenshot(shots / "page_conversation.png")
    await page.click("stop")
    await page.wait_for("!document.getElementById('conversation').textContent.startsWith('(appears')", 90,
                        "the conversation after Stop")
    await page.wait_for("document.getElementById('status').textContent.startsWith('Disconnected')", 30,
                        "the server closing")
    shown = await page.evaluate(f"""({{rows: {READ_ROWS}, sent: window.__sent,
        conversation: document.getElementById("conversation").textContent,
        error: document.getElementById("error").textContent,
        meter: document.getElementById("level").value, dbfs: document.getElementById("dbfs").textContent,
        reconnect_hidden: document.getElementById("reconnect").hidden}})""")
    return {**shown, "level_while_talking": level_while_talking}


def test_the_page_shows_what_the_client_gets_for_the_same_audio(engine, tmp_path):
    async def run():
        runner, port = await serve(DuplexServer(engine, ServerConfig(), name="tiny").make_app())
        try:
            async with chromium(tmp_path / "profile", microphone_wav(tmp_path / "mic.wav")) as page:
                shown = await converse(page, port, rows=3, shots=screenshot_folder())
                console = list(page.devtools.console)
            controls, audio = sent_audio(shown["sent"])
            rate = controls[0]["sample_rate"]
            frames = await stream(f"ws://127.0.0.1:{port}/ws", audio, sample_rate=rate, chunk_seconds=0.1)
        finally:
            await runner.cleanup()
        return shown, console, controls, rate, audio, frames

    shown, console, controls, rate, audio, frames = asyncio.run(run())
    assert controls[0]["type"] == "start" and controls[-1] == {"type": "end"} and len(controls) == 2
    assert rate == 16000 and audio.numel() > 3 * rate
    assert not [line for line in console if line.startswith("uncaught")], console
    slices = [frame for frame in frames if frame["type"] == "slice"]
    assert shown["rows"] == [expected_row(frame) for frame in slices]
    inputs = [frame["input"] for frame in slices]
    assert "speech" in inputs and "silence" in inputs  # the fake microphone's question, then its silence
    assert shown["conversation"] == frames[-1]["text"] and "User" in shown["conversation"]
    assert shown["error"] == "" and shown["reconnect_hidden"]
    assert shown["level_while_talking"].endswith("dBFS")
    level = shown["level_while_talking"].split()[-2]
    assert -80 <= float(level) <= 0, shown["level_while_talking"]
    assert (shown["meter"], shown["dbfs"]) == (-80, "")  # after Stop: idle, no "-728 dBFS"


def test_a_full_server_shows_its_refusal_on_the_page(engine, tmp_path):
    async def run():
        runner, port = await serve(DuplexServer(engine, ServerConfig(max_connections=1), name="tiny").make_app())
        try:
            import aiohttp
            async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}/ws") as occupant:
                assert (await occupant.receive_json())["type"] == "ready"
                async with chromium(tmp_path / "profile", microphone_wav(tmp_path / "mic.wav")) as page:
                    await page.goto(f"http://127.0.0.1:{port}/")
                    await page.click("start")
                    await page.wait_for("document.getElementById('status').textContent.startsWith('Disconnected')",
                                        60, "the refusal")
                    return await page.evaluate("""({error: document.getElementById("error").textContent,
                        status: document.getElementById("status").textContent,
                        start: document.getElementById("start").disabled,
                        reconnect_hidden: document.getElementById("reconnect").hidden})""")
        finally:
            await runner.cleanup()

    shown = asyncio.run(run())
    assert "server full" in shown["error"] and "1013" in shown["status"]
    assert shown["start"] is False and shown["reconnect_hidden"]


def slice_frame(index: int, text: str) -> dict:
    return {"type": "slice", "slice_index": index, "start_s": 3.0 * index, "duration_s": 3.0, "input": "silence",
            "label": None, "speech_positions": None, "state_token": None, "state_token_id": None, "text": text,
            "changes": []}


LOST_SAMPLES = 1600  # the stand-in "loses" the last 100 ms it received before the drop: the page must re-send it


def resuming_app(seen: dict, refuse: bool = False) -> web.Application:
    """Serves the page and a /ws speaking docs/server.md's "Reconnecting": the first connection gets a token and
    is dropped after one slice; `/ws?resume=TOKEN&last_slice=K` continues it (or, ``refuse``, is refused with
    4001)."""
    ready = {"type": "ready", "protocol": 2, "sample_rate": 16000, "slice_seconds": 3.0,
             "silence_threshold_dbfs": -45.0, "token": "t0k3n", "reconnect_grace_s": 60.0}

    async def audio(ws, until_bytes: int) -> bytes:
        data = b""
        while len(data) < until_bytes:
            message = await ws.receive()
            assert message.type == WSMsgType.BINARY, message
            data += message.data
        return data

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if "resume" not in request.query:
            await ws.send_json(ready)
            seen["start"] = json.loads((await ws.receive()).data)
            seen["first"] = await audio(ws, int(3.3 * 16000) * 2)
            await ws.send_json(slice_frame(0, "Hello"))
            await ws.close(code=1012, message=b"service restart")  # the connection is lost mid-conversation
            return ws
        seen["query"] = dict(request.query)
        if refuse:
            await ws.send_json({"type": "error", "message": "unknown or expired token"})
            await ws.close(code=4001)
            return ws
        received = len(seen["first"]) // 2 - LOST_SAMPLES
        await ws.send_json({**ready, "resumed": True, "received_samples": received, "client_sample_rate": 16000})
        seen["after_resume"] = await audio(ws, 2 * LOST_SAMPLES + 3200)
        await ws.send_json(slice_frame(1, " again"))
        async for message in ws:
            if message.type == WSMsgType.TEXT and json.loads(message.data)["type"] == "end":
                await ws.send_json({"type": "conversation", "text": "Assistant: Hello again"})
                await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/", lambda request: web.FileResponse(STATIC_DIR / "index.html"))
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static", STATIC_DIR)
    return app


async def drop_and_reconnect(page, port: int) -> str:
    """Start, wait until the connection drops and Reconnect shows, click it; the status shown at the drop."""
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.click("start")
    await page.wait_for("!document.getElementById('reconnect').hidden", 60, "the Reconnect button")
    lost = await page.evaluate("document.getElementById('status').textContent")
    await page.click("reconnect")
    return lost


def test_reconnect_resumes_with_the_token_and_resends_what_the_server_lost(tmp_path):
    async def run():
        seen = {}
        runner, port = await serve(resuming_app(seen))
        try:
            async with chromium(tmp_path / "profile", microphone_wav(tmp_path / "mic.wav")) as page:
                lost = await drop_and_reconnect(page, port)
                await page.wait_for("document.querySelectorAll('#timeline tr').length >= 2", 60, "resumed slices")
                await page.click("stop")
                await page.wait_for("document.getElementById('status').textContent.startsWith('Disconnected')", 60,
                                    "the end")
                rows = await page.evaluate(READ_ROWS)
                conversation = await page.evaluate("document.getElementById('conversation').textContent")
        finally:
            await runner.cleanup()
        return seen, lost, rows, conversation

    seen, lost, rows, conversation = asyncio.run(run())
    assert seen["start"]["type"] == "start" and seen["query"] == {"resume": "t0k3n", "last_slice": "0"}
    assert "Connection lost (code 1012)" in lost and "Reconnect" in lost
    lost_bytes = seen["first"][-2 * LOST_SAMPLES:]
    assert seen["after_resume"][:2 * LOST_SAMPLES] == lost_bytes  # re-sent from received_samples, nothing doubled
    assert [row["text"] for row in rows] == ["Hello", " again"]  # the timeline is kept across the reconnect
    assert conversation == "Assistant: Hello again"


def test_a_refused_resume_leaves_only_start(tmp_path):
    async def run():
        seen = {}
        runner, port = await serve(resuming_app(seen, refuse=True))
        try:
            async with chromium(tmp_path / "profile", microphone_wav(tmp_path / "mic.wav")) as page:
                await drop_and_reconnect(page, port)
                await page.wait_for("document.getElementById('status').textContent.includes('4001')", 60,
                                    "the refusal")
                return await page.evaluate("""({error: document.getElementById("error").textContent,
                    reconnect_hidden: document.getElementById("reconnect").hidden,
                    start: document.getElementById("start").disabled,
                    rows: document.querySelectorAll("#timeline tr").length})""")
        finally:
            await runner.cleanup()

    shown = asyncio.run(run())
    assert shown == {"error": "unknown or expired token", "reconnect_hidden": True, "start": False, "rows": 1}
