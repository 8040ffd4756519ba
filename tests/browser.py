"""A real headless Chromium driven over the DevTools protocol, with no new dependency.

``Browser.start()`` runs ``chromium --headless --remote-debugging-port=0`` with a fresh
profile, reads the port Chromium chose from ``DevToolsActivePort`` in that profile, and
talks to the page target over aiohttp's websocket client: ``evaluate`` runs JavaScript
and returns its value, ``wait_until`` polls a JavaScript condition against a deadline,
``click`` presses a real mouse button over an element, ``type_text`` types into the
focused element, ``screenshot`` captures what an element looks like on screen (as
decoded pixels, ``Image``). Uncaught JavaScript exceptions in the page are collected in
``errors``.

Chromium is required, not optional: CI installs it (``apt-get install -y chromium
chromium-driver``). ``find_chromium`` fails the test with that line when it is missing;
``AIOLB_CHROMIUM`` names another binary.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install -y chromium chromium-driver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-port=0",
)
START_TIMEOUT = 30.0
CALL_TIMEOUT = 10.0


def find_chromium() -> str:
    """The Chromium binary, or fail the test (not skip: CI installs it)."""
    named = os.environ.get("AIOLB_CHROMIUM")
    if named:
        if shutil.which(named) is None:
            pytest.fail(f"AIOLB_CHROMIUM={named} is not an executable")
        return named
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        f"Chromium is not installed (looked for {', '.join(CANDIDATES)} on PATH); "
        f"the dashboard test needs a real headless browser: {INSTALL_HINT}",
        pytrace=False,
    )


class BrowserError(AssertionError):
    """A DevTools call failed, or a page condition was not met in time."""


class Browser:
    """One headless Chromium process and a DevTools session on its first page."""

    def __init__(self) -> None:
        self.binary = find_chromium()
        self.profile = Path(tempfile.mkdtemp(prefix="aiolb-chromium-"))
        self.process: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: uncaught exceptions and console errors reported by the page
        self.errors: list[str] = []

    async def start(self) -> Browser:
        log = (self.profile / "chromium.log").open("wb")
        try:
            self.process = await asyncio.create_subprocess_exec(
                self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            log.close()
        port = await self._devtools_port()
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"Chromium has no page target: {targets}")
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def _devtools_port(self) -> int:
        """Wait for Chromium to write the port it listens on into the profile."""
        assert self.process is not None
        active = self.profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            if active.exists():
                first = active.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            if self.process.returncode is not None:
                raise BrowserError(
                    f"{self.binary} exited with {self.process.returncode}: {self.log_tail()}"
                )
            if loop.time() > deadline:
                raise BrowserError(
                    f"{self.binary} did not open DevTools in {START_TIMEOUT:g}s: {self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def log_tail(self, size: int = 2000) -> str:
        try:
            return (self.profile / "chromium.log").read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            future = self.pending.pop(data.get("id", -1), None)
            if future is not None:
                if not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                exc = details.get("exception", {})
                self.errors.append(exc.get("description") or details.get("text", "?"))
            elif data.get("method") == "Runtime.consoleAPICalled":
                params = data["params"]
                if params.get("type") == "error":
                    args = params.get("args", [])
                    self.errors.append(
                        "console.error: " + " ".join(str(a.get("value", a)) for a in args)
                    )
        for future in self.pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))
        self.pending.clear()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its ``result``, or BrowserError."""
        assert self.ws is not None
        ident = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(future, CALL_TIMEOUT)
        except TimeoutError:
            self.pending.pop(ident, None)
            raise BrowserError(f"{method}: no answer in {CALL_TIMEOUT:g}s") from None
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page (promises awaited); its JSON value."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}\n  in: {expression}")
        return result.get("result", {}).get("value")

    async def goto(self, url: str) -> None:
        answer = await self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"navigating to {url}: {answer['errorText']}")
        await self.wait_until("document.readyState === 'complete'", what=f"{url} loaded")

    async def wait_until(self, condition: str, *, timeout: float = 10.0, what: str = "") -> Any:
        """Poll the JavaScript ``condition`` until it is truthy; its value.

        On timeout, fails with what the page shows, to make the failure readable.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(condition)
            if value:
                return value
            if loop.time() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise BrowserError(
                    f"{what or condition!r} not true within {timeout:g}s; the page shows:\n"
                    f"{str(text)[:3000]}\nJavaScript errors: {self.errors}"
                )
            await asyncio.sleep(0.05)

    async def _box(self, selector: str, what: str) -> dict[str, float]:
        """Scroll the element into view; its box in the viewport (``x``, ``y``, ``width``,
        ``height``) and the page's scroll offsets (``sx``, ``sy``)."""
        box = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return {{x: r.left, y: r.top, width: r.width, height: r.height,
                         sx: scrollX, sy: scrollY}};
            }})()"""
        )
        if not box or not box["width"] or not box["height"]:
            raise BrowserError(f"nothing visible matches {selector!r} to {what}")
        found: dict[str, float] = box
        return found

    async def click(self, selector: str) -> None:
        """Press and release the left mouse button over the element, like a user."""
        box = await self._box(selector, "click")
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            extra = {} if kind == "mouseMoved" else {"button": "left", "clickCount": 1}
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    async def screenshot(self, selector: str, save: Path | None = None) -> Image:
        """The pixels of the element matching ``selector`` as the page shows it now
        (scrolled into view; ``save``: also write the PNG there, for a human to look at)."""
        box = await self._box(selector, "capture")
        clip = {"x": box["x"] + box["sx"], "y": box["y"] + box["sy"], "width": box["width"],
                "height": box["height"], "scale": 1}  # fmt: skip
        shot = await self.call(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
        png = base64.b64decode(shot["data"])
        if save is not None:
            save.write_bytes(png)
        return Image.from_png(png)

    async def type_text(self, text: str) -> None:
        """Type into the focused element."""
        await self.call("Input.insertText", text=text)

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call(
                "Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}),
            )

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            try:
                await asyncio.wait_for(self.reader, 5)
            except (TimeoutError, asyncio.CancelledError):
                self.reader.cancel()
        if self.session is not None:
            await self.session.close()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@dataclass(frozen=True)
class Image:
    """Decoded 8-bit RGB(A) pixels: ``pixels[y][x]`` is ``(r, g, b)``."""

    width: int
    height: int
    pixels: list[list[tuple[int, int, int]]]

    def count(self, test: Callable[[tuple[int, int, int]], bool]) -> int:
        """How many pixels pass ``test``."""
        return sum(test(pixel) for row in self.pixels for pixel in row)

    @classmethod
    def from_png(cls, data: bytes) -> Image:
        """A non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes)."""
        assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
        at, idat, header = 8, b"", b""
        while at < len(data):
            (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
            body = data[at + 8 : at + 8 + length]
            at += 12 + length
            if kind == b"IHDR":
                header = body
            elif kind == b"IDAT":
                idat += body
        width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
        assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
        channels = 4 if color == 6 else 3
        rows = _unfilter(zlib.decompress(idat), width * channels, height, channels)
        pixels = [[tuple(row[x * channels : x * channels + 3]) for x in range(width)]
                  for row in rows]  # fmt: skip
        return cls(width, height, pixels)  # type: ignore[arg-type]


def _unfilter(raw: bytes, stride: int, height: int, bpp: int) -> list[bytearray]:
    """PNG scanline filters undone (None, Sub, Up, Average, Paeth)."""
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                line[i] = (line[i] + _paeth(left, up, corner)) & 0xFF
        rows.append(line)
        previous = line
    return rows


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
