"""Question/answer items: loading, selecting forget/retain sets, refusal pools.

Everything the engine forgets or checks is a :class:`QAItem`.  Items come from

* a file: ``.json`` (an array of objects, an object holding such an array, or
  JSON Lines despite the extension, as TOFU ships them), ``.jsonl``/``.ndjson``,
  ``.csv``/``.tsv`` (a header row) or ``.parquet``;
* ``builtin:NAME``: a demo set shipped with the package (:func:`builtin_names`);
* ``hub:OWNER/NAME``, ``hub:OWNER/NAME:SPLIT`` or ``hub:OWNER/NAME:CONFIG:SPLIT``:
  a Hugging Face dataset (split ``train`` by default), read with ``datasets``.

Columns are found by name (first match wins):

==================  ==========================================================
field               accepted column names
==================  ==========================================================
question            question, prompt, query, input, src
answer              answer, target, output, ground_truth, gold, answers
paraphrase          paraphrased_question, rephrase_prompt, rephrase, paraphrase
perturbed answers   perturbed_answer, perturbed_answers
subject             subject
id                  id, case_id
==================  ==========================================================

A list where text is expected (EasyEdit's ``ground_truth``, ZsRE's ``answers``)
contributes its first element.  Perturbed answers may be a list, a JSON array
written as text, or text separated by ``|`` (handy in CSV).  Every other column
is kept in :attr:`QAItem.extra` under its own name (PISTOL's ``edge``, TOFU's
``paraphrased_answer``, EasyEdit's ``target_new`` and ``locality_*``...).

Items without an id get their zero-based position among the records as id:
``"0"``, ``"1"``, ... (not zero-padded, so the id of a record never depends on
how many records follow it).

The explicit formats pin the columns instead of searching the aliases:
``tofu`` (question, answer, paraphrased_question, perturbed_answer), ``pistol``
(question, answer; ``edge`` kept in extra) and ``easyedit`` (prompt or src as
the question, ground_truth or answers as the fact to forget; ROME's CounterFact
``requested_rewrite`` records are flattened too).  In ``auto`` mode records
with ``target_new`` or ``requested_rewrite`` are read as EasyEdit records.

Every problem a user can fix raises :class:`~backends.errors.UserError` with the
file (or ``builtin:``/``hub:`` spec) as *where*.  Importing this module is cheap:
``datasets`` and ``pyarrow`` are imported only when a hub dataset or a Parquet
file is read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError
from .spec import DATA_FORMATS

__all__ = [
    "QAItem",
    "FORMATS",
    "load_items",
    "builtin_names",
    "builtin_refusals",
    "load_lines",
    "select",
    "rephrase_split",
]

FORMATS = DATA_FORMATS  # the experiment description's list (backends.spec), one statement

QUESTION_KEYS = ("question", "prompt", "query", "input", "src")
ANSWER_KEYS = ("answer", "target", "output", "ground_truth", "gold", "answers")
PARAPHRASE_KEYS = ("paraphrased_question", "rephrase_prompt", "rephrase", "paraphrase")
PERTURBED_KEYS = ("perturbed_answer", "perturbed_answers")
SUBJECT_KEYS = ("subject",)
ID_KEYS = ("id", "case_id")

# Column names per record format: (question, answer, paraphrase, perturbed, subject, id).
_SCHEMAS: dict[str, tuple[tuple[str, ...], ...]] = {
    "generic": (QUESTION_KEYS, ANSWER_KEYS, PARAPHRASE_KEYS, PERTURBED_KEYS, SUBJECT_KEYS, ID_KEYS),
    "tofu": (("question",), ("answer",), ("paraphrased_question",), PERTURBED_KEYS, SUBJECT_KEYS, ID_KEYS),
    "pistol": (("question",), ("answer",), (), (), SUBJECT_KEYS, ID_KEYS),
    "easyedit": (("prompt", "src"), ("ground_truth", "answers"), ("rephrase_prompt", "rephrase"),
                 (), SUBJECT_KEYS, ID_KEYS),
}

_EXTENSIONS = {
    ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
}

# Keys under which a JSON object may hold its list of records (first match wins).
_LIST_KEYS = ("data", "items", "records", "examples", "rows", "questions", "train", "forget")

_BUILTIN_DIR = "builtin"


@dataclass
class QAItem:
    """One fact: a question and the short answer the model should (not) give."""

    id: str
    question: str
    answer: str
    paraphrased_question: str | None = None
    perturbed_answers: list[str] = field(default_factory=list)
    subject: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. PISTOL "edge", EasyEdit locality prompts


# A record read from a source, with where it came from ("line 3", "record 2", "row 5").
_Record = tuple[str, dict]


# --------------------------------------------------------------------------- loading


def load_items(spec: str | os.PathLike, base_dir: Path | None = None, format: str = "auto") -> list[QAItem]:
    """Load QA items from a file path, ``builtin:NAME`` or ``hub:OWNER/NAME[:split]``."""
    if format not in FORMATS:
        raise UserError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}",
                        str(spec))
    text_spec = os.fspath(spec).strip()
    if not text_spec:
        raise UserError("no data given; expected a file path, builtin:NAME or hub:OWNER/NAME", "data")
    if "\x00" in text_spec:
        raise UserError(f"the data path {text_spec!r} contains a NUL character; expected a file path", "data")
    if isinstance(spec, str) and text_spec.startswith("builtin:"):
        return _load_builtin(text_spec[len("builtin:"):].strip(), format)
    if format == "hub" or (isinstance(spec, str) and text_spec.startswith("hub:")):
        name = text_spec[len("hub:"):] if text_spec.startswith("hub:") else text_spec
        return _load_hub(name.strip())

    path = Path(text_spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    where = str(path)
    if not path.exists():
        raise UserError("file not found; expected a .json, .jsonl, .csv or .parquet file of questions "
                        "and answers (or builtin:NAME, hub:OWNER/NAME)", where)
    if path.is_dir():
        raise UserError("is a directory; expected a .json, .jsonl, .csv or .parquet file", where)
    _require_regular(path, "a .json, .jsonl, .csv or .parquet file")

    container = format if format in ("json", "jsonl", "csv", "parquet") else _detect_container(path)
    if container == "parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        if container == "csv":
            records = _parse_csv(text, where, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        else:
            records = _parse_json_text(text, where, jsonl_only=(container == "jsonl"))
    schema = format if format in ("tofu", "pistol", "easyedit") else "auto"
    return _to_items(records, where, schema)


def _require_regular(path: Path, expected: str) -> None:
    """A FIFO would block the read forever and a device never end: only regular files are read."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UserError(f"cannot read file ({exc.strerror or exc})", str(path)) from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
        raise UserError(f"is {kind}, not a regular file; expected {expected}", str(path))


# Records nested deeper than this are refused (question/answer records are a few levels deep;
# the limit keeps every recursive walk of a record far from Python's recursion limit).
MAX_DEPTH = 64


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists/dicts in ``value`` nest more than ``limit`` levels (iterative, no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return False


def _json_loads(text: str, where: str, what: str) -> Any:
    """``json.loads`` whose non-syntax failures (nesting, huge integers) are one-line UserErrors.

    ``json.JSONDecodeError`` is passed on for the caller to word.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise UserError(f"{what}arrays or objects nested too deeply to read; expected question/answer "
                        f"records (at most {MAX_DEPTH} levels deep)", where) from None
    except ValueError as exc:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise UserError(f"{what}cannot read a JSON value ({_first_line(exc)[:100]}); expected "
                        "question/answer records", where) from None


def _detect_container(path: Path) -> str:
    known = _EXTENSIONS.get(path.suffix.lower())
    if known:
        return known
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise UserError(f"cannot read file ({exc.strerror or exc})", str(path)) from None
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] in (b"[", b"{"):
        return "json"
    first_line = stripped.split(b"\n", 1)[0]
    if b"," in first_line or b"\t" in first_line:
        return "csv"
    raise UserError("cannot tell the file type; expected a .json, .jsonl, .csv or .parquet file "
                    "(or pass the format explicitly)", str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte {exc.start}); expected a UTF-8 encoded file", str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read file ({exc.strerror or exc})", str(path)) from None


def _parse_json_text(text: str, where: str, jsonl_only: bool = False) -> list[_Record]:
    """JSON array / object holding an array / JSON Lines -> located records."""
    if not text.strip():
        raise UserError("the file is empty; expected question/answer records", where)
    if not jsonl_only or text.lstrip().startswith("["):  # a .jsonl holding one JSON array is fine too
        try:
            data = _json_loads(text, where, "")
        except json.JSONDecodeError as exc:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            # Several lines that each start an object: JSON Lines (TOFU's *.json files).
            if len(lines) > 1 and exc.msg == "Extra data" and lines[0].lstrip().startswith("{"):
                return _parse_jsonl(text, where)
            raise UserError(f"invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); expected "
                            "an array of objects with question and answer, or JSON Lines", where) from None
        return _records_from_json(data, where)
    return _parse_jsonl(text, where)


def _parse_jsonl(text: str, where: str) -> list[_Record]:
    records: list[_Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = _json_loads(line, where, f"line {lineno}: ")
        except json.JSONDecodeError as exc:
            raise UserError(f"line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}); expected one "
                            "JSON object per line", where) from None
        if not isinstance(obj, dict):
            raise UserError(f"line {lineno}: found a JSON {_json_kind(obj)}; expected one JSON object per "
                            "line with question and answer", where)
        records.append((f"line {lineno}", obj))
    if not records:
        raise UserError("the file is empty; expected question/answer records", where)
    return records


def _records_from_json(data: Any, where: str) -> list[_Record]:
    if isinstance(data, dict):
        key = next((k for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
        record_lists = [k for k, v in data.items()
                        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if key is not None:
            data = data[key]
        elif any(k in data for k in QUESTION_KEYS + ("requested_rewrite",)):
            data = [data]  # a single record (a JSON Lines file of one line)
        elif len(record_lists) == 1:
            data = data[record_lists[0]]  # the only array of objects
        else:
            raise UserError(f"found a JSON object with keys {_names(data)}; expected an array of "
                            f"records, or an object holding one under {_names(_LIST_KEYS)}", where)
    if not isinstance(data, list):
        raise UserError(f"found a JSON {_json_kind(data)}; expected an array of objects with question "
                        "and answer", where)
    if not data:
        raise UserError("no records (the array is empty); expected question/answer records", where)
    records: list[_Record] = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise UserError(f"record {i}: found a JSON {_json_kind(obj)}; expected an object with question "
                            "and answer", where)
        records.append((f"record {i}", obj))
    return records


def _parse_csv(text: str, where: str, delimiter: str = ",") -> list[_Record]:
    if not text.strip():
        raise UserError("the file is empty; expected a header row and question/answer rows", where)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        records: list[_Record] = []
        for row in reader:
            if None in row:
                raise UserError(f"line {reader.line_num}: more values than the {len(header)} header columns",
                                where)
            if not any((v or "").strip() for v in row.values()):
                continue  # blank row
            records.append((f"line {reader.line_num}", dict(row)))
    except csv.Error as exc:
        raise UserError(f"invalid CSV ({exc}); expected a header row then one row per question", where) from None
    if not records:
        raise UserError(f"no rows under the header ({', '.join(header)}); expected question/answer rows", where)
    return records


def _read_parquet(path: Path) -> list[_Record]:
    where = str(path)
    try:
        import pyarrow.parquet as pq  # lazy: heavy
    except ImportError:
        raise UserError("reading Parquet needs the pyarrow package; install it or convert the file to "
                        "JSON/CSV", where) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"cannot read Parquet ({_first_line(exc)}); expected a Parquet table with question "
                        "and answer columns", where) from None
    if not rows:
        raise UserError("no rows; expected question/answer rows", where)
    return [(f"row {i}", row) for i, row in enumerate(rows)]


# --------------------------------------------------------------------------- records -> items


def _to_items(records: list[_Record], where: str, schema: str) -> list[QAItem]:
    for loc, rec in records:
        if _too_deep(rec):
            raise UserError(f"{loc}: nested more than {MAX_DEPTH} levels deep; expected a flat record with "
                            "question and answer", where)
    if schema == "auto":
        easyedit = any("target_new" in rec or "requested_rewrite" in rec for _, rec in records)
        schema = "easyedit" if easyedit else "generic"
    if schema == "easyedit":
        records = [(loc, _flatten_counterfact(r, loc, where)) for loc, r in records]

    q_names, a_names, p_names, pert_names, s_names, id_names = _SCHEMAS[schema]
    columns = list(dict.fromkeys(k for _, rec in records for k in rec))  # in order of appearance
    qkey = next((k for k in q_names if k in columns), None)
    akey = next((k for k in a_names if k in columns), None)
    label = {"generic": "", "tofu": "TOFU ", "pistol": "PISTOL ", "easyedit": "EasyEdit "}[schema]
    if qkey is None or akey is None:
        missing = "question" if qkey is None else "answer"
        accepted = q_names if qkey is None else a_names
        raise UserError(f"no {missing} column in the {label}records: found {_names(columns) or 'none'}; "
                        f"expected one of {_names(accepted)}", where)
    pkey = next((k for k in p_names if k in columns), None)
    pertkey = next((k for k in pert_names if k in columns), None)
    skey = next((k for k in s_names if k in columns), None)
    idkey = next((k for k in id_names if k in columns), None)
    used = {k for k in (qkey, akey, pkey, pertkey, skey, idkey) if k}

    items: list[QAItem] = []
    seen: dict[str, str] = {}
    for index, (loc, rec) in enumerate(records):
        question = _text(rec.get(qkey), f"{loc}: column {qkey!r}", where)
        answer = _text(rec.get(akey), f"{loc}: column {akey!r}", where)
        if not question:
            raise UserError(f"{loc}: empty question (column {qkey!r}); every record needs a question", where)
        if not answer:
            raise UserError(f"{loc}: empty answer (column {akey!r}); every record needs an answer", where)
        raw_id = rec.get(idkey) if idkey else None
        item_id = str(raw_id).strip() if raw_id is not None and str(raw_id).strip() else str(index)
        if item_id in seen:
            raise UserError(f"duplicate id {item_id!r} ({seen[item_id]} and {loc}); ids must be unique", where)
        seen[item_id] = loc
        items.append(QAItem(
            id=item_id,
            question=question,
            answer=answer,
            paraphrased_question=_optional_text(rec, pkey, loc, where),
            perturbed_answers=_text_list(rec.get(pertkey)) if pertkey else [],
            subject=_optional_text(rec, skey, loc, where),
            extra={k: v for k, v in rec.items() if k not in used},
        ))
    return items


def _flatten_counterfact(rec: dict, loc: str, where: str) -> dict:
    """ROME's CounterFact record (``requested_rewrite``) -> flat EasyEdit-style keys."""
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, dict):
        return rec
    subject = rr.get("subject")
    prompt = rr.get("prompt")
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise UserError(f"{loc}: requested_rewrite needs text 'prompt' and 'subject'", where)
    flat = {k: v for k, v in rec.items() if k != "requested_rewrite"}
    flat["prompt"] = prompt.replace("{}", subject)
    flat["subject"] = subject
    truth, new = rr.get("target_true"), rr.get("target_new")
    flat["ground_truth"] = truth.get("str") if isinstance(truth, dict) else truth
    flat["target_new"] = new.get("str") if isinstance(new, dict) else new
    paraphrases = rec.get("paraphrase_prompts")
    if isinstance(paraphrases, list) and paraphrases and "rephrase_prompt" not in flat:
        flat["rephrase_prompt"] = paraphrases[0]
    return flat


def _optional_text(rec: dict, key: str | None, loc: str, where: str) -> str | None:
    if key is None:
        return None
    return _text(rec.get(key), f"{loc}: column {key!r}", where) or None


def _text(value: Any, what: str, where: str) -> str:
    """A cell as stripped text: lists give their first element, numbers their digits."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return _text(value[0], what, where) if value else ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:  # NaN: an empty cell
            return ""
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if isinstance(value, str):
        return value.strip()
    raise UserError(f"{what}: found {type(value).__name__} {_short(value)}; expected text", where)


def _json_array(text: str) -> list | None:
    """``text`` (stripped) parsed as a JSON array when it is one; else None (the caller reads it as text)."""
    if not text.startswith("["):
        return None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # not a JSON array after all
        return None
    return parsed if isinstance(parsed, list) else None


def _text_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        parsed = _json_array(s)
        if parsed is not None:
            return _text_list(parsed)
        return [p.strip() for p in s.split("|") if p.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip():
                out.append(str(v).strip())
        return out
    return [str(value)]


# --------------------------------------------------------------------------- built-in sets


def builtin_names() -> list[str]:
    """Names usable as ``builtin:NAME`` (e.g. ``world-facts``)."""
    folder = resources.files(__package__).joinpath(_BUILTIN_DIR)
    names = [entry.name[: -len(".jsonl")].replace("_", "-")
             for entry in folder.iterdir() if entry.name.endswith(".jsonl")]
    return sorted(names)


def _builtin_text(filename: str) -> str:
    return resources.files(__package__).joinpath(_BUILTIN_DIR, filename).read_text(encoding="utf-8")


def _load_builtin(name: str, format: str) -> list[QAItem]:
    where = f"builtin:{name}"
    if name not in builtin_names():
        raise UserError(f"unknown built-in data set; expected one of {', '.join(builtin_names())}", where)
    text = _builtin_text(name.replace("-", "_") + ".jsonl")
    return _to_items(_parse_jsonl(text, where), where, "auto")


def builtin_refusals() -> list[str]:
    """The refusal sentences shipped with the package (generic, no entity)."""
    return _lines_from_text(_builtin_text("refusals.txt"), "builtin:refusals")


def load_lines(path: str | os.PathLike, base_dir: Path | None = None) -> list[str]:
    """One sentence per line, blank lines skipped; ``builtin:refusals`` for the shipped pool.

    Lines that are JSON strings (``"like this"``) are decoded; a file holding a
    JSON array of strings is read as that list.  TOFU's ``idontknow.jsonl`` is
    plain text despite its name and loads as such.
    """
    text = os.fspath(path).strip()
    if "\x00" in text:
        raise UserError(f"the path {text!r} contains a NUL character; expected a file path", "targets.pool")
    name = Path(text).name
    # A builtin: spec, also when a caller already joined it to a directory.
    if name.startswith("builtin:") and (text.startswith("builtin:") or not Path(text).exists()):
        if name == "builtin:refusals":
            return builtin_refusals()
        raise UserError("unknown built-in sentence list; expected builtin:refusals", name)
    p = Path(text).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if not p.exists():
        raise UserError("file not found; expected a text file with one sentence per line", str(p))
    if p.is_dir():
        raise UserError("is a directory; expected a text file with one sentence per line", str(p))
    _require_regular(p, "a text file with one sentence per line")
    return _lines_from_text(_read_text(p), str(p))


def _lines_from_text(text: str, where: str) -> list[str]:
    parsed = _json_array(text.strip())
    if parsed is not None and all(isinstance(s, str) for s in parsed):
        lines = [s.strip() for s in parsed if s.strip()]
        if lines:
            return lines
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if len(line) >= 2 and line[0] == '"' and line[-1] == '"':
            try:
                decoded = json.loads(line)
            except (ValueError, RecursionError):
                decoded = None
            if isinstance(decoded, str):
                line = decoded.strip()
        if line:
            lines.append(line)
    if not lines:
        raise UserError("the file is empty; expected one sentence per line", where)
    return lines


# --------------------------------------------------------------------------- hub


def _load_hub(spec: str) -> list[QAItem]:
    where = f"hub:{spec}"
    parts = spec.split(":")
    name = parts[0].strip()
    if len(parts) > 3 or not name or name.count("/") != 1 or not all(p.strip() for p in parts):
        raise UserError("expected hub:OWNER/NAME, hub:OWNER/NAME:SPLIT or hub:OWNER/NAME:CONFIG:SPLIT", where)
    config = parts[1].strip() if len(parts) == 3 else None
    split = parts[-1].strip() if len(parts) >= 2 else "train"

    from .net import hub_reachable, offline_requested

    offline = offline_requested()
    cached = _hub_cached(name)
    if offline and not cached:
        raise UserError(f"dataset {name} is not in the local cache and Hugging Face Hub access is off "
                        "(HF_HUB_OFFLINE); download it while online or use a local file", where)
    if not offline and not hub_reachable():
        hint = " (it is cached: set HF_HUB_OFFLINE=1 to use the cache)" if cached else ""
        raise UserError(f"cannot reach the Hugging Face Hub to fetch dataset {name}{hint}; check the network "
                        "or use a local file", where)
    try:
        import datasets  # lazy: heavy
    except ImportError:
        raise UserError(f"loading hub dataset {name} needs the datasets package", where) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types: missing repo, split, config, network
        raise UserError(f"cannot load dataset {name} (config {config or 'default'}, split {split}): "
                        f"{_first_line(exc)}", where) from None
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    if not rows:
        raise UserError(f"dataset {name} split {split} has no rows", where)
    return _to_items([(f"row {i}", dict(r)) for i, r in enumerate(rows)], where, "auto")


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface"


def _hub_cached(name: str) -> bool:
    owner, repo = name.split("/", 1)
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub")
    ds_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets")
    return (hub.expanduser() / f"datasets--{owner}--{repo}").exists() or \
        (ds_cache.expanduser() / f"{owner}___{repo}").exists()


# --------------------------------------------------------------------------- selection


def select(items: Sequence[QAItem], forget: int | Sequence[str], retain: int | str | Sequence[str],
           where: str = "data") -> tuple[list[QAItem], list[QAItem]]:
    """Split *items* into (forget, retain).

    ``forget``: N >= 1 (the first N items) or a list of ids (kept in the given order).
    ``retain``: N >= 0 (the N items after the forget items when ``forget`` is a
    number; the first N items not forgotten when it is a list), a list of ids, or
    ``"rest"`` (every item not forgotten).  Errors name ``{where}.forget`` or
    ``{where}.retain``.
    """
    fwhere, rwhere = f"{where}.forget", f"{where}.retain"
    by_id = {it.id: it for it in items}
    total = len(items)

    if _is_count(forget):
        n = int(forget)
        if n < 0:
            raise UserError(f"{n} is negative; expected the number of items to forget (>= 1) or a list of ids",
                            fwhere)
        if n == 0:
            raise UserError("the forget set is empty; expected at least 1 item", fwhere)
        if n > total:
            raise UserError(f"asks for {n} items but the data set has only {total}", fwhere)
        forget_items = list(items[:n])
    else:
        ids = _id_list(forget, fwhere, "the number of items to forget or a list of ids")
        if not ids:
            raise UserError("the forget set is empty; expected at least 1 id", fwhere)
        _check_known(ids, by_id, fwhere)
        forget_items = [by_id[i] for i in ids]
    forget_ids = {it.id for it in forget_items}

    if retain is None:
        retain = 0
    if isinstance(retain, str):
        if retain.strip().lower() != "rest":
            raise UserError(f"{retain!r} is not valid; expected a number, a list of ids or \"rest\"", rwhere)
        retain_items = [it for it in items if it.id not in forget_ids]
    elif _is_count(retain):
        n = int(retain)
        if n < 0:
            raise UserError(f"{n} is negative; expected the number of items to retain (>= 0), a list of ids "
                            "or \"rest\"", rwhere)
        if _is_count(forget):
            pool = list(items[len(forget_items):])
            if n > len(pool):
                raise UserError(f"asks for {n} items but only {len(pool)} follow the {len(forget_items)} "
                                f"forget items (the data set has {total})", rwhere)
        else:
            pool = [it for it in items if it.id not in forget_ids]
            if n > len(pool):
                raise UserError(f"asks for {n} items but only {len(pool)} are not in the forget set "
                                f"(the data set has {total})", rwhere)
        retain_items = pool[:n]
    else:
        ids = _id_list(retain, rwhere, "a number, a list of ids or \"rest\"")
        _check_known(ids, by_id, rwhere)
        overlap = [i for i in ids if i in forget_ids]
        if overlap:
            raise UserError(f"ids {_names(overlap)} are in both the forget and the retain set; "
                            "expected disjoint sets", rwhere)
        retain_items = [by_id[i] for i in ids]
    return forget_items, retain_items


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id_list(value: Any, where: str, expected: str) -> list[str]:
    if isinstance(value, (str, bytes, bool, float)) or not isinstance(value, Iterable):
        raise UserError(f"found {_short(value)}; expected {expected}", where)
    ids: list[str] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise UserError(f"id {_short(v)} is not text; expected a list of item ids", where)
        s = str(v).strip()
        if s not in ids:
            ids.append(s)
    return ids


def _check_known(ids: list[str], by_id: dict[str, QAItem], where: str) -> None:
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        sample = ", ".join(list(by_id)[:3]) + (", ..." if len(by_id) > 3 else "")
        raise UserError(f"unknown ids {_names(unknown)}; the data set's ids look like {sample}", where)


def rephrase_split(forget_items: Iterable[QAItem]) -> list[QAItem]:
    """The forget items asked with their paraphrase (same id and answer).

    Items without a paraphrase are left out.  The original question is kept in
    ``extra["original_question"]``.
    """
    out = []
    for it in forget_items:
        if it.paraphrased_question:
            out.append(replace(it, question=it.paraphrased_question, paraphrased_question=None,
                               perturbed_answers=list(it.perturbed_answers),
                               extra={**it.extra, "original_question": it.question}))
    return out


# --------------------------------------------------------------------------- helpers


def _names(names: Iterable[Any]) -> str:
    return ", ".join(str(n) for n in names)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
