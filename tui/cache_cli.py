"""``unlearn-tui cache [list] [--json]`` and ``unlearn-tui cache prune KIND... [--older-than DAYS]
[--keep-last N] [--dry-run]``: see and prune what the tool caches on disk.

Everything lives under :func:`backends.paths.cache_dir` (``UNLEARN_TUI_CACHE_DIR``
overrides it), one folder per kind:

* ``models/<stem>-<hash>/`` dequantized GGUF models (safetensors folders, :mod:`backends.model`);
* ``finetuned/<base fingerprint>/<key>.safetensors`` plus ``<key>.json`` (the meta note) per
  fine-tune (:mod:`backends.finetune_first`); the two files are one entry;
* ``stats/<fingerprint>/`` key covariance statistics of one model (one file per layer; the folder
  is one entry, :mod:`backends.stats`);
* ``corpora/``, ``known/``, ``templates/``: one JSON file per entry (sampled statistics corpora,
  known scores with their ``index.json``, context templates);
* ``offload/run-*/`` the weights a ``device_map`` put on "disk" (removed when their process ends;
  those left are from killed runs).

An entry is a file or a folder directly in its kind's folder (a fine-tune: its pair of files);
its size counts the bytes of its regular files (symlinks are never followed) and its date is the
newest modification inside it.  Anything else in the cache folder is listed as ``other`` and
never pruned.

Pruning removes whole entries, only inside the cache folder: an entry that is a symlink, or whose
folder resolves outside the cache, is left alone.  Skipped with a note: temporary files of
:mod:`backends.fileio`'s naming of a writer that may still run (and folders holding one),
entries modified in the last :data:`BUSY_SECONDS` seconds, and (Linux) entries a process of this
user has open (an ``offload/`` folder of a running ``device_map`` run is not always open: prune
offload only while no such run goes).  A temporary file of that naming over an hour old whose
writer is gone is a leftover: it is removed with its kind and never counts among
``--keep-last``.  Exit codes: 0, 1 when an entry could not be removed, 2 bad input (one line).
Imports neither torch nor Textual.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .cli import EXIT_USAGE, fail, one_line

KINDS = ("models", "finetuned", "stats", "corpora", "known", "templates", "probes", "offload")
WHAT = {"models": "dequantized GGUF models (safetensors)", "finetuned": "fine-tuned weights + meta notes",
        "stats": "key covariance statistics", "corpora": "sampled statistics corpora",
        "known": "known scores of unedited models", "templates": "context templates",
        "probes": "passed fast-path probes per model (backends/shared_prefix.py)",
        "offload": "device_map disk offload (each run removes its own at exit; prune it only while no "
                   "device_map run is going: a run reads those files without keeping them open)"}
BUSY_SECONDS = 60.0
"""An entry modified less than this long ago may be being written: prune leaves it."""
META_MAX_BYTES = 4 << 20
"""A fine-tune meta note larger than this is not read (shown as unreadable)."""


# --------------------------------------------------------------------------- helpers


def human(n: int) -> str:
    """Bytes in decimal units: ``512 B``, ``1.5 kB``, ``540.0 MB``, ``13.5 GB``."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        if value < 1000.0 or unit == "PB":
            return f"{value:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts > 0 else "-"


def _iso(ts: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts)) if ts > 0 else None


def _show(name: str) -> str:
    """A file name safe to print on one line."""
    return one_line(name) or "''"


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (its last part not followed) lies inside the resolved ``root``."""
    try:
        parent = Path(os.path.realpath(path.parent))
    except (OSError, ValueError):
        return False
    real = parent / path.name
    return real != root and (parent == root or root in parent.parents)


def _temp_state(name: str, mtime: float, now: float) -> str | None:
    """``"live"``/``"stale"`` for a temporary entry of :mod:`backends.fileio`'s naming, else None.

    Stale needs both: not modified for :data:`fileio.STALE_TEMP_SECONDS` and its writer gone (the pid
    of the name does not run here; the old naming has none).  Anything else may be being written."""
    from unlearn_tui.backends import fileio

    if not fileio.is_temp_name(name):
        return None
    gone = not fileio.temp_writer_running(name)
    return "stale" if gone and now - mtime > fileio.STALE_TEMP_SECONDS else "live"


def _tree(path: Path, now: float) -> tuple[int, float, bool]:
    """(bytes of the regular files, newest modification, holds a live temporary entry) under ``path``,
    which may be a file; symlinks count nothing and are never followed."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0, 0.0, False
    if not stat.S_ISDIR(st.st_mode):
        return (st.st_size if stat.S_ISREG(st.st_mode) else 0), st.st_mtime, False
    size, newest, live = 0, st.st_mtime, False
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            try:
                s = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            newest = max(newest, s.st_mtime)
            if stat.S_ISREG(s.st_mode):
                size += s.st_size
            if _temp_state(name, s.st_mtime, now) == "live":
                live = True
    return size, newest, live


def _num(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if isinstance(v, int) or math.isfinite(v) else None


def _text(v: Any) -> str | None:
    return one_line(v) if isinstance(v, str) else None


def read_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the fields worth showing of a fine-tune's meta note, None) or (None, why not): never raises."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "meta missing"
    except OSError:
        return None, "meta unreadable"
    if not stat.S_ISREG(st.st_mode) or st.st_size > META_MAX_BYTES:
        return None, "meta unreadable"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None, "meta unreadable"
    if not isinstance(raw, dict):
        return None, "meta unreadable"
    settings = raw.get("settings") if isinstance(raw.get("settings"), dict) else {}
    meta = {"items": _num(raw.get("items")), "epochs": _num(raw.get("epochs")), "rouge1": _num(raw.get("rouge1")),
            "reached": raw.get("reached") if isinstance(raw.get("reached"), bool) else None,
            "data": _text(raw.get("data")), "tuning": _text(settings.get("tuning")),
            "model": _text(raw.get("model")), "seconds": _num(raw.get("seconds")),
            "created": _num(raw.get("created")), "partial": raw.get("partial") is True}
    return meta, None


def describe_meta(meta: dict[str, Any] | None, error: str | None) -> str:
    if meta is None:
        return error or "meta unreadable"
    parts = []
    for label, key in (("items", "items"), ("epochs", "epochs"), ("ROUGE-1", "rouge1"), ("data", "data"),
                       ("tuning", "tuning")):
        v = meta.get(key)
        if v is None:
            continue
        parts.append(f"{label} {v:.3f}" if key == "rouge1" else f"{label} {v}")
    if meta.get("partial"):   # an unfinished fine-tune's last finished epoch (the next run resumes from it)
        parts.append("unfinished: resumes after this epoch")
    return " · ".join(parts) or "meta holds none of items, epochs, ROUGE-1, data, tuning"


# --------------------------------------------------------------------------- scanning


@dataclass
class Entry:
    kind: str
    name: str                        # relative to the cache folder, "/"-separated
    paths: tuple[Path, ...]          # what removing it removes
    size: int
    mtime: float
    temp: str | None = None          # "live" | "stale" for a temporary entry of fileio's naming
    live_inside: bool = False        # a folder holding a live temporary entry
    symlink: str | None = None       # where a symlink among its paths points
    base: str = ""                   # finetuned only
    key: str = ""
    meta: dict[str, Any] | None = None
    meta_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "files": [p.name for p in self.paths], "bytes": self.size,
                             "size": human(self.size), "modified": _iso(self.mtime), "mtime": self.mtime,
                             "state": self.state()}
        if self.symlink is not None:
            d["symlink"] = self.symlink
        if self.kind == "finetuned":
            d.update(base=self.base, key=self.key, meta=self.meta, meta_error=self.meta_error)
        return d

    def state(self) -> str:
        if self.symlink is not None:
            return "symlink"
        if self.temp == "live" or self.live_inside:
            return "being written"
        if self.temp == "stale":
            return "leftover temporary"
        return "ok"


@dataclass
class Kind:
    kind: str
    path: Path
    exists: bool = False
    note: str | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def count(self) -> int:
        """Entries, temporary files left out."""
        return sum(1 for e in self.entries if e.temp is None)

    @property
    def temporary(self) -> int:
        return sum(1 for e in self.entries if e.temp is not None)


def _symlink(path: Path) -> str | None:
    try:
        return os.readlink(path) if path.is_symlink() else None
    except OSError:
        return "?"


def _entry(kind: str, rel: str, paths: tuple[Path, ...], now: float, **kw: Any) -> Entry:
    size, mtime, live = 0, 0.0, False
    link = None
    for p in paths:
        s, m, lv = _tree(p, now)
        size, mtime, live = size + s, max(mtime, m), live or lv
        link = link or _symlink(p)
    temp = _temp_state(paths[0].name, mtime, now) if len(paths) == 1 else None
    return Entry(kind, rel, paths, size, mtime, temp=temp, live_inside=live, symlink=link, **kw)


def _children(folder: Path) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []


def _scan_finetuned(kind: Kind, now: float) -> None:
    for base in _children(kind.path):
        p = Path(base.path)
        if base.is_symlink() or not base.is_dir(follow_symlinks=False):
            kind.entries.append(_entry("finetuned", f"finetuned/{base.name}", (p,), now, key=base.name))
            continue
        groups: dict[str, list[Path]] = {}
        for child in _children(p):
            c = Path(child.path)
            stem = c.name
            if _temp_state(c.name, 0.0, now) is None and c.suffix in (".safetensors", ".json"):
                stem = c.name[:-len(c.suffix)]
            groups.setdefault(stem, []).append(c)
        for key, files in groups.items():
            files.sort(key=lambda f: (f.suffix != ".safetensors", f.name))
            meta, error = (None, None)
            if _temp_state(files[0].name, 0.0, now) is None:
                meta, error = read_meta(p / f"{key}.json")
            kind.entries.append(_entry("finetuned", f"finetuned/{base.name}/{key}", tuple(files), now,
                                       base=base.name, key=key, meta=meta, meta_error=error))


def scan(root: Path | None = None, now: float | None = None) -> tuple[Path, list[Kind], Kind]:
    """(the cache folder, one :class:`Kind` per kind, everything else as kind ``other``)."""
    from unlearn_tui.backends.paths import cache_dir

    root = cache_dir() if root is None else root
    now = time.time() if now is None else now
    kinds = [Kind(k, root / k) for k in KINDS]
    other = Kind("other", root, exists=root.is_dir())
    if not root.is_dir():
        return root, kinds, other
    real_root = Path(os.path.realpath(root))
    for k in kinds:
        if k.path.is_symlink():
            k.exists = k.path.is_dir()
            target = os.path.realpath(k.path)
            if not (Path(target) == real_root or real_root in Path(target).parents):
                k.note = f"a symlink to {target}, outside the cache; not scanned, never pruned"
                continue
        if not k.path.is_dir():
            if k.path.exists() or k.path.is_symlink():
                k.note = "not a folder"
            continue
        k.exists = True
        if k.kind == "finetuned":
            _scan_finetuned(k, now)
            continue
        for child in _children(k.path):
            k.entries.append(_entry(k.kind, f"{k.kind}/{child.name}", (Path(child.path),), now))
    for child in _children(root):
        if child.name not in KINDS:
            other.entries.append(_entry("other", child.name, (Path(child.path),), now))
    return root, kinds, other


# --------------------------------------------------------------------------- list


def listing_json(root: Path, kinds: list[Kind], other: Kind) -> dict[str, Any]:
    def kind_json(k: Kind) -> dict[str, Any]:
        return {"kind": k.kind, "path": str(k.path), "exists": k.exists, "entries": k.count, "temporary": k.temporary,
                "bytes": k.size, "size": human(k.size), "note": k.note,
                "items": [e.to_json() for e in sorted(k.entries, key=lambda e: -e.mtime)]}

    total = sum(k.size for k in kinds) + other.size
    ft = next(k for k in kinds if k.kind == "finetuned")
    return {"cache_dir": str(root), "exists": root.is_dir(), "bytes": total, "size": human(total),
            "kinds": [kind_json(k) for k in kinds], "other": kind_json(other),
            "finetuned": [e.to_json() for e in sorted(ft.entries, key=lambda e: -e.mtime) if e.temp is None]}


def print_listing(root: Path, kinds: list[Kind], other: Kind) -> None:
    if not root.is_dir():
        print(f"unlearn-tui cache: {root} (does not exist: nothing cached)")
        return
    print(f"unlearn-tui cache: {root}")
    rows = [(k.kind, str(k.count), human(k.size), str(k.path) + _kind_note(k)) for k in kinds]
    if other.entries:
        rows.append(("other", str(other.count), human(other.size), f"{root} (not pruned)"))
    total = sum(k.size for k in kinds) + other.size
    rows.append(("total", str(sum(k.count for k in kinds) + other.count), human(total), ""))
    print(f"{'kind':<10} {'entries':>7} {'size':>10}  path")
    for name, count, size, path in rows:
        print(f"{name:<10} {count:>7} {size:>10}  {path}".rstrip())
    ft = [e for e in next(k for k in kinds if k.kind == "finetuned").entries if e.temp is None]
    if ft:
        print()
        print("fine-tunes (finetuned/<base fingerprint>/<key>), newest first:")
        print(f"  {'base':<12} {'key':<12} {'size':>10}  {'modified':<16}  what")
        for e in sorted(ft, key=lambda e: -e.mtime):
            what = describe_meta(e.meta, e.meta_error) if e.base else "not a fine-tune folder"
            if e.state() != "ok":
                what += f" ({e.state()})"
            print(f"  {_show(e.base)[:12]:<12} {_show(e.key)[:12]:<12} {human(e.size):>10}  {_date(e.mtime):<16}  "
                  f"{what}")


def _kind_note(k: Kind) -> str:
    notes = []
    if k.note:
        notes.append(k.note)
    elif not k.exists:
        notes.append("absent")
    if k.temporary:
        notes.append(f"{k.temporary} temporary")
    return f" ({'; '.join(notes)})" if notes else ""


# --------------------------------------------------------------------------- prune


def _open_paths(root: Path) -> dict[str, int]:
    """Files under ``root`` that a process of this user has open or mapped (Linux /proc; else none):
    path -> pid.  Best effort: processes that cannot be read are passed over."""
    found: dict[str, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    prefix = str(root) + os.sep
    me = os.getpid()
    for pid_dir in _children(proc):
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        pid = int(pid_dir.name)
        for fd in _children(Path(pid_dir.path) / "fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith(prefix):
                    found.setdefault(target, pid)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in (Path(pid_dir.path) / "maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(prefix):
                    found.setdefault(parts[5].removesuffix(" (deleted)"), pid)
    return found


def _in_use(e: Entry, open_paths: dict[str, int]) -> int | None:
    for p in e.paths:
        real = os.path.join(os.path.realpath(p.parent), p.name)
        for path, pid in open_paths.items():
            if path == real or path.startswith(real + os.sep):
                return pid
    return None


def _remove(e: Entry) -> None:
    for p in reversed(e.paths):   # a fine-tune's meta note first: written last, removed first
        try:
            st = os.lstat(p)
        except FileNotFoundError:  # gone since the scan (another prune)
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            os.unlink(p)


@dataclass
class Plan:
    remove: list[Entry] = field(default_factory=list)
    skipped: list[tuple[Entry, str]] = field(default_factory=list)
    kept: int = 0


def plan(kinds: list[Kind], root: Path, older_than: float | None, keep_last: int | None,
         now: float | None = None, open_paths: dict[str, int] | None = None) -> Plan:
    """What ``prune`` removes and skips of ``kinds`` (the rules are in the module doc)."""
    now = time.time() if now is None else now
    real_root = Path(os.path.realpath(root))
    open_paths = _open_paths(real_root) if open_paths is None else open_paths
    cutoff = None if older_than is None else now - older_than * 86400.0
    out = Plan()
    for k in kinds:
        ranked = sorted((e for e in k.entries if e.temp is None and e.symlink is None), key=lambda e: -e.mtime)
        kept = {id(e) for e in ranked[:keep_last]} if keep_last is not None else set()
        for e in sorted(k.entries, key=lambda e: e.name):
            if e.symlink is not None:
                out.skipped.append((e, f"a symlink (to {_show(e.symlink)}); left alone"))
            elif e.temp == "live":
                out.skipped.append((e, "a temporary file of a writer that may still run; left alone"))
            elif id(e) in kept or (cutoff is not None and e.mtime > cutoff):
                out.kept += 1
            elif e.live_inside:
                out.skipped.append((e, "holds a temporary file being written; left alone"))
            elif now - e.mtime < BUSY_SECONDS:
                out.skipped.append((e, f"modified {max(0, round(now - e.mtime))} s ago, may be being written; "
                                       "left alone"))
            elif not all(_inside(real_root, p) for p in e.paths):
                out.skipped.append((e, "resolves outside the cache folder; left alone"))
            elif (pid := _in_use(e, open_paths)) is not None:
                out.skipped.append((e, f"in use by process {pid}; left alone"))
            else:
                out.remove.append(e)
    return out


def _describe(e: Entry) -> str:
    files = ""
    if len(e.paths) > 1:
        files = " (" + " + ".join(_show(p.name) for p in e.paths) + ")"
    elif e.kind == "finetuned" and e.paths and e.base:
        files = f" ({_show(e.paths[0].name)} only)"
    what = " leftover temporary file" if e.temp == "stale" else ""
    return f"{_show(e.name)}{files}{what}  {human(e.size)}  modified {_date(e.mtime)}"


def prune(args: argparse.Namespace) -> int:
    root, kinds, _other = scan()
    chosen = KINDS if "all" in args.kinds else tuple(dict.fromkeys(args.kinds))
    selected = [k for k in kinds if k.kind in chosen]
    if not root.is_dir():
        print(f"unlearn-tui cache: {root} does not exist: nothing cached, nothing to remove")
        return 0
    for k in selected:
        if k.note:
            print(f"skipped {k.kind}/: {k.note}")
    p = plan(selected, root, args.older_than, args.keep_last)
    for e, why in p.skipped:
        print(f"skipped {_show(e.name)}: {why}")
    verb = "would remove" if args.dry_run else "removed"
    freed, removed, failed = 0, 0, 0
    touched: set[Path] = set()
    for e in p.remove:
        if not args.dry_run:
            try:
                _remove(e)
            except OSError as exc:
                failed += 1
                print(f"could not remove {_show(e.name)} ({exc.strerror or exc})")
                continue
            if e.kind == "finetuned" and e.base:
                touched.add(e.paths[0].parent)
        print(f"{verb} {_describe(e)}")
        freed += e.size
        removed += 1
    for folder in touched:   # a base-fingerprint folder left empty goes too
        with contextlib.suppress(OSError):
            folder.rmdir()
    kept = f"; kept {p.kept}" if p.kept else ""
    label = "all kinds" if "all" in args.kinds else ", ".join(chosen)
    if removed:
        tail = " (dry run: nothing was removed)" if args.dry_run else ""
        print(f"{verb} {removed} entr{'y' if removed == 1 else 'ies'} of {label}, "
              f"{'would free' if args.dry_run else 'freed'} {human(freed)}{kept}{tail}")
    else:
        print(f"nothing to remove in {label}{kept}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, exit 2 (not argparse's usage block)
        fail(f"{message} ({self.prog} --help)")
        sys.exit(EXIT_USAGE)


def _kind_arg(text: str) -> str:
    import difflib

    if text in KINDS or text == "all":
        return text
    close = difflib.get_close_matches(text.lower(), (*KINDS, "all"), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise argparse.ArgumentTypeError(f"unknown cache kind {text!r}; expected one of {', '.join(KINDS)} or all{hint}")


def _days_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}")
    return v


def _count_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return v


def cache_parser() -> argparse.ArgumentParser:
    kinds = "; ".join(f"{k}: {WHAT[k]}" for k in KINDS)
    p = _Parser(prog="unlearn-tui cache",
                description="See and prune what unlearn-tui caches on disk (UNLEARN_TUI_CACHE_DIR, else the user "
                            "cache folder). Without a command: list.",
                epilog=f"Kinds: {kinds}.")
    p.add_argument("--json", action="store_true", help="list as JSON")
    sub = p.add_subparsers(dest="command", metavar="{list,prune}")
    ls = sub.add_parser("list", help="one line per kind, then one per fine-tune (the default)",
                        description="One line per kind (entries, size, folder), then one per fine-tune with "
                                    "what its meta note says.")
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the same as JSON")
    pr = sub.add_parser("prune", help="remove whole entries of some kinds",
                        description="Remove whole entries (a fine-tune's two files, a folder as a whole) of the "
                                    "given kinds, only inside the cache folder. With neither --older-than nor "
                                    "--keep-last every entry of those kinds goes. Entries being written, modified "
                                    "in the last minute, in use, or symlinks are skipped with a note.",
                        epilog=f"Kinds: {kinds}.")
    pr.add_argument("kinds", nargs="+", type=_kind_arg, metavar="KIND", help=f"{', '.join(KINDS)} or all")
    pr.add_argument("--older-than", type=_days_arg, metavar="DAYS",
                    help="only entries last modified more than DAYS days ago (fractions allowed)")
    pr.add_argument("--keep-last", type=_count_arg, metavar="N",
                    help="keep the N most recently modified entries of each kind")
    pr.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    return p


def cache(argv: list[str]) -> int:
    args = cache_parser().parse_args(argv)
    if args.command == "prune":
        return prune(args)
    root, kinds, other = scan()
    if args.json:
        print(json.dumps(listing_json(root, kinds, other), indent=2, allow_nan=False))
    else:
        print_listing(root, kinds, other)
    return 0
