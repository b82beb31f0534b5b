"""Atomic file IO: the one set of rules for every file or folder the project replaces.

* :func:`atomic_write` — text or bytes (sessions, the autosave, ``--out``
  results, JSON caches);
* :func:`save_safetensors` — a ``.safetensors`` file (statistics, exports);
* :func:`atomic_folder` — a folder written under a temporary name and renamed
  into place (the dequantized-model cache);
* :func:`probe_writable` — whether a file could be written there (``--out``).

The rules.  The new content goes to a temporary entry made in the target's
folder (:func:`tempfile.mkstemp` / :func:`tempfile.mkdtemp`: ``O_CREAT |
O_EXCL``, so it never opens an existing file or follows a symlink), is
flushed and fsynced, ``os.replace`` puts it onto the target, then the folder
is fsynced (POSIX).  A file keeps the permission bits of the one it replaces;
a new file gets ``mode`` (default 0o644).  A symlink at the target is
followed: the file it points to is replaced and the link stays.  On any error
or interruption the original is untouched and the temporary entry removed;
the error (OSError) is raised, and callers that write a cache catch it.
Parent folders are never created here.

Stale temporary files.  A writer killed between creating its temporary entry
and the rename leaves it behind; every write here (and every
``sessions.load``) first removes such leftovers for that target from the folder
(:func:`clean_stale_temps`).  An entry is removed only when all of these hold:

* its name is ours: ``.<target name>.unlearn-tui-<pid>-<8 random>.tmp``, or
  ``.<name>.<8 random>.tmp`` (the name earlier versions used) where ``<name>``
  is the file being written now;
* it is a regular file owned by the current user (``lstat``: a symlink or a
  folder with such a name is never touched, nor followed) — or, for
  :func:`atomic_folder` only (``folders=True``), a real folder of ours of the
  first naming for that very target;
* it is stale: the process ``<pid>`` no longer runs on this machine (POSIX;
  checked with signal 0), or it was last modified more than
  :data:`STALE_TEMP_SECONDS` ago (the only test for the old names and on
  Windows).  A temporary entry of a running writer that is younger than that
  is kept.

Torch-free: ``safetensors`` is imported only by :func:`save_safetensors`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TEMP_MARK = "unlearn-tui"
"""Part of every temporary name made here (see the module doc)."""

STALE_TEMP_SECONDS = 3600.0
"""A temporary entry of ours not modified for this long is stale even if its pid is running
(pids are reused, e.g. after a reboot); an atomic write takes well under a second."""

_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.{TEMP_MARK}-(?P<pid>\d+)-[a-z0-9_]{{8}}\.tmp$")
_OLD_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def _target(path: Path | str) -> Path:
    target = Path(path)
    return target.resolve() if target.is_symlink() else target


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{TEMP_MARK}-{os.getpid()}-"


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kept_mode(target: Path, mode: int | None) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o644 if mode is None else mode


def _pid_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:
        return True     # os.kill(pid, 0) would terminate the process on Windows: age decides there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True     # it exists (another user's), or we cannot tell: keep the file
    return True


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary entry of this module's writers (either naming)."""
    return _TEMP_RE.match(name) is not None or _OLD_TEMP_RE.match(name) is not None


def temp_writer_running(name: str) -> bool:
    """Whether the writer of temporary entry ``name`` still runs here (the old naming has no pid: False)."""
    m = _TEMP_RE.match(name)
    return m is not None and _pid_running(int(m["pid"]))


def clean_stale_temps(directory: Path | str, name: str | None = None, *,
                      max_age: float = STALE_TEMP_SECONDS, now: float | None = None,
                      folders: bool = False) -> list[Path]:
    """Remove stale temporary files of the writers here from ``directory``; returns those removed.

    The rule is in the module doc.  ``name`` is the entry about to be written
    (its temporary files in the old naming are recognised too); ``folders``
    also removes stale temporary folders of :func:`atomic_folder` for
    ``name``.  Best effort: an unreadable folder or an entry that cannot be
    removed is skipped, never an error.
    """
    directory = Path(directory)
    now = time.time() if now is None else now
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        pid = int(m["pid"]) if m else None
        if m is None:
            old = _OLD_TEMP_RE.match(entry.name)
            if old is None or name is None or old["name"] != name:
                continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and not (folders and m is not None and m["name"] == name):
            continue
        if not (is_dir or stat.S_ISREG(st.st_mode)) or (uid is not None and st.st_uid != uid):
            continue
        old_enough = now - st.st_mtime > max_age
        dead = pid is not None and not _pid_running(pid)
        if not (old_enough or dead):
            continue
        with contextlib.suppress(OSError):
            if is_dir:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def _replacing(target: Path, mode: int | None) -> Iterator[tuple[int, str, int]]:
    """``(fd, name, kept mode)`` of a fresh temporary file beside ``target``, which replaces ``target``
    when the block ends cleanly; on any exception it is removed and the exception goes on.

    The caller writes, sets the mode and fsyncs; this cleans stale temporaries first, renames and
    fsyncs the folder (the rules of the module doc), for :func:`atomic_write` and
    :func:`save_safetensors` alike.
    """
    directory = target.parent
    clean_stale_temps(directory, target.name)
    keep = _kept_mode(target, mode)
    # O_CREAT | O_EXCL, mode 0600: never an existing file, never through a symlink
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(target), suffix=".tmp")
    try:
        yield fd, tmp, keep
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write(path: Path | str, data: str | bytes, *, encoding: str = "utf-8",
                 mode: int | None = None) -> Path:
    """Replace the file ``path`` with ``data`` atomically; returns the file written.

    ``data`` is bytes, or text encoded with ``encoding`` (line endings are
    written as given).  Raises OSError; the rules (symlinks, permissions,
    cleanup) are in the module doc.
    """
    target = _target(path)
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with _replacing(target, mode) as (fd, tmp, keep):
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), keep)
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
            os.chmod(tmp, keep)
    return target


def save_safetensors(path: Path | str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
                     mode: int | None = None) -> Path:
    """Write ``tensors`` (name -> torch tensor) as a ``.safetensors`` file atomically; returns the file.

    ``safetensors`` writes by file name, so it writes into the temporary file
    this made (mkstemp); fsync, permissions and the rename follow the rules of
    the module doc.  Raises OSError (and whatever ``safetensors`` raises for
    bad tensors); the original is untouched then.
    """
    from safetensors.torch import save_file

    target = _target(path)
    with _replacing(target, mode) as (fd, tmp, keep):
        os.close(fd)
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp, keep)
        _fsync_file(tmp)
    return target


def probe_writable(path: Path | str) -> None:
    """Check that a file ``path`` could be written here: create and remove a temporary file beside it.

    The temporary file has the name :func:`atomic_write` would use (so a probe
    killed half-way leaves a stale temporary file of ours, cleaned by the
    rules above).  Raises OSError; nothing is left behind otherwise.
    """
    target = _target(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target), suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it onto ``path``.

    ``with atomic_folder(cache) as tmp:`` yields the empty temporary folder
    (made with :func:`tempfile.mkdtemp` next to ``path``); when the block ends
    without an error every regular file in it is fsynced, an existing folder
    at ``path`` is removed and the temporary one renamed into place, then the
    parent is fsynced.  On an error (raised again) the temporary folder is
    removed and ``path`` is left as it was.  Stale temporary folders of
    killed writers of the same ``path`` are removed first (module doc).
    """
    target = _target(path)
    directory = target.parent
    clean_stale_temps(directory, target.name, folders=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=_temp_prefix(target), suffix=".tmp"))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                p = Path(root) / f
                if p.is_file() and not p.is_symlink():
                    _fsync_file(p)
        _fsync_dir(tmp)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
