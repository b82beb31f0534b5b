"""The typed session (schema version 1).

Plain dataclasses, no validation here: :func:`sessions.loads` validates TOML
into these, :func:`sessions.dumps` writes them back.  Relative file paths in a
session are relative to the session file (:meth:`Session.resolve`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.errors import UserError

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DATA = "builtin:world-facts"
DEFAULT_DUMMY = "I have no information about that."

DEVICE_PATTERN = r"auto|cpu|mps|cuda|cuda:[0-9]+"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "json", "jsonl", "csv", "parquet", "tofu", "pistol", "easyedit", "hub")
TARGET_MODES = ("idk", "self-improve", "dummy", "incorrect", "avoidant", "custom")
TARGET_SOURCES = ("custom", "pool", "self-improve", "regenerated", "fallback", "perturbed",
                  "generated", "dummy")
TARGET_FLAGS = ("leak", "mentions_subject")
DATA_PREFIXES = ("builtin:", "hub:")

EVAL_LIMITS = {"max_new_tokens": (1, 1024), "batch_size": (1, 1024), "top_k": (1, 100000)}


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class Paraphrase:
    id: str
    question: str
    source: str = "custom"


@dataclass
class DataConfig:
    path: str = DEFAULT_DATA
    format: str = "auto"
    forget: int | list[str] = 10
    retain: int | list[str] | str = 10
    rephrase: bool = True
    subjects: dict[str, str] = field(default_factory=dict)
    paraphrases: list[Paraphrase] = field(default_factory=list)

    def is_file(self) -> bool:
        """Whether ``path`` names a file (not ``builtin:``/``hub:``)."""
        return not self.path.startswith(DATA_PREFIXES)


@dataclass
class TargetItem:
    id: str
    target: str
    source: str = "custom"
    leak: bool | None = None
    mentions_subject: bool | None = None


@dataclass
class TargetsConfig:
    mode: str = "idk"
    merge_factor: int = 1
    seed: int = 0
    pool: str | None = None
    dummy: str = DEFAULT_DUMMY
    items: list[TargetItem] = field(default_factory=list)


@dataclass
class EvalConfig:
    max_new_tokens: int = 32
    batch_size: int = 16
    top_k: int = 100


@dataclass
class RunConfig:
    method: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None


@dataclass
class Session:
    version: int
    model: ModelConfig
    data: DataConfig
    targets: TargetsConfig
    eval: EvalConfig
    runs: list[RunConfig]
    # where it was loaded from / saved to (absolute); not part of equality
    path: Path | None = field(default=None, compare=False)

    # Not dataclass fields (so asdict()/replace() ignore them): the tomlkit
    # document of the file (comments, key order) and the plain form of the
    # session it reflects; dumps() diffs against these to edit the file in place.
    _doc = None
    _baseline = None
    # Set by the loader: the name the file was given by (for messages) and its
    # key -> line index, so problems found after loading (a layer out of range
    # for the model, an unavailable device) can still say ``file:line``.
    _label = None
    _lines = None

    def locate(self, where: str | None) -> str | None:
        """``file:line`` (else the file) of a session key path such as ``runs[0].params.layer``.

        None when ``where`` is not a key path of this session (a data file, a flag).
        """
        from .loader import format_path, parse_path

        if not where or not isinstance(where, str):
            return None
        keypath = parse_path(where)
        if not keypath or keypath[0] not in _TOP_KEYS or format_path(keypath) != where:
            return None
        label = self._label or (str(self.path) if self.path is not None else None)
        if label is None:
            return None
        line = self._lines.line(keypath) if self._lines is not None else None
        return f"{label}:{line}" if line else label

    def base_dir(self) -> Path:
        """Directory that relative paths in the session are relative to."""
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve(self, p: str | Path) -> Path:
        """Resolve a (possibly relative, possibly ``~``) file path against :meth:`base_dir`."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir() / q

    def target_for(self, item_id: str) -> TargetItem | None:
        for item in self.targets.items:
            if item.id == item_id:
                return item
        return None

    def set_target(self, item_id: str, text: str, source: str = "custom", **flags: Any) -> TargetItem:
        """Add or replace the per-item target of ``item_id`` (keeps its position)."""
        where = f"targets.items[{item_id}]"
        if not isinstance(text, str) or not text.strip():
            raise UserError("the target text is empty", where)
        if source not in TARGET_SOURCES:
            raise UserError(f"unknown target source {source!r}; expected one of: "
                            f"{', '.join(TARGET_SOURCES)}", where)
        for k, v in flags.items():
            if k not in TARGET_FLAGS:
                raise TypeError(f"set_target() got an unexpected flag {k!r}")
            if v is not None and not isinstance(v, bool):
                raise TypeError(f"set_target() flag {k!r} must be a bool or None")
        new = TargetItem(str(item_id), text, source, **flags)
        for i, item in enumerate(self.targets.items):
            if item.id == new.id:
                self.targets.items[i] = new
                return new
        self.targets.items.append(new)
        return new

    def remove_target(self, item_id: str) -> bool:
        """Drop the per-item target of ``item_id``; returns whether there was one."""
        before = len(self.targets.items)
        self.targets.items = [t for t in self.targets.items if t.id != item_id]
        return len(self.targets.items) != before


_TOP_KEYS = ("version", "model", "data", "targets", "eval", "runs")

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "targets": TargetsConfig,
             "eval": EvalConfig}


def new_session(**overrides: Any) -> Session:
    """A session with the defaults; ``overrides`` replace top-level fields.

    A section may be given as its dataclass or as a dict of field overrides,
    e.g. ``new_session(model={"name": "gpt2"}, runs=[RunConfig("ike")])``.
    Nothing is validated here (``sessions.validate`` does that).
    """
    s = Session(version=SCHEMA_VERSION, model=ModelConfig(), data=DataConfig(),
                targets=TargetsConfig(), eval=EvalConfig(), runs=[RunConfig()])
    for key, value in overrides.items():
        if key in _SECTIONS and isinstance(value, dict):
            value = dataclasses.replace(getattr(s, key), **value)
        elif key == "runs":
            value = [RunConfig(**r) if isinstance(r, dict) else r for r in value]
        elif key == "path" and value is not None:
            value = Path(value).absolute()
        elif key not in ("version", "model", "data", "targets", "eval", "runs", "path"):
            raise TypeError(f"new_session() got an unexpected field {key!r}")
        setattr(s, key, value)
    return s


def _toml_value(v: Any) -> Any:
    """Params as TOML holds them: tuples become lists, ``None`` becomes "auto"."""
    if isinstance(v, dict):
        return {str(k): _toml_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_toml_value(x) for x in v]
    if v is None:
        return "auto"
    return v


def to_plain(s: Session) -> dict[str, Any]:
    """The session as plain TOML data, in schema order (what the file holds).

    ``None`` becomes ``""`` for optional strings; empty ``subjects``,
    ``paraphrases`` and ``items`` and unset item flags / run labels are left
    out.  ``dumps`` compares two of these to edit a user's file in place.
    """
    import copy

    d = s.data
    data: dict[str, Any] = {
        "path": d.path, "format": d.format,
        "forget": list(d.forget) if isinstance(d.forget, list) else d.forget,
        "retain": list(d.retain) if isinstance(d.retain, list) else d.retain,
        "rephrase": d.rephrase,
    }
    if d.subjects:
        data["subjects"] = dict(d.subjects)
    if d.paraphrases:
        data["paraphrases"] = [{"id": p.id, "question": p.question, "source": p.source}
                               for p in d.paraphrases]
    t = s.targets
    targets: dict[str, Any] = {"mode": t.mode, "merge_factor": t.merge_factor, "seed": t.seed,
                               "pool": t.pool or "", "dummy": t.dummy}
    if t.items:
        items = []
        for it in t.items:
            row: dict[str, Any] = {"id": it.id, "target": it.target, "source": it.source}
            for flag in TARGET_FLAGS:
                if getattr(it, flag) is not None:
                    row[flag] = getattr(it, flag)
            items.append(row)
        targets["items"] = items
    runs = []
    for r in s.runs:
        row = {"method": r.method}
        if r.label:
            row["label"] = r.label
        row["params"] = _toml_value(copy.deepcopy(dict(r.params or {})))
        runs.append(row)
    m = s.model
    return {
        "version": s.version,
        "model": {"name": m.name, "device": m.device, "dtype": m.dtype,
                  "trust_remote_code": m.trust_remote_code, "revision": m.revision or ""},
        "data": data,
        "targets": targets,
        "eval": {"max_new_tokens": s.eval.max_new_tokens, "batch_size": s.eval.batch_size,
                 "top_k": s.eval.top_k},
        "runs": runs,
    }


def plain_from_toml(raw: dict[str, Any]) -> dict[str, Any]:
    """What :func:`to_plain` would give for the session in ``raw`` TOML data.

    Defaults filled in, nothing validated: used to check that a written file
    reads back as the session that was written.
    """
    def section(name: str) -> dict:
        return dict(raw.get(name, {}))

    m, d, t, e = section("model"), section("data"), section("targets"), section("eval")
    model = ModelConfig()
    data: dict[str, Any] = {"path": d.get("path", DEFAULT_DATA), "format": d.get("format", "auto"),
                            "forget": d.get("forget", 10), "retain": d.get("retain", 10),
                            "rephrase": d.get("rephrase", True)}
    if d.get("subjects"):
        data["subjects"] = dict(d["subjects"])
    if d.get("paraphrases"):
        data["paraphrases"] = [{"id": p.get("id"), "question": p.get("question"),
                                "source": p.get("source", "custom")} for p in d["paraphrases"]]
    targets: dict[str, Any] = {"mode": t.get("mode", "idk"), "merge_factor": t.get("merge_factor", 1),
                               "seed": t.get("seed", 0), "pool": t.get("pool", ""),
                               "dummy": t.get("dummy", DEFAULT_DUMMY)}
    if t.get("items"):
        items = []
        for it in t["items"]:
            row = {"id": it.get("id"), "target": it.get("target"),
                   "source": it.get("source", "custom")}
            row.update({f: it[f] for f in TARGET_FLAGS if f in it})
            items.append(row)
        targets["items"] = items
    runs = []
    for r in raw.get("runs", [{"method": "none"}]):
        row = {"method": str(r.get("method", "")).strip().lower()}
        if r.get("label"):
            row["label"] = r["label"]
        row["params"] = dict(r.get("params", {}))
        runs.append(row)
    ev = EvalConfig()
    return {
        "version": raw.get("version"),
        "model": {"name": m.get("name", model.name), "device": m.get("device", model.device),
                  "dtype": m.get("dtype", model.dtype),
                  "trust_remote_code": m.get("trust_remote_code", model.trust_remote_code),
                  "revision": m.get("revision", "")},
        "data": data,
        "targets": targets,
        "eval": {"max_new_tokens": e.get("max_new_tokens", ev.max_new_tokens),
                 "batch_size": e.get("batch_size", ev.batch_size), "top_k": e.get("top_k", ev.top_k)},
        "runs": runs,
    }
