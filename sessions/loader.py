"""Read and validate a session file into a :class:`~sessions.schema.Session`.

Every problem raises :class:`UserError` with a one-line message naming the
key, the value and what was expected; ``where`` is ``file:line`` when the key
can be found in the text (best effort), else the file.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

from unlearn_tui.backends.compat import tomllib
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.fileio import clean_stale_temps
from unlearn_tui.backends.params import unknown_key_message
from unlearn_tui.backends.spec import (
    DEVICE_MAPS,
    FINETUNE_DATA,
    MAP_DEVICE_PATTERN,
    MEMORY_DEVICE_PATTERN,
    MEMORY_SIZE_PATTERN,
    MISSING,
    PARAPHRASE_LEFT_OUT,
    SUPPORTED_VERSIONS,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    Paraphrase,
    RunConfig,
    Session,
    StepConfig,
    TargetItem,
    TargetsConfig,
    format_path,
    parse_path,
    toml_default,
    toml_keys,
    toml_meta,
)

from ._lines import LineIndex
from .schema import to_plain

__all__ = ["KNOWN", "format_path", "parse_path", "format_value", "check_override", "check_remote_code",
           "parse", "loads", "load"]

_MISSING: Any = MISSING
_HUB = re.compile(r"[^/\s:]+/[^/\s:]+(:[^\s:]+){0,2}")

# the tables a file may hold, by the kind of table the messages and checks name
_TABLES: dict[str, type] = {"": Session, "model": ModelConfig, "data": DataConfig, "paraphrase": Paraphrase,
                            "targets": TargetsConfig, "item": TargetItem, "eval": EvalConfig,
                            "finetune": FinetuneConfig, "run": RunConfig, "step": StepConfig}
KNOWN = {kind: toml_keys(cls) for kind, cls in _TABLES.items()}


def _default(cls: type, key: str) -> Any:
    """The default of a key as the file holds it (the field's metadata; ``_MISSING`` if required)."""
    return toml_default(cls, key)


def _choices(cls: type, key: str) -> tuple[str, ...]:
    return toml_meta(cls, key)["choices"]


def _range(cls: type, key: str) -> dict[str, int | None]:
    lo, hi = toml_meta(cls, key)["range"]
    return {"lo": lo, "hi": hi}


# ----------------------------------------------------------------- formatting
def format_value(v: Any) -> str:
    """A value as the user wrote it in TOML (short)."""
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, str):
        text = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, dict):
        return "a table"
    elif isinstance(v, (int, float)):
        text = repr(v)
    else:
        try:
            text = json.dumps(v, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _choices_message(v: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(v, choices, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"expected one of {', '.join(choices)}; got {format_value(v)}{hint}"


# ------------------------------------------------------------------- checker
class _Checker:
    def __init__(self, text: str, path: Path | None, label: str, with_lines: bool) -> None:
        self.text = text
        self.path = path
        self.label = label
        self._lines = LineIndex(text) if with_lines else None

    def where(self, keypath: tuple) -> str:
        line = self._lines.line(keypath) if self._lines is not None else None
        return f"{self.label}:{line}" if line else self.label

    def fail(self, keypath: tuple, message: str, at: tuple | None = None) -> NoReturn:
        text = f"{format_path(keypath)}: {message}" if keypath else message
        raise UserError(text, self.where(keypath if at is None else at))

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        if q.is_absolute():
            return q
        return (self.path.parent if self.path is not None else Path.cwd()) / q

    # tables --------------------------------------------------------------
    def table(self, value: Any, keypath: tuple, kind: str) -> dict:
        if not isinstance(value, dict):
            self.fail(keypath, f"expected a table, got {format_value(value)}")
        known = list(KNOWN[kind])
        for key in value:
            if key not in known:
                self.fail(keypath, unknown_key_message(key, known), at=keypath + (key,))
        return value

    def section(self, root: dict, name: str) -> dict:
        return self.table(root.get(name, {}), (name,), name)

    def array_of_tables(self, value: Any, keypath: tuple, header: str) -> list[dict]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(keypath, f"expected an array of tables ([[{header}]] sections), "
                               f"got {format_value(value)}")
        return value

    # scalars -------------------------------------------------------------
    def string(self, tbl: dict, keypath: tuple, key: str, default: Any = _MISSING, *,
               choices: tuple[str, ...] | None = None, pattern: str | None = None,
               expected: str | None = None, allow_empty: bool = False) -> Any:
        kp = keypath + (key,)
        v = tbl.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                self.fail(keypath, f'missing key "{key}"', at=keypath)
            return default
        if not isinstance(v, str):
            what = expected or (f"one of {', '.join(choices)}" if choices else "a string")
            self.fail(kp, f"expected {what}, got {format_value(v)}")
        if choices is not None and v not in choices:
            self.fail(kp, _choices_message(v, choices))
        if pattern is not None and not re.fullmatch(pattern, v):
            self.fail(kp, f"expected {expected}, got {format_value(v)}")
        if not allow_empty and not v.strip():
            self.fail(kp, f"expected {expected or 'a non-empty string'}, got {format_value(v)}")
        return v

    def integer(self, tbl: dict, keypath: tuple, key: str, default: int, *,
                lo: int | None = None, hi: int | None = None) -> int:
        kp = keypath + (key,)
        v = tbl.get(key, default)
        if lo is not None and hi is not None:
            what = f"an integer between {lo} and {hi}"
        elif lo is not None:
            what = f"an integer >= {lo}"
        else:
            what = "an integer"
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(kp, f"expected {what}, got {format_value(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(kp, f"expected {what}, got {format_value(v)}")
        return v

    def number(self, tbl: dict, keypath: tuple, key: str, default: Any, *, lo: float, hi: float,
               lo_open: bool = False, auto: bool = False) -> Any:
        """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), or ``"auto"`` (None) with ``auto``.

        An integer stays an integer (``until_rouge1 = 1``), so an unchanged file is written back as it was.
        """
        v = tbl.get(key, _MISSING)
        if v is _MISSING:
            return default
        if auto and v == "auto":
            return None
        what = f"a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}" + (' or "auto"' if auto else "")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < lo or (lo_open and v == lo) or v > hi:
            self.fail(keypath + (key,), f"expected {what}, got {format_value(v)}")
        return v

    def boolean(self, tbl: dict, keypath: tuple, key: str, default: Any) -> Any:
        v = tbl.get(key, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.fail(keypath + (key,), f"expected true or false, got {format_value(v)}")
        return v

    def ids(self, v: list, kp: tuple, what: str) -> list[str]:
        if not v:
            self.fail(kp, f"expected a non-empty list of item ids, got []{what}")
        seen: set[str] = set()
        for j, x in enumerate(v):
            if not isinstance(x, str) or not x.strip():
                self.fail(kp, f"expected item ids as strings, got {format_value(x)} "
                              f"(element {j + 1})")
            if x in seen:
                self.fail(kp, f"item id {format_value(x)} is listed twice")
            seen.add(x)
        return list(v)

    def file_path(self, kp: tuple, p: str, what: str) -> None:
        """The file must exist and be a regular file (a FIFO or a device would block or never end)."""
        resolved = self.resolve(p)
        try:
            mode = resolved.stat().st_mode
        except FileNotFoundError:
            self.fail(kp, f"{what} {format_value(p)} not found (looked for {resolved})")
        except OSError as e:
            self.fail(kp, f"cannot read {what} {format_value(p)} ({e.strerror or e})")
        if stat.S_ISDIR(mode):
            self.fail(kp, f"{what} {format_value(p)} is a directory; expected a file")
        if not stat.S_ISREG(mode):
            self.fail(kp, f"{what} {format_value(p)} is {_file_kind(mode)}, not a regular file; "
                          f"expected a file")


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


# ------------------------------------------------------------------ sections
def _builtin_names() -> list[str]:
    """Names of the shipped data sets, or [] when they cannot be listed (no check then)."""
    try:
        from unlearn_tui.backends.data import builtin_names

        return list(builtin_names())
    except Exception:  # the data module is optional here; the loader checks again later
        return []


# The rules of the [model] strings; command-line overrides (--model, --device, --dtype) are
# checked with the same ones (:func:`check_override`).
_MODEL_RULES: dict[str, dict[str, Any]] = {
    "name": dict(expected="a model (built-in name, hub id, local directory or .gguf file)"),
    "device": dict(pattern=toml_meta(ModelConfig, "device")["pattern"], expected="auto, cpu, mps, cuda or cuda:N"),
    "dtype": dict(choices=_choices(ModelConfig, "dtype")),
}


def check_override(key: str, value: Any, flag: str) -> str:
    """Validate a command-line override of ``model.KEY`` (``--device tpu`` ...) like the file's key.

    Raises UserError ``FLAG: expected ..., got ...``; returns the value.
    """
    c = _Checker("", None, flag, with_lines=False)
    try:
        return c.string({key: value}, (), key, **_MODEL_RULES[key])
    except UserError as e:  # drop the key path: the flag is the where
        raise UserError(e.message.split(": ", 1)[1] if e.message.startswith(f"{key}: ") else e.message,
                        flag) from None


def _model(c: _Checker, root: dict) -> ModelConfig:
    t = c.section(root, "model")
    kp = ("model",)
    M = ModelConfig
    return M(
        name=c.string(t, kp, "name", _default(M, "name"), **_MODEL_RULES["name"]),
        device=c.string(t, kp, "device", _default(M, "device"), **_MODEL_RULES["device"]),
        dtype=c.string(t, kp, "dtype", _default(M, "dtype"), **_MODEL_RULES["dtype"]),
        trust_remote_code=c.boolean(t, kp, "trust_remote_code", _default(M, "trust_remote_code")),
        revision=c.string(t, kp, "revision", _default(M, "revision"), allow_empty=True) or None,
        **_placement(c, t, kp),
    )


def _placement(c: _Checker, t: dict, kp: tuple) -> dict[str, Any]:
    """``device_map`` (a strategy or a table ``module = device``) and ``max_memory`` (``device = size``)."""
    out: dict[str, Any] = {}
    dm = t.get("device_map", _MISSING)
    dkp = kp + ("device_map",)
    shape = f"{', '.join(DEVICE_MAPS)} or a table of module = device"
    if dm is not _MISSING:
        if isinstance(dm, str):
            if dm not in DEVICE_MAPS:
                c.fail(dkp, f"{_choices_message(dm, DEVICE_MAPS)}; or a table of module = device")
        elif isinstance(dm, dict):
            if not dm:
                c.fail(dkp, f"expected {shape}, got an empty table")
            for module, dev in dm.items():
                ok = (isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0) or (
                    isinstance(dev, str) and re.fullmatch(MAP_DEVICE_PATTERN, dev) is not None)
                if not ok:
                    c.fail(dkp + (module,), f"unknown device {format_value(dev)} for module {format_value(module)}; "
                                            "expected cpu, cuda, cuda:N, mps, disk or a GPU index")
            dm = dict(dm)
        else:
            c.fail(dkp, f"expected {shape}, got {format_value(dm)}")
        device = t.get("device", _default(ModelConfig, "device"))
        if device != "auto":
            c.fail(dkp, f"device_map places the model, so it cannot be combined with device = {format_value(device)}; "
                        'remove one of them (or set device = "auto")')
        out["device_map"] = dm
    mm = t.get("max_memory", _MISSING)
    mkp = kp + ("max_memory",)
    if mm is not _MISSING:
        if not isinstance(mm, dict):
            c.fail(mkp, f'expected a table of device = size (e.g. cpu = "8GiB"), got {format_value(mm)}')
        for dev, size in mm.items():
            if not re.fullmatch(MEMORY_DEVICE_PATTERN, dev):
                c.fail(mkp + (dev,), f"unknown device {format_value(dev)}; expected cpu, cuda:N, N (a GPU index), "
                                     "mps or disk")
            ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
                isinstance(size, str) and re.fullmatch(MEMORY_SIZE_PATTERN, size.strip(), re.IGNORECASE) is not None)
            if not ok:
                c.fail(mkp + (dev,), f'bad size {format_value(size)} for {dev}; expected a size such as "20GiB" or '
                                     '"500MB", or a number of bytes')
        if mm and dm is _MISSING:
            c.fail(mkp, 'max_memory only applies with device_map; add device_map = "auto" (or remove max_memory)')
        out["max_memory"] = dict(mm)
    return out


def _data_source(c: _Checker, pkp: tuple, path: str) -> None:
    """A data source (``[data] path``, ``[finetune] data``): ``builtin:NAME`` of a shipped set,
    ``hub:OWNER/NAME[:split]``, or a regular file (relative to the session file)."""
    if path.startswith("builtin:"):
        name = path[len("builtin:"):].strip()
        if not name:
            c.fail(pkp, f'expected "builtin:NAME", got {format_value(path)}')
        known = _builtin_names()
        if known and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f' (did you mean "builtin:{close[0]}"?)' if close else ""
            c.fail(pkp, f"unknown built-in data set {format_value(path)}{hint}; expected one of: "
                        + ", ".join(f"builtin:{n}" for n in known))
    elif path.startswith("hub:"):
        if not _HUB.fullmatch(path[len("hub:"):]):
            c.fail(pkp, f'expected "hub:OWNER/NAME[:split]" or "hub:OWNER/NAME:CONFIG:SPLIT", '
                        f"got {format_value(path)}")
    else:
        c.file_path(pkp, path, "data file")


def _data(c: _Checker, root: dict) -> DataConfig:
    t = c.section(root, "data")
    kp = ("data",)
    D = DataConfig
    path = c.string(t, kp, "path", _default(D, "path"),
                    expected='a file path, "builtin:NAME" or "hub:OWNER/NAME[:split]"')
    _data_source(c, kp + ("path",), path)
    fmt = c.string(t, kp, "format", _default(D, "format"), choices=_choices(D, "format"))

    forget = t.get("forget", _default(D, "forget"))
    fkp = kp + ("forget",)
    if isinstance(forget, bool) or not isinstance(forget, (int, list)):
        c.fail(fkp, f"expected a number of items (>= 1) or a list of item ids, "
                    f"got {format_value(forget)}")
    if isinstance(forget, int) and forget < 1:
        c.fail(fkp, f"expected a number of items >= 1, got {format_value(forget)}")
    if isinstance(forget, list):
        forget = c.ids(forget, fkp, "")

    retain = t.get("retain", _default(D, "retain"))
    rkp = kp + ("retain",)
    shape = 'a number of items (>= 0), a list of item ids or "rest"'
    if isinstance(retain, bool) or not isinstance(retain, (int, list, str)):
        c.fail(rkp, f"expected {shape}, got {format_value(retain)}")
    if isinstance(retain, str) and retain != "rest":
        c.fail(rkp, f"expected {shape}, got {format_value(retain)}")
    if isinstance(retain, int) and retain < 0:
        c.fail(rkp, f"expected a number of items >= 0 (0 = no retain split), "
                    f"got {format_value(retain)}")
    if isinstance(retain, list):
        retain = c.ids(retain, rkp, " (use retain = 0 for no retain split)")
        if isinstance(forget, list):
            both = [x for x in retain if x in set(forget)]
            if both:
                c.fail(rkp, f"item id {format_value(both[0])} is in both forget and retain")

    rephrase = c.boolean(t, kp, "rephrase", _default(D, "rephrase"))

    subjects_raw = t.get("subjects", _default(D, "subjects"))
    skp = kp + ("subjects",)
    if not isinstance(subjects_raw, dict):
        c.fail(skp, f"expected a table of item id = \"subject\", got {format_value(subjects_raw)}")
    subjects: dict[str, str] = {}
    for item_id, subject in subjects_raw.items():
        if not isinstance(subject, str) or not subject.strip():
            c.fail(skp + (item_id,), f"expected the subject as a non-empty string, "
                                     f"got {format_value(subject)}")
        subjects[item_id] = subject

    paraphrases = []
    pkp = kp + ("paraphrases",)
    raw_paraphrases = t.get("paraphrases", _default(D, "paraphrases"))
    for i, raw in enumerate(c.array_of_tables(raw_paraphrases, pkp, "data.paraphrases")):
        ikp = pkp + (i,)
        c.table(raw, ikp, "paraphrase")
        source = c.string(raw, ikp, "source", _default(Paraphrase, "source"))
        paraphrases.append(Paraphrase(
            id=c.string(raw, ikp, "id", expected="an item id (string)"),
            # "left-out": every model-written try failed the checks; the question is "" (not tried again)
            question=c.string(raw, ikp, "question", allow_empty=source == PARAPHRASE_LEFT_OUT),
            source=source,
        ))
    return DataConfig(path=path, format=fmt, forget=forget, retain=retain, rephrase=rephrase,
                      subjects=subjects, paraphrases=paraphrases)


def _targets(c: _Checker, root: dict) -> TargetsConfig:
    t = c.section(root, "targets")
    kp = ("targets",)
    T, Item = TargetsConfig, TargetItem
    mode = c.string(t, kp, "mode", _default(T, "mode"), choices=_choices(T, "mode"))
    merge_factor = c.integer(t, kp, "merge_factor", _default(T, "merge_factor"), **_range(T, "merge_factor"))
    seed = c.integer(t, kp, "seed", _default(T, "seed"), **_range(T, "seed"))
    pool = c.string(t, kp, "pool", _default(T, "pool"), allow_empty=True,
                    expected='a refusal-pool file path ("" or "builtin:refusals" = built-in pool)')
    if pool and pool.strip() != "builtin:refusals":
        c.file_path(kp + ("pool",), pool, "refusal-pool file")
    dummy = c.string(t, kp, "dummy", _default(T, "dummy"))
    items: list[TargetItem] = []
    first: dict[str, int] = {}
    ikp_all = kp + ("items",)
    for i, raw in enumerate(c.array_of_tables(t.get("items", _default(T, "items")), ikp_all, "targets.items")):
        ikp = ikp_all + (i,)
        c.table(raw, ikp, "item")
        item_id = c.string(raw, ikp, "id", expected="an item id (string)")
        if item_id in first:
            c.fail(ikp + ("id",), f"duplicate target id {format_value(item_id)} "
                                  f"(first at targets.items[{first[item_id]}])")
        first[item_id] = i
        items.append(TargetItem(
            id=item_id,
            target=c.string(raw, ikp, "target", expected="the target text (non-empty string)"),
            source=c.string(raw, ikp, "source", _default(Item, "source"), choices=_choices(Item, "source")),
            leak=c.boolean(raw, ikp, "leak", _default(Item, "leak")),
            mentions_subject=c.boolean(raw, ikp, "mentions_subject", _default(Item, "mentions_subject")),
        ))
    return TargetsConfig(mode=mode, merge_factor=merge_factor, seed=seed, pool=pool or None,
                         dummy=dummy, items=items)


def _eval(c: _Checker, root: dict) -> EvalConfig:
    t = c.section(root, "eval")
    kp = ("eval",)
    E = EvalConfig
    values: dict[str, Any] = {k: c.integer(t, kp, k, _default(E, k), **_range(E, k))
                              for k in ("max_new_tokens", "batch_size", "top_k")}
    values["extra"] = _names(c, t, kp, "extra", _choices(E, "extra"))
    holdout = t.get("holdout")
    if holdout is None:
        values["holdout"] = None
    elif isinstance(holdout, list):
        values["holdout"] = c.ids(holdout, kp + ("holdout",), "")
    else:
        values["holdout"] = c.integer(t, kp, "holdout", 1, lo=1)
    files = t.get("utility_data", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f.strip() for f in files):
        c.fail(kp + ("utility_data",), f"expected a list of data files, got {format_value(files)}")
    for f in files:
        _data_source(c, kp + ("utility_data",), f)
    values["utility_data"] = list(files)
    values["utility_items"] = c.integer(t, kp, "utility_items", 1, lo=1) if "utility_items" in t else None
    text = c.string(t, kp, "perplexity_text", None, expected="a text file")
    if text is not None:
        c.file_path(kp + ("perplexity_text",), text, "text file")
    values["perplexity_text"] = text
    lo, hi = _range(E, "relearn_epochs").values()
    values["relearn_epochs"] = c.integer(t, kp, "relearn_epochs", 1, lo=lo, hi=hi) \
        if "relearn_epochs" in t else None
    values["relearn_lr"] = c.number(t, kp, "relearn_lr", None, lo=0.0, hi=1.0, lo_open=True)
    results = c.string(t, kp, "results", None, expected="a results file name (JSON, beside the session)")
    return E(**values, results=results)


def _names(c: _Checker, t: dict, kp: tuple, key: str, choices: tuple[str, ...]) -> list[str]:
    """A list of distinct names out of ``choices`` (``[eval] extra``)."""
    v = t.get(key, [])
    if not isinstance(v, list):
        c.fail(kp + (key,), f"expected a list of {', '.join(choices)}, got {format_value(v)}")
    seen: list[str] = []
    for x in v:
        if not isinstance(x, str) or x not in choices:
            c.fail(kp + (key,), _choices_message(x, choices) if isinstance(x, str)
                   else f"expected one of {', '.join(choices)}, got {format_value(x)}")
        if x in seen:
            c.fail(kp + (key,), f"{format_value(x)} is listed twice")
        seen.append(x)
    return seen


def _finetune(c: _Checker, root: dict) -> FinetuneConfig | None:
    """The optional ``[finetune]`` table (None when the file has none)."""
    if "finetune" not in root:
        return None
    t = c.section(root, "finetune")
    kp = ("finetune",)
    F = FinetuneConfig
    data = c.string(t, kp, "data", _default(F, "data"),
                    expected=f'{", ".join(FINETUNE_DATA)}, a data file, "builtin:NAME" or "hub:OWNER/NAME"')
    if data not in FINETUNE_DATA:
        close = difflib.get_close_matches(data, FINETUNE_DATA, n=1, cutoff=0.75)
        if close and not c.resolve(data).exists():   # "retian": a typo of a named set, not a file
            c.fail(kp + ("data",), f'expected {", ".join(FINETUNE_DATA)} or a data file; got '
                                   f'{format_value(data)} (did you mean "{close[0]}"?)')
        _data_source(c, kp + ("data",), data)

    def number(key: str, **rules: Any) -> Any:
        lo, hi = toml_meta(F, key)["range"]
        default = _default(F, key)
        return c.number(t, kp, key, None if default == "auto" else default, lo=lo, hi=hi, **rules)

    def integer(key: str) -> int:
        return c.integer(t, kp, key, _default(F, key), **_range(F, key))

    return F(data=data, epochs=integer("epochs"), until_rouge1=number("until_rouge1"),
             lr=number("lr", lo_open=True, auto=True),
             tuning=c.string(t, kp, "tuning", _default(F, "tuning"), choices=_choices(F, "tuning")),
             scope=c.string(t, kp, "scope", _default(F, "scope"), choices=_choices(F, "scope")),
             lora_rank=integer("lora_rank"), batch_size=integer("batch_size"), seed=integer("seed"))


def _runs(c: _Checker, root: dict) -> list[RunConfig]:
    from unlearn_tui.backends import methods

    if "runs" not in root:
        return _default(Session, "runs")
    runs = []
    for i, raw in enumerate(c.array_of_tables(root["runs"], ("runs",), "runs")):
        kp = ("runs", i)
        c.table(raw, kp, "run")
        name = _method_name(c, raw, kp)
        params = raw.get("params", {})
        if not isinstance(params, dict):
            c.fail(kp + ("params",), f"expected a table of {name} parameters, "
                                     f"got {format_value(params)}")
        try:
            methods.make(name, params, where=f"runs[{i}].params")
        except UserError as e:
            at = parse_path(e.where) if e.where else kp + ("params",)
            c.fail(at, e.message)
        label = c.string(raw, kp, "label", _default(RunConfig, "label"), allow_empty=True)
        runs.append(RunConfig(method=name, params=dict(params), label=label or None))
    return runs


def _method_name(c: _Checker, raw: dict, kp: tuple) -> str:
    """A ``[[runs]]``/``[[steps]]`` entry's ``method``: a registered method, normalised (lower case)."""
    from unlearn_tui.backends import methods

    method = c.string(raw, kp, "method", expected="a method name (string)")
    try:
        methods.get(method)
    except UserError as e:
        c.fail(kp + ("method",), e.message)
    return method.strip().lower()


def _steps(c: _Checker, root: dict) -> list[StepConfig]:
    """``[[steps]]``: the app's kept step edits (method, the request's item ids, params), in order."""
    from unlearn_tui.backends import methods

    if "steps" not in root:
        return []
    steps = []
    for i, raw in enumerate(c.array_of_tables(root["steps"], ("steps",), "steps")):
        kp = ("steps", i)
        c.table(raw, kp, "step")
        name = _method_name(c, raw, kp)
        if "items" not in raw:
            c.fail(kp, 'missing key "items" (the forget item ids of the step\'s edit request)')
        items = raw["items"]
        if not isinstance(items, list):
            c.fail(kp + ("items",), f"expected a list of item ids, got {format_value(items)}")
        items = c.ids(items, kp + ("items",), "")
        params = raw.get("params", {})
        if not isinstance(params, dict):
            c.fail(kp + ("params",), f"expected a table of {name} parameters, got {format_value(params)}")
        try:
            methods.make(name, params, where=f"steps[{i}].params")
        except UserError as e:
            at = parse_path(e.where) if e.where else kp + ("params",)
            c.fail(at, e.message)
        label = c.string(raw, kp, "label", None, allow_empty=True)
        steps.append(StepConfig(method=name, items=items, label=label or None, params=dict(params)))
    return steps


# ---------------------------------------------------------------------- load
def _toml_error(e: Exception, label: str, text: str) -> UserError:
    msg = str(e)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", msg)
    if m:
        return UserError(f"invalid TOML: {msg[:m.start()]} (column {m.group(2)})",
                         f"{label}:{m.group(1)}")
    m = re.search(r"\s*\(at end of document\)\s*$", msg)
    if m:
        last = max(1, len(text.splitlines()))
        return UserError(f"invalid TOML: {msg[:m.start()]} (at end of file)", f"{label}:{last}")
    return UserError(f"invalid TOML: {msg}", label)


def parse(text: str, path: Path | None, label: str, *, with_lines: bool = True,
          keep_doc: bool = True) -> Session:
    """Validate ``text`` into a Session (``path`` anchors relative paths)."""
    try:
        return _parse(text, path, label, with_lines=with_lines, keep_doc=keep_doc)
    except RecursionError:  # tomllib (and anything walking the values) recurses per nesting level
        raise UserError("invalid TOML: arrays or tables nested too deeply; expected a session file "
                        "(a few levels of nesting)", label) from None


def _parse(text: str, path: Path | None, label: str, *, with_lines: bool, keep_doc: bool) -> Session:
    try:
        root = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(e, label, text) from None
    except ValueError as e:  # e.g. an integer of more digits than int() reads (sys.get_int_max_str_digits)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if "integer string conversion" in first:
            first = f"an integer with more than {sys.get_int_max_str_digits()} digits"
        raise UserError(f"invalid TOML: {first[:120]}; expected a session file", label) from None
    c = _Checker(text, path, label, with_lines)

    version = root.get("version", _MISSING)
    supported = ", ".join(map(str, SUPPORTED_VERSIONS))
    if version is _MISSING:
        raise UserError(f'missing key "version"; add `version = 1` at the top '
                        f"(supported versions: {supported})", label)
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        c.fail(("version",), f"unsupported session version {format_value(version)}; "
                             f"supported versions: {supported}")
    c.table(root, (), "")
    _no_nul(c, root)

    session = Session(version=version, model=_model(c, root), data=_data(c, root),
                      targets=_targets(c, root), eval=_eval(c, root), finetune=_finetune(c, root),
                      runs=_runs(c, root), steps=_steps(c, root), path=path)
    session._label = label
    session._lines = c._lines
    if keep_doc:
        try:
            import tomlkit

            session._doc = tomlkit.parse(text)
            session._baseline = to_plain(session)
        except Exception:  # tomlkit disagrees with tomllib: fall back to a fresh rendering
            session._doc = session._baseline = None
    return session


def _no_nul(c: _Checker, root: dict) -> None:
    """No key or string may hold a NUL character (paths cannot, and messages would break)."""
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        kp, v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if "\x00" in k:
                    c.fail(kp, f"a key contains a NUL character (\\u0000): {format_value(k)}")
                stack.append((kp + (k,), x))
        elif isinstance(v, list):
            stack.extend((kp + (i,), x) for i, x in enumerate(v))
        elif isinstance(v, str) and "\x00" in v:
            c.fail(kp, f"expected text without NUL characters (\\u0000), got {format_value(v)}")


def check_remote_code(session: Session) -> None:
    """Refuse ``model.trust_remote_code = true`` unless the user also asked on the command line.

    A shared session file must not run the model folder's Python code unconfirmed:
    the error names the key's ``file:line`` and the flag that allows it.
    """
    if session.model.trust_remote_code:
        raise UserError("model.trust_remote_code = true would run Python code shipped with the model; "
                        "pass --trust-remote-code to allow it (or set the key to false)",
                        session.locate("model.trust_remote_code") or session._label)


def loads(text: str, path: Path | str | None = None) -> Session:
    """Validate a session given as TOML text; ``path`` is where it lives (or None)."""
    p = Path(path).expanduser().absolute() if path is not None else None
    label = str(path) if path is not None else "<session>"
    return parse(text, p, label)


def load(path: Path | str, *, allow_remote_code: bool = True) -> Session:
    """Read and validate a session file.

    ``allow_remote_code=False`` (the CLI without ``--trust-remote-code``) refuses a
    session with ``model.trust_remote_code = true`` (:func:`check_remote_code`).
    """
    label = str(path)
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise UserError("session file not found", label) from None
    except OSError as e:
        raise UserError(f"cannot read the session file: {e.strerror or e}", label) from None
    if stat.S_ISDIR(mode):
        raise UserError("is a directory, not a session file", label)
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device never end
        raise UserError(f"is {_file_kind(mode)}, not a regular file; expected a session TOML file", label)
    # a save killed half-way leaves a temporary file next to the session: loading from that folder
    # removes the stale ones (the rule is in backends/fileio.py); best effort, never fatal
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        real = p.resolve()                          # where a save writes (through a symlink)
        clean_stale_temps(real.parent, real.name)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError("session file not found", label) from None
    except IsADirectoryError:
        raise UserError("is a directory, not a session file", label) from None
    except OSError as e:
        raise UserError(f"cannot read the session file: {e.strerror or e}", label) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (bad byte at offset {e.start})", label) from None
    session = parse(text, p.absolute(), label)
    if not allow_remote_code:
        check_remote_code(session)
    return session
