"""Write a session back to TOML, keeping the user's comments and key order.

A session loaded from a file carries the file's tomlkit document and the
plain form of what it held (``Session._doc`` / ``Session._baseline``).
:func:`dumps` diffs the current session against that baseline and edits only
the keys that changed, so untouched lines (and their comments) stay byte for
byte.  A session without a document is rendered fresh, with short comments.

:func:`atomic_write` is the one atomic file writer (the session save and the
TUI's autosave use it; anything else that replaces a file should too): a
temporary file made with :func:`tempfile.mkstemp` in the target's folder
(``O_CREAT | O_EXCL``: it never opens an existing file or follows a symlink),
write, flush + fsync, ``os.replace`` onto the target, then an fsync of the
folder on POSIX.  On any error (or interruption) the original is untouched
and the temporary file removed.

Stale temporary files.  A writer killed between creating its temporary file
and the rename leaves the file behind; every :func:`atomic_write` (and every
``sessions.load``) first removes such leftovers from that folder
(:func:`clean_stale_temps`).  A file is removed only when all of these hold:

* its name is ours: ``.<target name>.unlearn-tui-<pid>-<8 random>.tmp``, or
  ``.<name>.<8 random>.tmp`` (the name earlier versions used) where ``<name>``
  is the file being written now;
* it is a regular file owned by the current user (``lstat``: a symlink or a
  folder with such a name is never touched, nor followed);
* it is stale: the process ``<pid>`` no longer runs on this machine (POSIX;
  checked with signal 0), or it was last modified more than
  :data:`STALE_TEMP_SECONDS` ago (the only test for the old names and on
  Windows).  A temporary file of a running writer that is younger than that
  is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from backends.errors import UserError

from .schema import DATA_PREFIXES, Session, plain_from_toml, to_plain

_MISSING: Any = object()

COMMENTS = {
    ("model", "name"): "built-in name, hub id, local dir or .gguf file",
    ("model", "device"): "auto | cpu | cuda | cuda:N | mps",
    ("model", "dtype"): "auto | float32 | bfloat16 | float16",
    ("model", "trust_remote_code"): "run code shipped with the model (only if you trust it)",
    ("model", "revision"): 'hub revision; "" = default',
    ("data", "path"): "file path, builtin:NAME or hub:OWNER/NAME[:split]",
    ("data", "format"): "auto | json | jsonl | csv | parquet | tofu | pistol | easyedit | hub",
    ("data", "forget"): "first N items, or a list of ids",
    ("data", "retain"): 'the next N items, a list of ids, or "rest"',
    ("data", "rephrase"): "evaluate the rephrased-forget split",
    ("targets", "mode"): "idk | self-improve | dummy | incorrect | avoidant | custom",
    ("targets", "merge_factor"): "questions merged into one edit request",
    ("targets", "pool"): 'refusal-pool file; "" = built-in pool',
    ("targets", "dummy"): 'text used by mode "dummy"',
    ("eval", "max_new_tokens"): "1..1024",
    ("eval", "batch_size"): "1..1024",
    ("eval", "top_k"): "top-hit@k, 1..100000",
}


# -------------------------------------------------------------- tomlkit glue
def _same(a: Any, b: Any) -> bool:
    """Equality that also compares types (``1 != 1.0 != True`` here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _is_aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _item(v: Any, inline: bool = False) -> Any:
    """A tomlkit item for plain ``v``; ``inline`` keeps tables inline (inside ``{...}``)."""
    import tomlkit

    if isinstance(v, dict):
        t = tomlkit.inline_table() if inline else tomlkit.table()
        for k, x in v.items():
            t.append(k, _item(x, inline))
        return t
    if _is_aot(v):
        if inline:
            arr = tomlkit.array()
            arr.extend(_item(x, True) for x in v)
            return arr
        a = tomlkit.aot()
        for x in v:
            a.append(_item(x))
        return a
    return tomlkit.item(v)


def _sync(tbl: Any, old: dict, new: dict) -> None:
    """Make the tomlkit table ``tbl`` (which reflects ``old``) reflect ``new``."""
    import tomlkit
    from tomlkit.items import AoT, Array, InlineTable

    inline = isinstance(tbl, InlineTable)
    for key in list(old):
        if key not in new and key in tbl:
            del tbl[key]
    for key, nv in new.items():
        ov = old.get(key, _MISSING)
        if _same(ov, nv):
            continue
        cur = tbl[key] if key in tbl else None
        if isinstance(nv, dict):
            if cur is None:
                tbl[key] = tomlkit.inline_table() if inline else tomlkit.table()
                cur = tbl[key]
            if isinstance(cur, dict):
                _sync(cur, ov if isinstance(ov, dict) else {}, nv)
            else:
                tbl[key] = _item(nv, inline)
        elif _is_aot(nv) and isinstance(cur, AoT) and isinstance(ov, list) and len(cur) == len(ov):
            n = min(len(ov), len(nv))
            for i in range(n):
                if not _same(ov[i], nv[i]):
                    _sync(cur[i], ov[i] if isinstance(ov[i], dict) else {}, nv[i])
            for i in reversed(range(n, len(ov))):
                del cur[i]
            for x in nv[n:]:
                cur.append(_item(x))
        else:
            # a user's inline array of tables stays inline
            tbl[key] = _item(nv, inline or isinstance(cur, Array))


def _fresh(plain: dict) -> Any:
    import tomlkit

    doc = tomlkit.document()
    doc.add(tomlkit.comment("unlearn-tui session; relative paths are relative to this file"))
    doc.add("version", plain["version"])
    for section in ("model", "data", "targets", "eval"):
        t = tomlkit.table()
        rows = [(k, v, _item(v)) for k, v in plain[section].items()]
        width = max((len(f"{k} = {it.as_string()}") for k, v, it in rows
                     if not isinstance(v, (dict, list))), default=0)
        for k, v, it in rows:
            text = COMMENTS.get((section, k))
            if text and not isinstance(v, (dict, list)):
                it.comment(text)
                it.trivia.comment_ws = " " * (width - len(f"{k} = {it.as_string()}") + 2)
            t.add(k, it)
        doc.add(tomlkit.nl())
        doc.add(section, t)
    doc.add(tomlkit.nl())
    doc.add("runs", _item(plain["runs"]) if plain["runs"] else tomlkit.array())
    return doc


def _render(session: Session) -> tuple[str, Any, dict]:
    """(text, tomlkit document, plain form) for ``session``; does not modify it."""
    import tomlkit

    plain = to_plain(session)
    if session._doc is not None and session._baseline is not None:
        try:
            original = session._doc.as_string()
            doc = tomlkit.parse(original)  # edit a copy
            _sync(doc, session._baseline, plain)
            text = doc.as_string()
            if "\r\n" in original:  # keep Windows line endings
                text = text.replace("\r\n", "\n").replace("\n", "\r\n")
                doc = tomlkit.parse(text)
            if _reads_back(text, plain):
                return text, doc, plain
        except Exception:  # a tomlkit corner case: lose the comments, never the data
            pass
    try:
        doc = _fresh(plain)
        text = doc.as_string()
    except (TypeError, ValueError) as e:  # a value TOML cannot hold (set by code, not a file)
        raise UserError(f"cannot write the session as TOML: {e}", "save") from e
    if not _reads_back(text, plain):  # pragma: no cover - a bug, not a user error
        raise RuntimeError("sessions.dumps produced TOML that does not read back as the session")
    return text, doc, plain


def _reads_back(text: str, plain: dict) -> bool:
    """Whether ``text`` holds exactly ``plain`` (so a sync bug never corrupts a file)."""
    try:
        return _same(plain_from_toml(tomllib.loads(text)), plain)
    except (tomllib.TOMLDecodeError, AttributeError, TypeError, ValueError):
        return False


def dumps(session: Session) -> str:
    """The session as TOML text (the user's comments and key order preserved)."""
    return _render(session)[0]


# --------------------------------------------------------------------- save
def _rebased(p: str | None, old_base: Path, new_base: Path) -> str | None:
    """A relative file path re-expressed relative to ``new_base``."""
    if not p or p.startswith(DATA_PREFIXES) or p.startswith("~") or Path(p).is_absolute():
        return p
    target = old_base / p
    try:
        return Path(os.path.relpath(target, new_base)).as_posix()
    except ValueError:  # different drives on Windows
        return str(target)


TEMP_MARK = "unlearn-tui"
"""Part of every temporary file name :func:`atomic_write` makes (see the module doc)."""

STALE_TEMP_SECONDS = 3600.0
"""A temporary file of ours not modified for this long is stale even if its pid is running
(pids are reused, e.g. after a reboot); an atomic write takes well under a second."""

_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.{TEMP_MARK}-(?P<pid>\d+)-[a-z0-9_]{{8}}\.tmp$")
_OLD_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def clean_stale_temps(directory: Path | str, name: str | None = None, *,
                      max_age: float = STALE_TEMP_SECONDS, now: float | None = None) -> list[Path]:
    """Remove stale temporary files of :func:`atomic_write` from ``directory``; returns those removed.

    The rule is in the module doc.  ``name`` is the file about to be written
    (its temporary files in the old naming are recognised too).  Best effort:
    an unreadable folder or a file that cannot be removed is skipped, never an error.
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
        if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        old_enough = now - st.st_mtime > max_age
        dead = pid is not None and not _pid_running(pid)
        if not (old_enough or dead):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def atomic_write(path: Path | str, data: str | bytes, *, encoding: str = "utf-8",
                 mode: int | None = None) -> Path:
    """Replace the file ``path`` with ``data`` atomically; returns the file written.

    ``data`` is bytes, or text encoded with ``encoding`` (line endings are
    written as given).  A symlink at ``path`` is followed: the file it points
    to is replaced and the link stays.  The new file keeps the old one's
    permission bits; a new file gets ``mode`` (default 0o644).  Raises
    OSError; on any error or interruption the original file is untouched and
    no temporary file is left.  Stale temporary files of killed writers in the
    folder are removed first (module doc).
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    directory = target.parent
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    clean_stale_temps(directory, target.name)
    try:
        keep = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        keep = 0o644 if mode is None else mode
    # O_CREAT | O_EXCL, mode 0600: never an existing file, never through a symlink
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.{TEMP_MARK}-{os.getpid()}-",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), keep)
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
            os.chmod(tmp, keep)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return target


def save(session: Session, path: Path | str | None = None) -> Path:
    """Write the session atomically to ``path`` (default: where it came from).

    Relative data/pool paths are re-expressed relative to the new location
    when the directory changes.  Afterwards ``session.path`` is the saved
    file.  Returns that path.
    """
    if path is None:
        if session.path is None:
            raise UserError("the session has no file yet; give a path to save it to", "save")
        target = session.path
    else:
        target = Path(path).expanduser().absolute()
    label = str(path) if path is not None else str(target)
    if target.is_dir():
        raise UserError("is a directory; give a file name for the session", label)
    real = target.resolve() if target.is_symlink() else target   # atomic_write follows the link too
    if not real.parent.is_dir():
        raise UserError(f"cannot save: directory {real.parent} does not exist", label)

    old_base, new_base = session.base_dir(), target.parent
    data_path, pool = session.data.path, session.targets.pool
    if old_base != new_base:
        data_path = _rebased(data_path, old_base, new_base)
        pool = _rebased(pool, old_base, new_base)
    work = dataclasses.replace(session, data=dataclasses.replace(session.data, path=data_path),
                               targets=dataclasses.replace(session.targets, pool=pool))
    work._doc, work._baseline = session._doc, session._baseline
    text, doc, plain = _render(work)
    try:
        atomic_write(real, text)
    except OSError as e:
        raise UserError(f"cannot save the session: {e.strerror or e}", label) from e
    session.data.path, session.targets.pool = data_path, pool
    session.path = target
    session._doc, session._baseline = doc, plain
    return target
