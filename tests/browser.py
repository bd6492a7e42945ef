"""Open a local HTML file in headless Chromium and report what a user's browser would see.

Speaks the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages separated by
NUL bytes on file descriptors 3 and 4), so no websocket client or browser driver is needed.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageVisit:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, its own included
    screenshot: bytes = b""  # PNG of the whole page
    boxes: list[dict] = field(default_factory=list)  # page-coordinate boxes of the elements asked for


class _Pipe:
    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int, timeout: float):
        self.process, self.to_browser, self.from_browser = process, to_browser, from_browser
        self.deadline = time.monotonic() + timeout
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read())

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


def visit(html_file: Path, selector: str, timeout: float = 60.0) -> PageVisit:
    """Load ``html_file`` from a file:// URL with the network off, wait for the load event and
    a short settle, and return console errors, requests, a full-page screenshot and the boxes
    of the elements matching ``selector``."""
    browser_in, ours_out = os.pipe()  # we write commands, the browser reads them on fd 3
    ours_in, browser_out = os.pipe()  # the browser writes replies on fd 4
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=partial(_as_fds_3_and_4, browser_in, browser_out), close_fds=False,
            start_new_session=True,  # its own process group: ended with its renderer processes below
        )
        os.close(browser_in)
        os.close(browser_out)
        try:
            return _drive(_Pipe(process, ours_out, ours_in, timeout), html_file, selector)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            os.close(ours_out)
            os.close(ours_in)


def _as_fds_3_and_4(reads: int, writes: int) -> None:
    """In the child before exec: the pipe ends become fds 3 and 4, where --remote-debugging-pipe
    expects them. Copied first, as either may already sit on 3 or 4; only 3 and 4 are inheritable
    (os.pipe and os.dup make non-inheritable descriptors), so nothing else leaks into the browser."""
    reads, writes = os.dup(reads), os.dup(writes)
    os.dup2(reads, 3)
    os.dup2(writes, 4)


def _drive(pipe: _Pipe, html_file: Path, selector: str) -> PageVisit:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send("Emulation.setDeviceMetricsOverride",
              {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
    pipe.events.clear()
    pipe.send("Page.navigate", {"url": html_file.resolve().as_uri()}, session)
    pipe.wait_for("Page.loadEventFired")
    time.sleep(0.3)  # let late console messages or requests arrive
    boxes = pipe.send("Runtime.evaluate", {
        "expression": f"JSON.stringify([...document.querySelectorAll({json.dumps(selector)})].map(e => {{"
                      "const r = e.getBoundingClientRect(); return {x: r.left + scrollX, y: r.top + scrollY, "
                      "width: r.width, height: r.height, label: e.getAttribute('alt') || e.id}}))",
        "returnByValue": True}, session)["result"]["value"]
    shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
    result = PageVisit(screenshot=base64.b64decode(shot["data"]), boxes=json.loads(boxes))
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            result.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            result.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            result.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            result.console_errors.append(params["entry"]["text"])
    return result
