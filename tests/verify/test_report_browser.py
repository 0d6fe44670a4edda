"""report.html in a real headless browser (Debian's Chromium, driven over the DevTools protocol).

For a pass, a fail, an approximate fold and random weights: the page renders, every plot image
decodes, nothing is logged to the console, and the verdict banner says the right word in the
right colour. Screenshots go to pytest's tmp_path, never into the repository.

Chromium comes from the system packages (``apt-get install -y chromium``; ``.ci/run`` installs
it). The reports come from real checks of the CIFAR ResNet-20 (seconds each).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bbadapt.bundle import describe
from bbadapt.bundle.schema import BundleManifest
from bbadapt.core.rewrite import adapt
from bbadapt.verify.equivalence import CheckOptions, check
from bbadapt.verify.report import write_reports
from tests.conftest import calibrated

MODEL = "cifar_resnet20_v1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe", "--window-size=1280,1600"]
BANNER_RGB = {"pass": (46, 125, 50), "fail": (198, 40, 40), "approx": (230, 81, 0)}
WEIGHTS_RGB = (255, 243, 205)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("report.html is tested in Chromium: apt-get install -y chromium (.ci/run installs it)")
    return found


class Browser:
    """A headless Chromium and one page, spoken to over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, profile: Path):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def wire():  # in the child: commands arrive on fd 3, replies leave on fd 4 (out of the way first)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     close_fds=False, preexec_fn=wire,  # os.pipe() ends are close-on-exec
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._next, self._buffer, self.events = 0, b"", []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _send(self, method: str, params: dict, session: bool) -> int:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        return self._next

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, **params) -> dict:
        wanted = self._send(method, params, session)
        while True:
            message = self._receive()
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive())

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"]["value"]

    def problems(self) -> list[str]:
        """Console calls, uncaught exceptions and error log entries (failed loads ...) since the page opened."""
        found = []
        for e in self.events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                found.append(f"console.{params['type']}: {[a.get('value') for a in params['args']]}")
            elif e.get("method") == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif e.get("method") == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(f"log {params['entry']['level']}: {params['entry']['text']}")
        return found

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self._send("Browser.close", {}, False)
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        finally:
            os.close(self._in)
            os.close(self._out)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _manifest(kind: str) -> BundleManifest:
    weights = ({"kind": "random", "seed": 0, "calibration": "16 packaged CIFAR-10 tiles"} if kind == "random"
               else {"kind": "file", "format": "gluon-export", "path": "/data/c20-symbol.json", "sha256": "ab" * 32,
                     "files": {"/data/c20-symbol.json": "ab" * 32, "/data/c20-0000.params": "cd" * 32}})
    return BundleManifest.from_dict({"schema_version": 1, "model": MODEL, "weights": weights, "source": {"name": "cifar", "order": "rgb", "scale": 1 / 255,
                                           "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]},
            "target": {"name": "rgb255", "order": "rgb", "scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]},
            "fold": "bn", "bn": "fused", "plan": [{"op": "fold_input", "into": "features.0"}, {"op": "fuse", "bn": "x"}],
            "params_file": "backbone.params", "params_sha256": "ef" * 32})


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """Real reports: an exact pass, a failure (the adapted net fed the wrong spec), an approximate
    fold, and a pass on random weights."""
    net = calibrated(MODEL)
    sizes = [(32, 32), (37, 29)]
    exact = adapt(net, "cifar", "rgb255", fold="bn", bn="fused")
    conv = adapt(net, "cifar", "rgb255", fold="conv", bn="fused")
    reports = {
        "pass": (check(net, "cifar", exact, options=CheckOptions(sizes=sizes, cifar=True)), _manifest("file")),
        "fail": (check(net, "cifar", exact.net, "rgb01", CheckOptions(sizes=sizes, cifar=True)), _manifest("file")),
        "approx": (check(net, "cifar", conv, options=CheckOptions(sizes=sizes, cifar=True)), _manifest("file")),
        "random": (check(net, "cifar", exact, options=CheckOptions(sizes=sizes, cifar=True)), _manifest("random")),
    }
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for name, (report, manifest) in reports.items():
        report = dataclasses.replace(report, model=MODEL)  # a CheckReport: frozen
        write_reports(report, root / name, describe.context(manifest), describe.weights_text(manifest))
        out[name] = root / name / "report.html"
    assert not json.loads((root / "fail" / "report.json").read_text())["passed"]
    assert json.loads((root / "approx" / "report.json").read_text())["exact"] is False
    return out


def _pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    from PIL import Image

    with Image.open(png) as img:
        a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int(np.sum(np.all(np.abs(a - np.array(rgb)) <= 2, axis=-1)))


def test_the_browser_check_itself_catches_console_errors_and_broken_images(browser, tmp_path):
    """Without this the tests below could not fail: a page with a script error and a broken image."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    '<script>console.error("boom")</script></body></html>')
    browser.open(page.as_uri())
    assert any("boom" in p for p in browser.problems())
    assert browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)") is False


@pytest.mark.parametrize("kind, verdict, banner", [
    ("pass", "PASSED", "pass"),
    ("fail", "FAILED", "fail"),
    ("approx", None, "approx"),
    ("random", "PASSED", "pass"),
])
def test_report_html_renders_cleanly_with_the_right_verdict(browser, pages, tmp_path, kind, verdict, banner):
    browser.open(pages[kind].as_uri())
    assert browser.problems() == []
    images = browser.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert images and all(ok for _, ok in images), images
    shown = browser.evaluate("""(() => { const b = document.getElementById('verdict');
        return [b.className, b.innerText, getComputedStyle(b).backgroundColor,
                document.getElementById('weights') ? document.getElementById('weights').innerText : null,
                document.querySelectorAll('#legend dt').length, document.querySelectorAll('th').length]; })()""")
    cls, text, color, weights, legend_terms, columns = shown
    assert cls == f"banner {banner}" and color == "rgb({}, {}, {})".format(*BANNER_RGB[banner])
    if kind == "approx":
        assert text.startswith(("PASSED (APPROXIMATE fold", "FAILED (APPROXIMATE fold")) and "not judged" in text
    else:
        assert text.startswith(verdict)
    assert (weights is not None) == (kind == "random")
    if weights:
        assert "NOT pretrained" in weights
    assert legend_terms == columns == 13  # every column explained (the yardstick's included)
    shot = browser.screenshot(tmp_path / f"report-{kind}.png")  # out of the repository
    assert _pixels(shot, BANNER_RGB[banner]) > 5000  # the banner is really painted in its colour
    assert (_pixels(shot, WEIGHTS_RGB) > 5000) == (kind == "random")
    assert _pixels(shot, BANNER_RGB["pass"]) == 0 or banner == "pass"  # an approximate or failed result is never green
