"""Headless Chromium (Debian's) driven over the DevTools protocol, for looking at pages as a
person would: open a URL, wait for something to be on the page, type, take a screenshot.

No browser is downloaded: the test uses ``/usr/bin/chromium`` (scripts/test installs it) and
talks to it over its DevTools WebSocket with aiohttp, which the project already depends on.
Screenshots go to ``$INTERKNIT_TEST_OUTPUT`` (default ``build/test-output``), one folder per
test, and their paths are printed, so a run's output says where to look.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--window-size=1500,1100",
)


def output_dir(name: str) -> Path:
    root = Path(os.environ.get("INTERKNIT_TEST_OUTPUT", "build/test-output"))
    path = root.resolve() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One Chromium with one page; use ``async with Browser(path) as page``."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self._profile = tempfile.TemporaryDirectory(prefix="interknit-chromium-")
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.console: list[str] = []

    async def __aenter__(self) -> Browser:
        profile = Path(self._profile.name)
        self._proc = await asyncio.create_subprocess_exec(
            self.executable,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(30):
            while not port_file.exists() or not port_file.read_text().strip():
                if self._proc.returncode is not None:
                    raise RuntimeError(f"chromium exited with {self._proc.returncode}")
                await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with asyncio.timeout(30):
            pages: list[dict[str, Any]] = []
            while not pages:
                # The port file may come a moment before the port answers.
                with contextlib.suppress(aiohttp.ClientError):
                    async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t.get("type") == "page"]
                await asyncio.sleep(0.05)
        self._ws = await self._session.ws_connect(
            pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024
        )
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._profile.cleanup()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            data = json.loads(message.data)
            found = self._pending.pop(data.get("id", -1), None)
            if found is not None and not found.done():
                if "error" in data:
                    found.set_exception(RuntimeError(str(data["error"])))
                else:
                    found.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", "")) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(data["params"]["exceptionDetails"].get("text")))

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        assert self._ws is not None
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params or {}}))
        async with asyncio.timeout(30):
            return await future

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of ``expression`` once it is truthy (polled; the page updates itself)."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(RuntimeError):
                    value = await self.evaluate(expression)
                    if value:
                        return value
                await asyncio.sleep(0.1)

    async def text(self, selector: str = "body") -> str:
        found = await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"
        )
        return str(found)

    async def type_into(self, selector: str, text: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", {"text": text})

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        print(f"screenshot: {path}")
        return path
