"""Headless Chromium driven through its DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so a test can click, type and hover as a reader does and read
back what the page shows — no websocket client, no extra package. Chromium itself comes from Debian (`chromium`)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path

from test_report import CHROMIUM, FLAGS


class CdpError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page. `open(url, ready)` navigates and waits for a JavaScript condition;
    `js(expr)` evaluates (promises awaited) and returns the value; `click`, `hover`, `type` act through real input
    events at an element's centre. `errors` collects uncaught exceptions and console errors."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends, moved above the numbers it needs (3, 4) so dup2 cannot clobber them
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds():
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
             "about:blank"], preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self._buf, self._id, self.events, self.errors = b"", 0, [], []
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next((t["targetId"] for t in targets if t["type"] == "page"), None)
        if page is None:
            page = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    # -- the protocol --------------------------------------------------------------------------------

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise CdpError(f"no answer from Chromium in {timeout} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise CdpError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: bool = False, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            got = self._read(timeout)
            if got.get("id") == self._id:
                if "error" in got:
                    raise CdpError(f"{method}: {got['error']}")
                return got.get("result", {})
            self._event(got)

    @property
    def requests(self) -> list[str]:
        """Every URL the page has asked for (the page itself, and anything it loads)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def _event(self, ev: dict) -> None:
        self.events.append(ev)
        p = ev.get("params", {})
        if ev.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(d.get("exception", {}).get("description") or d.get("text"))
        elif ev.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))

    # -- what a test does ----------------------------------------------------------------------------

    def js(self, expression: str, timeout: float = 60):
        r = self.send("Runtime.evaluate", session=True, timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise CdpError(f"{expression[:200]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, condition: str, timeout: float = 60) -> float:
        """Poll a JavaScript condition until it is truthy; the seconds waited."""
        t0 = time.monotonic()
        while not self.js(f"!!({condition})"):
            if time.monotonic() - t0 > timeout:
                raise CdpError(f"{condition!r} not true after {timeout} s; errors: {self.errors}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def open(self, url: str, ready: str = "document.readyState === 'complete'", timeout: float = 60) -> float:
        """Navigate and wait for `ready`; the seconds from the navigation to ready. `errors` and `requests` start
        afresh with each page."""
        self.events, self.errors = [], []
        t0 = time.monotonic()
        self.send("Page.navigate", session=True, url=url)
        self.wait(ready, timeout)
        return time.monotonic() - t0

    def centre(self, selector: str, index: int = 0) -> tuple[float, float]:
        """The centre of the `index`-th element matching `selector`, scrolled into view (viewport pixels)."""
        box = self.js(f"""(() => {{ const el = document.querySelectorAll({json.dumps(selector)})[{index}];
            if (!el) return null; el.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if box is None:
            raise CdpError(f"no element {index} matches {selector!r}")
        return box[0], box[1]

    def mouse(self, kind: str, x: float, y: float, **kw) -> None:
        self.send("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, **kw)

    def click(self, selector: str, index: int = 0) -> None:
        x, y = self.centre(selector, index)
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, button="left", clickCount=1)
        self.mouse("mouseReleased", x, y, button="left", clickCount=1)

    def hover(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)

    def type(self, selector: str, text: str, index: int = 0) -> None:
        self.click(selector, index)
        self.send("Input.insertText", session=True, text=text)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (CdpError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
