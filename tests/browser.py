"""Headless Chromium driven through the DevTools protocol (CDP) over aiohttp's WebSocket client: enough to load the
server's page, click, read the DOM, wait for it to change and take screenshots (tests/test_browser.py,
scripts/page_screenshots.py).

Why our own ~150 lines and not a driver: the one thing needed is the system Chromium of Debian (`apt-get install
chromium`), with a fake microphone playing a wav; Playwright and Selenium bring their own browser or driver
binaries, aiohttp is already a dependency and CDP is a plain JSON protocol.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import pathlib
import re
import shutil

import aiohttp

# Flags that work in a container as root without a display (docs/server.md, "The page in a browser").
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  "--autoplay-policy=no-user-gesture-required", "--window-size=1100,900")
DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """The system Chromium (Debian: /usr/bin/chromium), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class PageError(RuntimeError):
    """JavaScript failed in the page, or a wait timed out (the message says what the page showed)."""


class DevTools:
    """One CDP connection (the browser endpoint, flattened sessions): commands by id, events by name."""

    def __init__(self, ws):
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self._reader = asyncio.create_task(self._read())

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        message_id = next(self._ids)
        future = self._pending[message_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": message_id, "method": method, "params": params or {},
                                 **({"sessionId": session} if session else {})})
        return await future

    def next_event(self, method: str) -> asyncio.Future:
        """A future for the next event ``method`` (ask before triggering it)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((method, future))
        return future

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(PageError(f"CDP error: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            self._on_event(data.get("method"), data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PageError("the browser closed the DevTools connection"))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.console.append(f"uncaught: {params['exceptionDetails'].get('exception', {}).get('description')}")
        for waiter in [w for w in self._waiters if w[0] == method]:
            self._waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(params)


class Page:
    """A tab: navigate, evaluate JavaScript, wait for a condition, screenshot."""

    def __init__(self, devtools: DevTools, session: str):
        self.devtools, self.session = devtools, session

    async def send(self, method: str, params: dict | None = None) -> dict:
        return await self.devtools.send(method, params, self.session)

    async def goto(self, url: str) -> None:
        loaded = self.devtools.next_event("Page.loadEventFired")
        await self.send("Page.navigate", {"url": url})
        await asyncio.wait_for(loaded, 30)

    async def evaluate(self, expression: str, gesture: bool = False):
        """Value of a JavaScript expression (promises awaited); a page exception raises PageError."""
        reply = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                     "returnByValue": True, "userGesture": gesture})
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            raise PageError(details.get("exception", {}).get("description") or details.get("text"))
        return reply["result"].get("value")

    async def click(self, element_id: str, timeout_s: float = 30) -> None:
        """Click a button once it is enabled and shown (a click on a disabled one does nothing)."""
        element = f"document.getElementById({json.dumps(element_id)})"
        await self.wait_for(f"!{element}.disabled && !{element}.hidden", timeout_s, f"#{element_id} to be enabled")
        await self.evaluate(f"{element}.click()", gesture=True)

    async def wait_for(self, condition: str, timeout_s: float, what: str) -> None:
        """Resolve when the JS ``condition`` holds, re-checked on every DOM change (no polling interval)."""
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }};
            if (check()) return resolve(true);
            const observer = new MutationObserver(() => {{ if (check()) {{ observer.disconnect(); resolve(true); }} }});
            observer.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
            setTimeout(() => {{ observer.disconnect(); reject(new Error("timed out")); }}, {int(timeout_s * 1000)});
        }})"""
        try:
            await self.evaluate(script)
        except PageError as error:
            state = await self.evaluate("({status: document.getElementById('status')?.textContent, "
                                        "error: document.getElementById('error')?.textContent})")
            raise PageError(f"waiting for {what}: {error}; page shows {state}; console {self.devtools.console}")

    async def screenshot(self, path: pathlib.Path) -> pathlib.Path:
        data = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@contextlib.asynccontextmanager
async def chromium(profile: pathlib.Path, fake_audio: pathlib.Path | None = None, executable: str | None = None):
    """Start headless Chromium with a fresh profile (and a wav as the microphone); yield a ``Page``."""
    executable = executable or find_chromium()
    if executable is None:
        raise RuntimeError("chromium not found on PATH; install Debian's chromium (apt-get install chromium; "
                           ".ci/run does it in CI).")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    if fake_audio is not None:
        flags.append(f"--use-file-for-fake-audio-capture={fake_audio}")
    process = await asyncio.create_subprocess_exec(executable, *flags, "about:blank", stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE, env={**os.environ, "LANG": "C"})
    log: list[str] = []
    try:
        url = await asyncio.wait_for(_devtools_url(process, log), 60)
        drain = asyncio.create_task(_drain(process, log))
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            devtools = DevTools(ws)
            target = await devtools.send("Target.createTarget", {"url": "about:blank"})
            attached = await devtools.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            page = Page(devtools, attached["sessionId"])
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            yield page
            await devtools.send("Browser.close")
        drain.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _devtools_url(process, log: list[str]) -> str:
    while True:
        line = await process.stderr.readline()
        if not line:
            raise RuntimeError("chromium exited before opening DevTools:\n" + "".join(log))
        text = line.decode(errors="replace")
        log.append(text)
        found = DEVTOOLS_LINE.search(text)
        if found:
            return found.group(1)


async def _drain(process, log: list[str]) -> None:
    """Keep reading Chromium's stderr (a full pipe would block it)."""
    while line := await process.stderr.readline():
        log.append(line.decode(errors="replace"))
