"""The one way bbadapt puts files on disk: staged, verified, then renamed into place.

Every writer (bundles, reports, checkpoints, exports) goes through this module so that the
same promises hold everywhere:

* nothing partial is ever visible at the target: work happens in a hidden sibling
  (``.NAME.partial-XXXX``) that is removed on any failure, Ctrl-C included;
* without ``force`` an existing target is never replaced, also when two runs race: the
  final step is a rename that fails if the target appeared meanwhile, under a lock on the
  parent directory, so exactly one run wins and the other gets "already exists";
* with ``force`` the caller decides what may be replaced (``replaceable``): bbadapt only
  ever replaces what it recognises as its own output;
* a symbolic link at the target is followed: the directory it points to is replaced and the
  link itself stays;
* the commit (a handful of renames) runs with SIGINT/SIGTERM deferred: once it starts it
  finishes, and the interrupt is delivered right after. Before it starts, an interrupt
  removes the stage and leaves the target as it was.

It lives in the core because every layer writes files (readers' safetensors writer
included); what a bbadapt output *is* is decided by the callers (:mod:`bbadapt.bundle`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bbadapt.platform.errors import OutputError

Replaceable = Callable[[Path], "str | None"]  # an existing target -> why it must not be replaced, or None


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def disk_full(where: Path, exc: BaseException) -> bool:
    """Whether ``exc`` (raised while writing under ``where``) means the disk is full.

    Libraries report it differently: OSError ENOSPC from Python, a C++ "No space left on
    device" inside an MXNetError, or only a short write: MXNet's ``mx.nd.save`` says
    "FileStream.Write incomplete" (seen on CI, with a few blocks still free, so the free-block
    count alone misses it). The file system's own free-block count decides when the message
    says nothing.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(sign in str(exc) for sign in ("No space left on device", "Disk quota exceeded", "Write incomplete")):
        return True
    try:
        return os.statvfs(where).f_bavail == 0
    except OSError:
        return False


STAGE_EXTRA = len(".") + len(".partial-") + 8  # what a stage's name adds to the target's (8: tempfile's random part)
INNER_NAME_BYTES = 64  # room for the files an output directory holds (report.html, detector/..., checkpoints)


def check_name(out: str | os.PathLike, suffix: str = "") -> None:
    """Refuse, in one OutputError line, a target name the file system or the writing libraries would refuse.

    Why here: the name is only used at the very end, after minutes of work, and then fails inside
    whichever library writes first (ENAMETOOLONG from ``mkdtemp``, MXNet's C++ writer refusing a
    name that is not valid UTF-8). Checked against the file system's own limits (``pathconf`` of the
    nearest existing ancestor), with room for the hidden stage name (``.NAME.partial-XXXXXXXX``).
    """
    text = os.fspath(out)
    shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"output name '{shown}' is not valid UTF-8 (MXNet writes UTF-8 names only); "
                          "choose another --out") from None
    absolute = Path(os.path.abspath(text))
    ancestor = next((p for p in (absolute, *absolute.parents) if os.path.isdir(p)), Path("/"))
    name_max, path_max = _limit(ancestor, "PC_NAME_MAX", 255), _limit(ancestor, "PC_PATH_MAX", 4096)
    for part in absolute.parts[1:]:
        size = len(part.encode("utf-8"))
        room = STAGE_EXTRA + len(suffix.encode("utf-8")) if part == absolute.name else 0
        if size + room > name_max:
            raise OutputError(f"output name {shorten_middle(part)!r} is {size} bytes; this file system allows "
                              f"{name_max}{f' (less {room} for the staging name)' if room else ''}; choose a shorter --out")
    if len(str(absolute).encode("utf-8")) + STAGE_EXTRA + INNER_NAME_BYTES > path_max:
        raise OutputError(f"output path {shorten_middle(str(absolute))!r} is too long for this file system "
                          f"(paths up to {path_max} bytes, with room for the files inside); choose a shorter --out")


def _limit(directory: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError):
        return default


def shorten_middle(text: str, limit: int = 60) -> str:
    """``text`` at most ``limit`` characters, its middle replaced by an ellipsis (long names stay recognisable)."""
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-(limit // 2 - 1):]}"


def resolve_target(out: str | os.PathLike) -> Path:
    """``out`` with a symbolic link at its last component followed (the link is kept, its target replaced);
    a name the file system would refuse is one OutputError (:func:`check_name`)."""
    check_name(out)
    out = Path(out)
    if out.is_symlink():
        return Path(os.path.realpath(out))
    return out


@contextlib.contextmanager
def deferred_signals(done: str = "the write completed") -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (main thread only).

    A SIGINT held this way surfaces as ``KeyboardInterrupt(done)`` so the user is told the
    truth: the interrupt came too late to stop the write, which finished.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: pending.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in pending:
        signal.raise_signal(signal.SIGTERM)
    if signal.SIGINT in pending:
        raise KeyboardInterrupt(done)


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """An exclusive lock on the parent directory for the check-then-rename step (leaves no file behind)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mkparent(out: Path, what: str) -> None:
    ancestor = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise OutputError(f"cannot create {what} {out}: {ancestor} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {out}: {_strerror(exc)}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_target(out: Path, force: bool, replaceable: Replaceable | None, kind: str = "directory") -> None:
    """Refuse early (before minutes of work) what the commit would refuse later."""
    ancestor = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise OutputError(f"cannot create output {out}: {ancestor} is not a directory")
    if not out.exists():
        return
    is_dir = out.is_dir()
    if kind == "directory" and not is_dir:
        raise OutputError(f"output {out} exists and is not a directory")
    if kind == "file" and is_dir:
        raise OutputError(f"{out} is a directory; give a file name")
    if not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it")
    if is_dir and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise OutputError(f"output {out} is (or contains) the current directory; choose another --out")
    problem = replaceable(out) if replaceable else None
    if problem:
        raise OutputError(f"refusing to replace {out}: {problem}")


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, force: bool = False, replaceable: Replaceable | None = None,
                     what: str = "output") -> Iterator[Path]:
    """Yield an empty hidden sibling directory that becomes ``out`` only if the block succeeds."""
    out = resolve_target(out)
    check_target(out, force, replaceable)
    _mkparent(out, what)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot create {what} {out}: {_strerror(exc)}") from None
    stage.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output should look like any directory
    try:
        try:
            yield stage
        except Exception as exc:  # noqa: BLE001 - a full disk surfaces as OSError, MXNetError, PIL errors...
            if disk_full(stage, exc):
                raise OutputError(f"cannot write {what} {out}: No space left on device") from None
            raise
        with deferred_signals(f"{out} was written completely before the interrupt took effect"):
            _commit_directory(stage, out, force, replaceable, what)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _commit_directory(stage: Path, out: Path, force: bool, replaceable: Replaceable | None, what: str) -> None:
    with _parent_lock(out.parent):
        check_target(out, force, replaceable)  # again: another run may have written it meanwhile
        old = None
        try:
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "content")
            os.rename(stage, out)
        except OSError as exc:  # put things back as they were
            if old is not None and not out.exists():
                os.replace(old / "content", out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"{what} {out} already exists (written by another run meanwhile)") from None
            raise OutputError(f"cannot write {what} {out}: {_strerror(exc)}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file(out: str | os.PathLike, write: Callable[[Path], None], force: bool = False,
               replaceable: Replaceable | None = None) -> None:
    """Call ``write(tmp)`` for a hidden sibling file, then move it to ``out`` (never half a file)."""
    check_name(out, Path(out).suffix)  # the staging file keeps the suffix
    out = resolve_target(out)
    check_target(out, force, replaceable, kind="file")
    _mkparent(out, "file")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", suffix=out.suffix, dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {_strerror(exc)}") from None
    tmp = Path(name)
    try:
        try:
            write(tmp)
        except OSError as exc:
            raise OutputError(f"cannot write {out}: {_strerror(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - see disk_full
            if disk_full(tmp.parent, exc):
                raise OutputError(f"cannot write {out}: No space left on device") from None
            raise
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; the output should look like any file
        with deferred_signals(), _parent_lock(out.parent):
            check_target(out, force, replaceable, kind="file")
            if force:
                os.replace(tmp, out)
            else:
                try:
                    os.link(tmp, out)  # fails if out appeared meanwhile: exactly one writer wins
                except FileExistsError:
                    raise OutputError(f"{out} already exists (written by another run meanwhile)") from None
    finally:
        tmp.unlink(missing_ok=True)


def replace_together(pairs: list[tuple[Path, Path]]) -> None:
    """Move each ``(source, target)`` as one set: on failure every old target is put back."""
    backups: list[tuple[Path, Path]] = []
    done: list[Path] = []
    with deferred_signals():
        try:
            for _, target in pairs:
                if target.exists():
                    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, backup)
                    backups.append((backup, target))
            for src, dst in pairs:
                os.replace(src, dst)
                done.append(dst)
        except OSError as exc:
            for dst in done:
                dst.unlink(missing_ok=True)
            for backup, target in backups:
                os.replace(backup, target)
            raise OutputError(f"cannot write {pairs[0][1].parent}: {_strerror(exc)}; the previous files are unchanged") from None
        for backup, _ in backups:
            backup.unlink(missing_ok=True)


def point_at(link: str | os.PathLike, name: str) -> None:
    """Make ``link`` a relative symbolic link to its sibling ``name``, in one rename.

    Readers see the old reference or the new one, never none: the new link is made under a
    hidden name and renamed over the old. A real directory at ``link`` (a full copy written
    by an older bbadapt) is moved aside first and removed once the link is in place.
    """
    link = Path(link)
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"point_at names a sibling, got {name!r}")
    if not (link.parent / name).is_dir():
        raise OutputError(f"cannot point {link} at {name}: {link.parent / name} does not exist")
    tmp = link.with_name(f".{link.name}.partial-{os.getpid()}")
    old = link.with_name(f".{link.name}.old-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        with deferred_signals():
            if link.is_dir() and not link.is_symlink():
                os.replace(link, old)
            os.replace(tmp, link)
    except OSError as exc:
        if old.exists() and not link.exists():
            os.replace(old, link)
        raise OutputError(f"cannot write {link}: {_strerror(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def remove_directory(path: str | os.PathLike) -> None:
    """Remove a directory as one step for readers: renamed to a hidden name, then deleted."""
    path = Path(path)
    hidden = path.with_name(f".{path.name}.old-{os.getpid()}")
    with deferred_signals():
        os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
