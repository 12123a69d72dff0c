"""Headless Chromium driven over the DevTools protocol, for tests that look at a web UI as a user does.

Debian's `chromium` package and the `websockets` client (a dependency of Prefect) are all it needs:
no Selenium or Playwright driver to download. One browser, one tab: load a page, wait until a
JavaScript condition holds (the single-page apps fetch their data after the page loads), click,
take a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def chromium_binary() -> str:
    """The chromium binary. Without one a test skips on a developer's machine and fails in CI
    (``CI`` set), where `.ci/run` installs Debian's package."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed, and CI is set: .ci/run installs Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium); under CI=true this test fails instead")


class Browser:
    """One headless Chromium with one tab, spoken to over the DevTools protocol's websocket.

    Args:
        profile: a fresh folder for the browser's profile (nothing is read from or written to home).
        size: the window's width and height in CSS pixels (also the screenshots' size).
    """

    def __init__(self, profile: Path, size: tuple[int, int] = (1400, 900)) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        # With port 0 Chromium picks a free port and writes it to this file once it listens; one
        # left by an earlier browser on this profile would name a port nobody listens on.
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self.log = open(profile.parent / f"{profile.name}.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}", "about:blank",
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self._wait(lambda: port_file.is_file() and len(port_file.read_text().splitlines()) >= 2, 60, "DevTools")
            port = port_file.read_text().splitlines()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                [page] = [t for t in json.loads(r.read()) if t["type"] == "page"]
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        except BaseException:
            self.close()
            raise
        self.next_id = 0

    def _wait(self, probe, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            found = probe()
            if found:
                return found
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {seconds} s")

    def call(self, method: str, **params) -> dict:
        """One DevTools command and its result (events that arrive meanwhile are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, seconds: float = 60) -> bool:
        """Poll a JavaScript expression until it is truthy; the page's text in the error if never."""
        try:
            # !! since a DOM node comes back by value as {}, which Python reads as false.
            return self._wait(lambda: self.evaluate(f"!!({expression})"), seconds, expression)
        except TimeoutError as exc:
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            raise TimeoutError(f"{exc}\npage text:\n{text[:3000]}") from None

    def click(self, selector: str) -> bool:
        """Click the first element matching a CSS selector; False when there is none."""
        return bool(self.evaluate(f"(e => (e && (e.click(), true)) || false)(document.querySelector({selector!r}))"))

    def screenshot(self, path: Path) -> Path:
        """A PNG of the window as it is now."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
