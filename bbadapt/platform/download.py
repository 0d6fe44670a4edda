"""Pretrained zoo weights, fetched so that a user can trust the first run.

Why bbadapt does not call mxnet's or gluoncv's own downloaders: both call ``requests.get``
without a timeout (a server that accepts and never answers hangs forever), print nothing a
user sees, and leave debris in the cache after a failure (partial ``.zip<uuid>`` files, temp
directories, a mismatching ``.params`` that every later run downloads again, gluoncv's
``.lock``). gluoncv also takes a lock *in the cache directory* before it looks at the file,
so a read-only cache that already holds the right weights fails.

What this module keeps from the zoos: their URL layout
(``{MXNET_GLUON_REPO}gluon/models/{name}-{sha1[:8]}.zip``, holding ``{name}-{sha1[:8]}.params``),
their sha1 tables (``model_store._model_sha1``), and their cache (``$MXNET_HOME/models``,
default ``~/.mxnet/models``), so files either of them downloaded are reused and vice versa.

What it adds: connect/read timeouts (``BBADAPT_DOWNLOAD_TIMEOUT``: ``SECONDS`` or
``CONNECT,READ``), bounded retries of transient failures only
(``BBADAPT_DOWNLOAD_RETRIES``), a bound on the whole download's silence
(``BBADAPT_DOWNLOAD_STALL``, 60 s: the seconds without a byte, summed over every attempt; a
server that accepts the connection and never answers is not retried, so it costs one stall, not
three), a progress line while waiting, streaming into a temp file in the cache, a zip that must hold
exactly the expected member (sizes checked before inflating), the sha1 verified before an
atomic rename, and nothing new left in the cache after any failure. A cached file is
verified by its sha1 and used without writing anything, so a read-only cache works.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bbadapt.platform.errors import WeightsError

ENV_TIMEOUT = "BBADAPT_DOWNLOAD_TIMEOUT"
ENV_RETRIES = "BBADAPT_DOWNLOAD_RETRIES"
ENV_STALL = "BBADAPT_DOWNLOAD_STALL"
DEFAULT_STALL = 60.0  # seconds without data a whole download may spend, all attempts together
DEFAULT_TIMEOUT = (15.0, 60.0)  # seconds to connect, seconds without a byte while reading
DEFAULT_RETRIES = 2  # further attempts after a transient failure (3 in all)
MAX_PARAMS_BYTES = 2 << 30  # the largest zoo .params is ~0.4 GB; a zip declaring more is refused
MAX_RATIO = 20  # float32 weights barely compress (~1.1x); a zip bomb declares ratios of 1000s
CHUNK = 1 << 20
DEFAULT_REPO = "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/"
URL_FORMAT = "{repo}gluon/models/{file_name}.zip"  # both zoos' layout (model_store._url_format)
HINT = "pass --weights PATH (a .params file) or --weights random"

Say = Callable[[object], None]  # a progress callback; receives str() -able objects


# --------------------------------------------------------------------------- what to fetch


@dataclass(frozen=True)
class ZooFile:
    """One pretrained file of a model zoo: where it comes from, what it must hash to, where it is cached."""

    name: str  # the zoo's own name for the weights (gluoncv's pruned nets: "resnet18_v1b_2.6x")
    sha1: str
    repo: str  # base URL ending in "/"
    cache: Path  # the models directory

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.sha1[:8]}"

    @property
    def url(self) -> str:
        return URL_FORMAT.format(repo=self.repo, file_name=self.file_name)

    @property
    def path(self) -> Path:
        return self.cache / f"{self.file_name}.params"

    @property
    def member(self) -> str:
        return f"{self.file_name}.params"


@dataclass(frozen=True)
class Fetched:
    """A verified weights file in the cache, and what the manifest records about it."""

    path: Path
    url: str
    sha1: str  # the zoo's
    sha256: str  # of the .params file, as bbadapt records every file
    downloaded: bool

    def provenance(self) -> dict:
        return {"url": self.url, "zoo_sha1": self.sha1, "file_sha256": self.sha256, "cache_file": str(self.path)}


@dataclass(frozen=True)
class DownloadOptions:
    """Timeouts and retries; :meth:`from_env` reads the environment variables."""

    connect_timeout: float = DEFAULT_TIMEOUT[0]
    read_timeout: float = DEFAULT_TIMEOUT[1]
    retries: int = DEFAULT_RETRIES
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    stall_limit: float = DEFAULT_STALL  # seconds without data, summed over all attempts, before giving up

    @classmethod
    def from_env(cls) -> DownloadOptions:
        text = os.environ.get(ENV_TIMEOUT, "").strip()
        connect, read = DEFAULT_TIMEOUT
        if text:
            parts = text.split(",")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                values = []
            if len(values) not in (1, 2) or not all(0 < v < 1e6 for v in values):
                raise WeightsError(f"{ENV_TIMEOUT}={text!r}: give SECONDS or CONNECT,READ seconds (e.g. 10 or 5,60)")
            connect, read = values if len(values) == 2 else (values[0], values[0])
        retries_text = os.environ.get(ENV_RETRIES, "").strip()
        retries = DEFAULT_RETRIES
        if retries_text:
            if not retries_text.isdecimal() or int(retries_text) > 20:
                raise WeightsError(f"{ENV_RETRIES}={retries_text!r}: give a number of retries from 0 to 20")
            retries = int(retries_text)
        stall_text = os.environ.get(ENV_STALL, "").strip()
        stall = DEFAULT_STALL
        if stall_text:
            try:
                stall = float(stall_text)
            except ValueError:
                stall = -1.0
            if not 0 < stall < 1e6:
                raise WeightsError(f"{ENV_STALL}={stall_text!r}: give the seconds a download may go without data (e.g. 60)")
        return cls(connect, read, retries, stall_limit=stall)


def cache_dir() -> Path:
    """``$MXNET_HOME/models`` (default ``~/.mxnet/models``), the directory both zoos use."""
    home = os.environ.get("MXNET_HOME") or os.path.join("~", ".mxnet")
    return Path(os.path.expanduser(home)) / "models"


def repo_url() -> str:
    """``MXNET_GLUON_REPO`` (a mirror), else the zoos' default, always ending in "/"."""
    repo = os.environ.get("MXNET_GLUON_REPO") or DEFAULT_REPO
    return repo if repo.endswith("/") else repo + "/"


def sha1_table(library: str) -> dict[str, str]:
    """The zoo's own name -> sha1 table (``model_store._model_sha1``) of ``mxnet`` or ``gluoncv``."""
    if library == "mxnet":
        from mxnet.gluon.model_zoo import model_store
    else:
        from bbadapt.platform.gluoncv_import import import_gluoncv

        import_gluoncv()
        from gluoncv.model_zoo import model_store
    return model_store._model_sha1


def zoo_file(library: str, name: str) -> ZooFile:
    """The :class:`ZooFile` a zoo publishes under ``name``; WeightsError when it publishes none."""
    sha1 = sha1_table(library).get(name)
    if not sha1:
        raise WeightsError(f"the {library} model zoo publishes no pretrained weights named {name}; {HINT}")
    return ZooFile(name, sha1, repo_url(), cache_dir())


# --------------------------------------------------------------------------- fetching


class _Transient(Exception):
    """A failure worth another attempt (timeouts, dropped connections, 5xx); ``stalled``: the seconds it spent
    waiting for data; ``silent``: the server accepted the connection and never answered (not worth another)."""

    def __init__(self, message: str, stalled: float = 0.0, silent: bool = False):
        super().__init__(message)
        self.stalled, self.silent = stalled, silent


def fetch(zf: ZooFile, options: DownloadOptions | None = None, say: Say | None = None) -> Fetched:
    """The verified cached file of ``zf``, downloaded first when it is not in the cache.

    A cached file is hashed and used without writing anything (read-only caches work). A
    cached file with the wrong sha1 is replaced only by a verified download. After any
    failure the cache holds nothing it did not hold before.
    """
    say = say or (lambda _m: None)
    if zf.path.is_file():
        sha1, sha256 = _digests(zf.path)
        if sha1 == zf.sha1:
            return Fetched(zf.path, zf.url, zf.sha1, sha256, downloaded=False)
        say(f"{zf.path} does not match the zoo's sha1: downloading it again")
    options = options or DownloadOptions.from_env()
    with _cache_dirs(zf.cache) as cache, _temp_file(cache, zf.file_name, ".zip") as archive:
        _download(zf.url, archive, options, say)
        with _temp_file(cache, zf.file_name, ".params") as params:
            sha1, sha256 = _unpack(zf, archive, params)
            if sha1 != zf.sha1:
                raise WeightsError(f"the weights from {zf.url} do not match the zoo's sha1 (expected {zf.sha1}, got "
                                   f"{sha1}): the server holds a different or damaged file; nothing was kept; {HINT}")
            params.chmod(0o666 & ~_umask())
            os.replace(params, zf.path)
    return Fetched(zf.path, zf.url, zf.sha1, sha256, downloaded=True)


def _download(url: str, dest: Path, options: DownloadOptions, say: Say) -> None:
    """Stream ``url`` into ``dest``, retrying transient failures with backoff, within the stall budget.

    Every attempt may wait for data only as long as the budget (``stall_limit``) has left; a server
    that never answered is not asked again, and a spent budget ends the download."""
    attempts = options.retries + 1
    stalled = 0.0
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, dest, options, say, options.stall_limit - stalled)
            return
        except _Transient as exc:
            stalled += exc.stalled
            if exc.silent:
                raise WeightsError(f"could not download {url}: {exc}; {HINT}") from None
            if stalled >= options.stall_limit:
                raise WeightsError(f"could not download {url}: no data for {stalled:g} s from {_host(url)} in all "
                                   f"({attempt} attempts; the limit, set {ENV_STALL} to wait longer); {HINT}") from None
            if attempt == attempts:
                tries = f" (after {attempts} attempts)" if attempts > 1 else ""
                raise WeightsError(f"could not download {url}: {exc}{tries}; {HINT}") from None
            delay = options.backoff * 2 ** (attempt - 1)
            say(f"download of {url} failed ({exc}); retrying in {delay:g} s ({attempt}/{options.retries})")
            time.sleep(delay)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def _transfer(url: str, dest: Path, options: DownloadOptions, say: Say, budget: float) -> None:
    """One attempt; it waits for data at most ``budget`` seconds at a time (what the stall budget has left)."""
    import requests

    timeout = (min(options.connect_timeout, budget), min(options.read_timeout, budget))
    waiting = Waiting(_host(url), timeout[1], say)
    answered = False
    try:
        with waiting, requests.get(url, stream=True, timeout=timeout) as response:
            answered = True
            waiting.data()
            _check_status(url, response)
            total = _content_length(response)
            if total is not None and total > MAX_PARAMS_BYTES:
                raise WeightsError(f"{url} announces {total:,} bytes, more than any zoo weights file "
                                   f"({MAX_PARAMS_BYTES:,}); refused; {HINT}")
            status = TransferStatus(url, total)
            say(status)
            with open(dest, "wb") as out:
                for chunk in response.iter_content(CHUNK):
                    waiting.data()
                    if status.done == 0:
                        _check_start(url, chunk, response.headers.get("Content-Type", ""))
                    out.write(chunk)
                    status.advance(len(chunk))
                    if status.done > MAX_PARAMS_BYTES:
                        raise WeightsError(f"{url} sends more than {MAX_PARAMS_BYTES:,} bytes; refused; {HINT}")
                    if status.due():
                        say(status)
            if total is not None and status.done != total:
                raise _Transient(f"the connection closed after {status.done:,} of {total:,} bytes")
            status.finish()
            say(status)
    except requests.exceptions.ConnectTimeout:
        raise _Transient(f"no connection within {timeout[0]:g} s (connect timeout)", stalled=timeout[0]) from None
    except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
        if _is_read_timeout(exc) and not answered:
            raise _Transient(f"no data for {timeout[1]:g} s from {_host(url)}: it accepted the connection and never "
                             f"answered (read timeout; set {ENV_STALL} to wait longer)", stalled=timeout[1],
                             silent=True) from None
        if _is_read_timeout(exc):
            raise _Transient(f"no data for {timeout[1]:g} s (read timeout; set {ENV_TIMEOUT} "
                             "to wait longer)", stalled=timeout[1]) from None
        raise _Transient(f"connection failed ({_root_cause(exc)}); offline or a wrong MXNET_GLUON_REPO?") from None
    except requests.exceptions.ChunkedEncodingError as exc:
        raise _Transient(f"the transfer broke off ({_root_cause(exc)})") from None
    except requests.exceptions.RequestException as exc:  # invalid URL, too many redirects ...
        raise WeightsError(f"could not download {url}: {_root_cause(exc)}; {HINT}") from None
    except OSError as exc:
        raise WeightsError(f"cannot write the download of {url} to {dest.parent}: {exc.strerror or exc}; {HINT}") from None


def _check_status(url: str, response) -> None:
    code = response.status_code
    if code == 200:
        return
    reason = f"HTTP {code} {response.reason or ''}".strip()
    if code >= 500 or code == 429:
        raise _Transient(f"the server answered {reason}")
    raise WeightsError(f"could not download {url}: the server answered {reason}; {HINT}")


def _content_length(response) -> int | None:
    text = response.headers.get("Content-Length", "")
    return int(text) if text.isdecimal() else None


def _check_start(url: str, chunk: bytes, content_type: str) -> None:
    """The first bytes must start a zip: an HTML page (captive portal, error page) is named as such."""
    if chunk.startswith(b"PK"):  # a local file header, or an empty archive's end record
        return
    head = chunk[:512].lstrip().lower()
    if "html" in content_type.lower() or head.startswith((b"<!doctype html", b"<html", b"<")):
        raise WeightsError(f"{url} answered with an HTML page ({content_type or 'no Content-Type'}), not a zip: "
                           f"a proxy or captive portal, or a wrong MXNET_GLUON_REPO; {HINT}")
    raise WeightsError(f"{url} answered with something that is not a zip ({content_type or 'no Content-Type'}); {HINT}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it wraps (requests wraps urllib3 wraps socket errors), outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        wrapped = [getattr(exc, "reason", None), exc.args[0] if exc.args else None, exc.__cause__]
        exc = next((w for w in wrapped if isinstance(w, BaseException)), None)


def _is_read_timeout(exc: BaseException) -> bool:
    import urllib3

    return any(isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError)) for e in _chain(exc))


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error chain, in one line, never cut mid-word."""
    cause = list(_chain(exc))[-1]
    text = str(cause) or type(cause).__name__
    text = re.sub(r"^<[^>]*>: ", "", text)  # urllib3 starts with the repr of its connection object
    return shorten(text)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters, cut at a word boundary with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0]
    return cut + "…"


def _unpack(zf: ZooFile, archive: Path, params: Path) -> tuple[str, str]:
    """Inflate the one expected member of ``archive`` into ``params``; (sha1, sha256) of what was written."""
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            names = [m.filename for m in members]
            if names != [zf.member]:
                raise WeightsError(f"the zip from {zf.url} holds {', '.join(map(repr, names[:3])) or 'nothing'}"
                                   f"{' ...' if len(names) > 3 else ''}, not just {zf.member}; refused; {HINT}")
            info = members[0]
            if info.file_size > MAX_PARAMS_BYTES or info.file_size > MAX_RATIO * max(info.compress_size, 1) + CHUNK:
                raise WeightsError(f"the zip from {zf.url} declares {info.file_size:,} bytes from "
                                   f"{info.compress_size:,} compressed; refused (a zip bomb?); {HINT}")
            sha1, sha256 = hashlib.sha1(), hashlib.sha256()
            with z.open(info) as src, open(params, "wb") as out:
                while chunk := src.read(CHUNK):
                    sha1.update(chunk)
                    sha256.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise WeightsError(f"the zip from {zf.url} is damaged ({shorten(str(exc) or type(exc).__name__)}); {HINT}") from None
    except OSError as exc:
        raise WeightsError(f"cannot unpack the weights into {params.parent}: {exc.strerror or exc}; {HINT}") from None
    return sha1.hexdigest(), sha256.hexdigest()


def _digests(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha1.update(chunk)
                sha256.update(chunk)
    except OSError as exc:
        raise WeightsError(f"cannot read the cached weights {path}: {exc.strerror or exc}; {HINT}") from None
    return sha1.hexdigest(), sha256.hexdigest()


# --------------------------------------------------------------------------- cache hygiene


@contextmanager
def _cache_dirs(cache: Path) -> Iterator[Path]:
    """Create ``cache`` (and missing parents); remove what was created if the block fails."""
    created = []
    for directory in reversed([cache, *cache.parents]):
        if directory.exists():
            continue
        try:
            directory.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        except OSError as exc:
            _remove_empty(created)
            raise WeightsError(f"cannot create the weights cache {cache}: {exc.strerror or exc} (set MXNET_HOME "
                               f"to a writable directory); {HINT}") from None
        created.append(directory)
    try:
        yield cache
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(created: list[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()  # only if still empty: another process may have put its file there
        except OSError:
            return


@contextmanager
def _temp_file(cache: Path, stem: str, suffix: str) -> Iterator[Path]:
    """A fresh hidden file in the cache, removed when the block ends unless it was renamed away."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{suffix}.download", dir=cache)
        os.close(fd)
    except OSError as exc:
        raise WeightsError(f"cannot write to the weights cache {cache}: {exc.strerror or exc} (set MXNET_HOME "
                           f"to a writable directory); {HINT}") from None
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- progress


class Waiting:
    """While a transfer waits for data, a progress line every few seconds: "waiting for HOST: no data for N s".

    Why a thread: the wait happens inside a blocking socket read (requests), which says nothing until it
    times out; without these lines a silent server looks like a hung bbadapt. The lines come no more
    often than every :data:`WAIT_INTERVAL` seconds, and at least three times before ``limit``.
    """

    WAIT_INTERVAL = 5.0

    def __init__(self, host: str, limit: float, say: Say):
        import threading

        self.host, self.limit, self.say = host, limit, say
        self.interval = max(min(self.WAIT_INTERVAL, limit / 3), 0.5)
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bbadapt-download-wait", daemon=True)

    def data(self) -> None:
        """Data (or an answer) arrived: the silence starts again from now."""
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self.last
            if silent >= self.interval:
                self.say(f"waiting for {self.host}: no data for {silent:.0f} s (gives up after {self.limit:g} s)")

    def __enter__(self) -> Waiting:
        self.last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


class TransferStatus:
    """Progress of one transfer: ``str()`` gives a plain line, a rich console draws a live bar.

    Handed to the progress callback: a terminal spinner (``rich`` Status) re-renders it on every
    refresh, so one hand-over gives a live bar; a plain callback prints ``str()`` when
    :meth:`due` says another line is worth printing (every few seconds).
    """

    PLAIN_INTERVAL = 5.0

    def __init__(self, url: str, total: int | None):
        self.url, self.total = url, total
        self.done = 0
        self.started = time.monotonic()
        self.last_said = self.started
        self.finished = False
        self.interactive = sys.stderr.isatty()

    def advance(self, n: int) -> None:
        self.done += n

    def finish(self) -> None:
        self.finished = True

    def due(self) -> bool:
        """True every few seconds (plain lines); never on a terminal, where the bar redraws itself."""
        now = time.monotonic()
        if self.interactive or now - self.last_said < self.PLAIN_INTERVAL:
            return False
        self.last_said = now
        return True

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def __str__(self) -> str:
        of = f" of {_mb(self.total)}" if self.total else ""
        verb = "downloaded" if self.finished else "downloading"
        return f"{verb} {self.url}: {_mb(self.done)}{of} at {_mb(self.rate)}/s"

    def __rich__(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        of = f"/{_mb(self.total)}" if self.total else ""
        grid.add_row(f"downloading {self.url}", ProgressBar(total=self.total, completed=self.done, width=30),
                     f"{_mb(self.done)}{of}", f"{_mb(self.rate)}/s")
        return grid


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
