"""A headless Chromium for tests, driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`,
the transport Puppeteer's `pipe: true` uses): JSON messages ended by a NUL byte on file descriptors
3 (to the browser) and 4 (from it). No websocket client, no port, no Python dependency.

The browser starts with a profile that cannot reach any network: every host name resolves to
nothing and every connection goes to a proxy on a closed local port. The page's own network log
(`Network.requestWillBeSent`) is still kept, so a test sees each request a page tries, blocked or not.

Chromium comes from the system's packages (Debian: `apt-get install -y chromium`; `.ci/run`
installs it). `find()` returns None without it, and the tests skip with that reason, unless
`$CAI_LITE_REQUIRE_CHROMIUM` is set (CI), where a missing browser is a failure.

    python -c "import sys; sys.path.insert(0, 'tests'); from chromium import Chromium, find; \
               b = Chromium(find()); b.open('data:text/html,hi'); print(b.js('document.body.textContent')); b.close()"
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

NAMES = ("chromium", "chromium-browser", "google-chrome")
BLOCKED_NETWORK = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
                   "--proxy-bypass-list=<-loopback>")
QUIET = ("--no-first-run", "--no-default-browser-check", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--disable-default-apps", "--disable-extensions", "--mute-audio")


def find() -> str | None:
    return next((path for path in map(shutil.which, NAMES) if path), None)


class Chromium:
    """One browser with one page. Records the page's requests, uncaught exceptions, errors from its
    console and from the browser's log (a request its Content-Security-Policy refused shows up there),
    and dialogs (an `alert` from injected script would show up there, and is dismissed)."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self.timeout = timeout
        self.requests: list[str] = []
        self.exceptions: list[str] = []
        self.console_errors: list[str] = []
        self.dialogs: list[str] = []
        self._loaded = False
        self._url = "about:blank"
        self._next_id = 0
        self._buffer = b""
        self._profile = tempfile.TemporaryDirectory(prefix="cai-lite-chromium-")
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_on_3_and_4():  # in the child: move both ends to high numbers first, so neither clobbers the other
            a, b = os.dup(to_browser), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", *BLOCKED_NETWORK, *QUIET,
             "about:blank"],
            preexec_fn=pipes_on_3_and_4, pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser_w)
        page = next(t for t in self._call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self._call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.viewport(width, height)

    # -- protocol --------------------------------------------------------------------------------
    def _send(self, method: str, params: dict, session: str | None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _read(self, deadline: float, what: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium: no answer within {self.timeout}s waiting for {what}")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise EOFError(f"chromium exited (code {self._process.poll()}) waiting for {what}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.exceptions.append(params["exceptionDetails"].get("exception", {}).get("description")
                                   or params["exceptionDetails"]["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":  # e.g. a request the page's CSP refused
            self.console_errors.append(f"{params['entry']['source']}: {params['entry']['text']}")
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params["message"])
            self._send("Page.handleJavaScriptDialog", {"accept": False}, self._session)
        elif method == "Page.loadEventFired":
            self._loaded = True

    def _call(self, method: str, session: str | None = None, **params) -> dict:
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read(deadline, method)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"chromium: {method}: {message['error']}")
                return message["result"]
            self._event(message)

    def call(self, method: str, **params) -> dict:
        """A DevTools command on the page."""
        return self._call(method, self._session, **params)

    # -- what tests use ----------------------------------------------------------------------------
    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)

    def open(self, url: str) -> float:
        """Load `url` afresh and wait for its load event; the seconds from the request to it. The
        records above start empty for it. (Going to another fragment of the page already open is no
        load: a test sets location.hash for that.)"""
        if self._url.split("#")[0] == url.split("#")[0]:
            self.open("about:blank")
        self._url = url
        for record in (self.requests, self.exceptions, self.console_errors, self.dialogs):
            record.clear()  # what a test reads is this page's
        self._loaded = False
        start = time.perf_counter()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while not self._loaded:
            self._event(self._read(deadline, f"the load event of {url}"))
        return time.perf_counter() - start

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited); its exception raised."""
        got = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"chromium: {expression!r}: {got['exceptionDetails'].get('exception', got['exceptionDetails'])}")
        return got["result"].get("value")

    def press(self, key: str, code: str | None = None, key_code: int = 0) -> None:
        """A real key press, as the keyboard sends it (Tab, Enter, ArrowDown...)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code or key, windowsVirtualKeyCode=key_code)

    def type(self, text: str) -> None:
        """Text into the focused field, as an input method would insert it."""
        self.call("Input.insertText", text=text)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self._call("Browser.close")
        except (EOFError, TimeoutError, OSError):
            pass  # already gone; wait() below reaps it either way
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()
