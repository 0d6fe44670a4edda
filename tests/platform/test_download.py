"""Pretrained weights from a model-zoo mirror: a first download a user can trust.

A real HTTP server on 127.0.0.1 (port 0, in a thread) plays the zoo mirror
(``MXNET_GLUON_REPO``), with files laid out as the zoos publish them:
``gluon/models/NAME-SHA1[:8].zip`` holding ``NAME-SHA1[:8].params``. The success path runs
the real CLI in a subprocess (mxnet reads ``MXNET_HOME`` at import) with the zoo's sha1
table extended by the fixture (``tests/platform/zoo_cli.py``); the failure cases call
:func:`bbadapt.platform.download.fetch` directly, each followed by the same cache-hygiene
assertion: after a failure the cache holds nothing it did not hold before.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bbadapt.platform import download
from bbadapt.platform.download import DownloadOptions, ZooFile, fetch
from bbadapt.platform.errors import WeightsError

ZOO_CLI = Path(__file__).with_name("zoo_cli.py")
FAST = DownloadOptions(connect_timeout=2, read_timeout=1, retries=1, backoff=0.05)


# --------------------------------------------------------------------------- the mirror


class Mirror:
    """A zoo mirror on 127.0.0.1: ``routes[path] = (status, content type, body)`` or a behaviour name.

    Behaviours: ``"stall"`` sends the headers and half the body of ``stall_body``, then nothing.
    Every request path is recorded in ``requests``.
    """

    def __init__(self):
        self.routes: dict[str, object] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                mirror.requests.append(self.path)
                route = mirror.routes.get(self.path, (404, "text/plain", b"not found"))
                if isinstance(route, tuple) and route[0] == "stall":
                    body = route[1]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/zip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    mirror.release.wait(30)
                    return
                status, ctype, body = route
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def publish(self, name: str, params: bytes, members: dict[str, bytes] | None = None) -> ZooFile:
        """Publish ``params`` as the zoo publishes weights (``members`` replaces the zip's content)."""
        sha1 = hashlib.sha1(params).hexdigest()
        zf = ZooFile(name, sha1, self.url, Path("unused"))
        self.routes[f"/gluon/models/{zf.file_name}.zip"] = (200, "application/zip",
                                                            zip_bytes(members or {zf.member: params}))
        return zf

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror():
    m = Mirror()
    yield m
    m.close()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def toy_params(n_bytes: int = 3 << 20, seed: int = 0) -> bytes:
    return np.random.RandomState(seed).bytes(n_bytes)


def snapshot(root: Path) -> dict[str, str] | None:
    """Every path under ``root`` with its sha256 (directories: "dir"); None when ``root`` is absent."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def in_cache(zf: ZooFile, home: Path) -> ZooFile:
    return ZooFile(zf.name, zf.sha1, zf.repo, home / "models")


def refused(zf: ZooFile, home: Path, options: DownloadOptions = FAST) -> str:
    """Fetch ``zf`` into ``home``, expect one WeightsError line, and check the cache is as before."""
    before = snapshot(home)
    with pytest.raises(WeightsError) as caught:
        fetch(in_cache(zf, home), options)
    message = str(caught.value)
    assert "\n" not in message and zf.url in message and "--weights random" in message
    assert snapshot(home) == before, "the cache changed although the download failed"
    return message


# --------------------------------------------------------------------------- failures, in-process


def test_a_stall_mid_transfer_times_out_retries_and_leaves_no_partial_file(mirror, tmp_path):
    zf = mirror.publish("toy", toy_params())
    path = f"/gluon/models/{zf.file_name}.zip"
    mirror.routes[path] = ("stall", mirror.routes[path][2])
    home = tmp_path / "mxnet-home"  # does not exist: no empty ~/.mxnet/models may be left behind
    message = refused(zf, home)
    assert "no data for 1 s (read timeout" in message and "after 2 attempts" in message
    assert mirror.requests == [path, path]
    assert not home.exists()


def test_a_server_that_accepts_and_never_answers_times_out(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    try:
        zf = ZooFile("toy", "0" * 40, f"http://127.0.0.1:{silent.getsockname()[1]}/", Path("unused"))
        message = refused(zf, tmp_path / "mxnet-home", DownloadOptions(2, 1, retries=0))
    finally:
        silent.close()
    assert "read timeout" in message and "offline" not in message


class SilentServer:
    """Accepts every connection and never sends a byte (what a wedged mirror or a black-holing proxy does);
    ``connections`` counts the connections it accepted."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.host = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.url = f"http://{self.host}/"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        self.socket.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def test_a_silent_server_is_asked_once_and_the_line_names_the_host_and_the_wait(silent, tmp_path):
    zf = ZooFile("toy", "0" * 40, silent.url, Path("unused"))
    said: list[str] = []
    options = DownloadOptions(connect_timeout=2, read_timeout=60, retries=2, stall_limit=1.5)
    with pytest.raises(WeightsError) as caught:
        fetch(in_cache(zf, tmp_path / "mxnet-home"), options, say=lambda m: said.append(str(m)))
    message = str(caught.value)
    assert f"no data for 1.5 s from {silent.host}" in message and "never answered" in message
    assert len(silent.accepted) == 1, "a server that never answered must not be asked again"
    assert any(line.startswith(f"waiting for {silent.host}: no data for ") for line in said), said
    assert not (tmp_path / "mxnet-home").exists()


def test_a_server_that_answers_is_retried_but_the_silences_add_up_to_the_stall_limit(mirror, tmp_path):
    zf = mirror.publish("toy", toy_params())
    path = f"/gluon/models/{zf.file_name}.zip"
    mirror.routes[path] = ("stall", mirror.routes[path][2])
    options = DownloadOptions(connect_timeout=2, read_timeout=1, retries=5, backoff=0.05, stall_limit=1.5)
    message = refused(zf, tmp_path / "mxnet-home", options)
    assert f"no data for 1.5 s from {mirror.url[7:-1]} in all (2 attempts" in message
    assert mirror.requests == [path, path]


def test_by_default_a_whole_download_waits_60_s_for_data_at_most(monkeypatch):
    for name in (download.ENV_TIMEOUT, download.ENV_RETRIES, download.ENV_STALL):
        monkeypatch.delenv(name, raising=False)
    options = DownloadOptions.from_env()
    assert options.stall_limit == 60 and options.read_timeout <= options.stall_limit


@pytest.mark.parametrize("value", ["never", "0", "-1"])
def test_a_bad_stall_setting_is_one_line(monkeypatch, value):
    monkeypatch.setenv(download.ENV_STALL, value)
    with pytest.raises(WeightsError, match=download.ENV_STALL):
        DownloadOptions.from_env()


def test_a_refused_connection_retries_and_suggests_offline_or_a_wrong_mirror(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    zf = ZooFile("toy", "0" * 40, f"http://127.0.0.1:{port}/", Path("unused"))
    message = refused(zf, tmp_path / "mxnet-home")
    assert "Connection refused" in message and "offline or a wrong MXNET_GLUON_REPO" in message
    assert "after 2 attempts" in message


def test_a_sha1_mismatch_names_both_hashes_keeps_nothing_and_is_not_retried(mirror, tmp_path):
    zf = mirror.publish("toy", toy_params())
    mirror.routes[f"/gluon/models/{zf.file_name}.zip"] = (200, "application/zip",
                                                          zip_bytes({zf.member: toy_params(seed=1)}))
    home = tmp_path / "mxnet-home"
    message = refused(zf, home)
    assert f"expected {zf.sha1}" in message and "do not match the zoo's sha1" in message
    assert "offline" not in message
    assert len(mirror.requests) == 1, "a file with the wrong hash is not fetched again and again"


def test_a_damaged_cached_file_is_replaced_only_by_a_verified_download(mirror, tmp_path):
    params = toy_params()
    zf = in_cache(mirror.publish("toy", params), tmp_path / "mxnet-home")
    zf.cache.mkdir(parents=True)
    zf.path.write_bytes(b"damaged")
    mirror.routes[f"/gluon/models/{zf.file_name}.zip"] = (200, "application/zip", zip_bytes({zf.member: b"wrong"}))
    refused(zf, zf.cache.parent)
    assert zf.path.read_bytes() == b"damaged", "a failed download must not touch what was there"
    mirror.publish("toy", params)
    got = fetch(zf, FAST)
    assert got.downloaded and zf.path.read_bytes() == params
    assert sorted(p.name for p in zf.cache.iterdir()) == [zf.path.name]


def test_an_html_answer_is_named_as_such(mirror, tmp_path):
    zf = mirror.publish("toy", toy_params())
    mirror.routes[f"/gluon/models/{zf.file_name}.zip"] = (200, "text/html; charset=utf-8",
                                                          b"<!DOCTYPE html><html><body>Sign in to the Wi-Fi</body></html>")
    message = refused(zf, tmp_path / "mxnet-home")
    assert "HTML page" in message and "not a zip" in message and "offline" not in message


def test_a_missing_file_is_a_404_and_not_retried(mirror, tmp_path):
    zf = ZooFile("toy", "1" * 40, mirror.url, Path("unused"))
    message = refused(zf, tmp_path / "mxnet-home")
    assert "HTTP 404" in message and len(mirror.requests) == 1


@pytest.mark.parametrize("members", [
    {"{member}": b"weights", "readme.txt": b"extra"},
    {"../../escape.params": b"weights"},
    {},
], ids=["extra-member", "path-outside", "empty-zip"])
def test_a_zip_without_exactly_the_expected_member_is_refused(mirror, tmp_path, members):
    zf = mirror.publish("toy", b"weights")
    mirror.routes[f"/gluon/models/{zf.file_name}.zip"] = (
        200, "application/zip", zip_bytes({k.format(member=zf.member): v for k, v in members.items()}))
    home = tmp_path / "mxnet-home"
    message = refused(zf, home)
    assert "not just" in message and zf.member in message
    assert not (tmp_path / "escape.params").exists()


def test_a_zip_bomb_is_refused_before_inflating(mirror, tmp_path):
    zf = mirror.publish("toy", b"weights")
    bomb = zip_bytes({zf.member: bytes(64 << 20)})  # 64 MB of zeros: ~64 KB compressed
    mirror.routes[f"/gluon/models/{zf.file_name}.zip"] = (200, "application/zip", bomb)
    message = refused(zf, tmp_path / "mxnet-home")
    assert "zip bomb" in message


def test_a_cached_valid_file_is_used_without_any_request_or_write(mirror, tmp_path):
    params = toy_params(1 << 16)
    zf = in_cache(mirror.publish("toy", params), tmp_path / "mxnet-home")
    first = fetch(zf, FAST)
    before = snapshot(zf.cache)
    second = fetch(zf, FAST)
    assert first.downloaded and not second.downloaded and len(mirror.requests) == 1
    assert second.sha256 == hashlib.sha256(params).hexdigest() == first.sha256
    assert snapshot(zf.cache) == before


@pytest.mark.parametrize("value", ["soon", "0", "1,2,3", "-4"])
def test_a_bad_timeout_setting_is_one_line(monkeypatch, value):
    monkeypatch.setenv(download.ENV_TIMEOUT, value)
    with pytest.raises(WeightsError, match=download.ENV_TIMEOUT):
        DownloadOptions.from_env()


def test_timeouts_and_retries_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(download.ENV_TIMEOUT, "3,40")
    monkeypatch.setenv(download.ENV_RETRIES, "0")
    assert DownloadOptions.from_env() == DownloadOptions(3.0, 40.0, 0)


def test_long_reasons_are_shortened_at_a_word_boundary():
    text = "word " * 100
    short = download.shorten(text, 50)
    assert len(short) <= 50 and short.endswith("word…")


# --------------------------------------------------------------------------- the CLI, end to end


def run_zoo_cli(*args, home: Path, repo: str, tables: dict | None = None, readonly: Path | None = None,
                extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BBADAPT_DEBUG"}
    env.update(MXNET_HOME=str(home), MXNET_GLUON_REPO=repo, ZOO_CLI_SHA1=json.dumps(tables or {}), COLUMNS="200",
               PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]),
                                                                         env.get("PYTHONPATH", "")]))
    if readonly is not None:
        env["ZOO_CLI_READONLY"] = str(readonly)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(ZOO_CLI), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def random_zoo_params(name: str, tmp_path: Path) -> bytes:
    """A zoo architecture's parameters (seeded random), as the zoo's .params file holds them."""
    import mxnet as mx

    from bbadapt.core import zoo

    mx.random.seed(0)
    net = zoo.build(name)
    path = tmp_path / f"{name}.params"
    net.save_parameters(str(path))
    return path.read_bytes()


@pytest.mark.parametrize("model, library", [("resnet18_v1", "mxnet"), ("cifar_resnet20_v1", "gluoncv")])
def test_first_download_is_verified_recorded_and_reused_without_a_request(mirror, tmp_path, model, library):
    params = random_zoo_params(model, tmp_path)
    zf = mirror.publish(model, params)
    tables = {library: {model: zf.sha1}}
    home = tmp_path / "mxnet-home"
    sizes = "32x32"

    first = run_zoo_cli("convert", model, "--sizes", sizes, "-o", tmp_path / "a", home=home, repo=mirror.url,
                        tables=tables)
    assert first.returncode == 0, first.stderr
    url = f"{mirror.url}gluon/models/{zf.file_name}.zip"
    assert f"downloading {url}" in first.stderr and f"downloaded {url}: " in first.stderr
    provenance = json.loads((tmp_path / "a" / "manifest.json").read_text())["weights"]
    assert provenance["url"] == url and provenance["zoo_sha1"] == zf.sha1
    assert provenance["file_sha256"] == hashlib.sha256(params).hexdigest()
    assert sorted(snapshot(home)) == ["models", f"models/{zf.file_name}.params"]
    requests_after_first = list(mirror.requests)

    second = run_zoo_cli("convert", model, "--sizes", sizes, "-o", tmp_path / "b", home=home, repo=mirror.url,
                         tables=tables)
    assert second.returncode == 0, second.stderr
    assert mirror.requests == requests_after_first, "the cached, verified file must be used without a request"
    if library != "gluoncv":
        return
    cache = snapshot(home)
    mirror.close()  # gluoncv's own loader took a lock in the cache: now no mirror, and a read-only cache
    third = run_zoo_cli("convert", model, "--sizes", sizes, "-o", tmp_path / "c", home=home, repo=mirror.url,
                        tables=tables, readonly=home)
    assert third.returncode == 0, third.stderr
    assert snapshot(home) == cache


def test_the_cli_reports_a_mirror_that_never_answers_in_one_line_and_leaves_no_cache(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    home = tmp_path / "mxnet-home"
    try:
        result = run_zoo_cli("convert", "cifar_resnet20_v1", "-o", tmp_path / "out", home=home,
                             repo=f"http://127.0.0.1:{silent.getsockname()[1]}",
                             extra_env={download.ENV_TIMEOUT: "1", download.ENV_RETRIES: "1"})
    finally:
        silent.close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1].startswith("bbadapt: error: could not download http://127.0.0.1:")
    assert "read timeout" in lines[-1] and "Traceback" not in result.stderr
    assert not home.exists() and not (tmp_path / "out").exists()


def test_the_cli_gives_up_on_a_silent_mirror_within_the_stall_limit_with_progress_while_waiting(silent, tmp_path):
    import time

    home = tmp_path / "mxnet-home"
    started = time.monotonic()
    result = run_zoo_cli("convert", "cifar_resnet20_v1", "-o", tmp_path / "out", home=home, repo=silent.url,
                         extra_env={download.ENV_STALL: "3"})
    elapsed = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("bbadapt: error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert f"no data for 3 s from {silent.host}" in errors[0] and "Traceback" not in result.stderr
    assert f"waiting for {silent.host}: no data for " in result.stderr
    assert len(silent.accepted) == 1
    assert elapsed < 60, f"a 3 s stall limit took {elapsed:.0f} s"  # the bound, generous on 2 loaded cores
    assert not home.exists() and not (tmp_path / "out").exists()
