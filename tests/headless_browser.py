"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests/test_browser.py.

No browser-automation package: Chromium (Debian's ``chromium``) is started with ``--remote-debugging-port=0``, writes
the port it chose to ``DevToolsActivePort`` in its (new, empty) profile folder, and the page is driven over a
websocket with aiohttp's client (already installed: ComfyUI's server needs aiohttp). The browser runs in its own
process group and :meth:`Browser.close` ends the whole group.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
                  # The page talks to the local server only: other hosts (a workflow's model download links, which
                  # the frontend asks for file sizes) fail the same way with or without internet.
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


def own_group_dying_with_parent() -> None:
    """preexec_fn: a new process group (ended as a whole by close()), and on Linux SIGKILL when the test process
    dies, even by SIGKILL (no finalizer runs then)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page, driven synchronously (each call runs the CDP exchange to its end)."""

    def __init__(self, executable: str, profile: Path, width: int = 1600, height: int = 1000,
                 start_timeout: float = 60.0):
        self.profile = Path(profile)
        self.profile.mkdir(parents=True, exist_ok=True)
        self.log_path = self.profile.parent / (self.profile.name + "-chromium.log")
        self.events: list[dict] = []
        self._next_id = 0
        self.width, self.height = width, height
        self._loop = asyncio.new_event_loop()
        self._session = self._ws = None
        command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                   "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=own_group_dying_with_parent)
        try:
            port = self._wait_port(start_timeout)
            self._run(self._connect(port, start_timeout))
        except BaseException:
            self.close()
            raise

    # -- process -------------------------------------------------------------------------------------------------

    def _wait_port(self, timeout: float) -> int:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self.proc.returncode}\n{self.log_tail()}")
            try:
                first = active.read_text().splitlines()[0]
                if first.strip():
                    return int(first)
            except (FileNotFoundError, IndexError, ValueError):
                pass
            time.sleep(0.1)
        raise BrowserError(f"chromium opened no DevTools port within {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            tail = []
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def close(self) -> None:
        if self._ws is not None or self._session is not None:
            try:
                self._run(self._disconnect(), timeout=10)
            except Exception:
                pass
        if not self._loop.is_closed():
            self._loop.close()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the group may hold helpers (zygote, renderers): end them too
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- CDP ------------------------------------------------------------------------------------------------------

    def _run(self, coro, timeout: float = 120.0):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def _connect(self, port: int, timeout: float) -> None:
        import aiohttp
        self._session = aiohttp.ClientSession()
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = await response.json(content_type=None)
                pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium shows no page target\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)

    async def _disconnect(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self._ws = self._session = None

    async def _call(self, method: str, params: dict) -> dict:
        import aiohttp
        self._next_id += 1
        my_id = self._next_id
        await self._ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = await self._ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"DevTools connection closed ({message.type}) during {method}\n{self.log_tail()}")
            data = json.loads(message.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise BrowserError(f"{method}: {data['error']}")
                return data.get("result", {})
            if "method" in data:
                self.events.append(data)

    def call(self, method: str, timeout: float = 120.0, **params) -> dict:
        return self._run(self._call(method, params), timeout)

    def evaluate(self, expression: str, timeout: float = 120.0):
        """The JSON value of a JavaScript expression (promises are awaited); a thrown exception raises."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript raised: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.2, what: str = ""):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except BrowserError as why:
                last = why
            else:
                if last:
                    return last
            time.sleep(interval)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what or expression} (last: {last!r})")

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")
        # The page's viewport exactly width x height (headless --window-size includes the window's frame).
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path, quality: int | None = None) -> int:
        params = {"format": "png"} if quality is None else {"format": "jpeg", "quality": quality}
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return len(data)

    # -- what the page reported ------------------------------------------------------------------------------------

    def drain(self, seconds: float = 0.0) -> None:
        """Read the events the page sent so far (console messages, exceptions), waiting up to ``seconds``."""
        async def read():
            end = time.monotonic() + seconds
            while True:
                left = max(end - time.monotonic(), 0.01)
                try:
                    message = await self._ws.receive(timeout=left)
                except asyncio.TimeoutError:
                    return
                data = json.loads(message.data)
                if "method" in data:
                    self.events.append(data)
                if time.monotonic() >= end:
                    return
        self._run(read(), timeout=seconds + 10)

    def errors(self, since: int = 0, until: int | None = None) -> list[str]:
        """Uncaught exceptions, console errors and failed requests among the events [since, until)."""
        out = []
        for event in self.events[since:until]:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                out.append("uncaught: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
                out.append("console.error: " + " ".join(str(a) for a in args))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        return out
