"""A headless Chromium driven over the Chrome DevTools Protocol (aiohttp's
websocket client: no browser-automation package needed)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.tools import require_tool


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return require_tool("chromium")


class Browser:
    """One headless browser and one page, as an async context manager."""

    def __init__(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="qmpd-chromium-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._page_session = ""
        #: Every protocol event received so far (``Network.requestWillBeSent``...).
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Browser:
        self._proc = subprocess.Popen(
            [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = await asyncio.to_thread(self._devtools_url)
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=64 << 20)
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True})
        self._page_session = attached["sessionId"]
        await self.send("Page.enable", page=True)
        await self.send("Runtime.enable", page=True)
        await self.send("Network.enable", page=True)
        return self

    def requests(self) -> list[tuple[str, str]]:
        """(method, URL) of every request the page made so far."""
        return [(e["params"]["request"]["method"], e["params"]["request"]["url"])
                for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def _devtools_url(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        deadline = time.monotonic() + 30
        seen = b""
        while time.monotonic() < deadline:
            line = self._proc.stderr.readline()
            if not line:
                break
            seen += line
            m = re.search(rb"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1).decode()
        raise RuntimeError(f"chromium did not start: {seen.decode(errors='replace')}")

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   page: bool = False) -> dict[str, Any]:
        assert self._ws is not None
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self._page_session
        await self._ws.send_str(json.dumps(msg))
        while True:
            reply = await asyncio.wait_for(self._ws.receive_json(), 30)
            if "method" in reply:
                self.events.append(reply)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url}, page=True)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (JSON-able values only)."""
        result = await self.send("Runtime.evaluate",
                                 {"expression": expression, "returnByValue": True},
                                 page=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy (in Python: a DOM node comes
        back as ``{}``, so ask for ``!!node``); its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as exc:  # the page is still loading, say
                value, last = None, exc
            else:
                last = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression} ({last})")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot",
                               {"format": "png", "captureBeyondViewport": True}, page=True)
        path.write_bytes(base64.b64decode(shot["data"]))


def screenshot_path() -> Path | None:
    """Where the browser test saves its screenshot (``QMPD_SCREENSHOT``), if asked."""
    value = os.environ.get("QMPD_SCREENSHOT")
    return Path(value) if value else None
