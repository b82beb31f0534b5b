"""Sessions: schema, validation messages, comment-preserving atomic save."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from unlearn_tui import sessions
from unlearn_tui.backends import methods
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.params import param
from unlearn_tui.sessions import (DataConfig, EvalConfig, ModelConfig, Paraphrase, RunConfig, Session,
                      TargetItem, TargetsConfig)
from unlearn_tui.sessions import paths as session_paths

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
version = 1
[model]
name = "smollm2-135m-instruct"     # built-in name, hub id, local dir or .gguf
[data]
path = "facts.jsonl"               # or "builtin:world-facts"
forget = 10                        # first N items, or a list of ids
retain = 10                        # the next N items, a list of ids, or "rest"
[targets]
mode = "idk"
merge_factor = 1
[[runs]]
method = "none"
[runs.params]
"""

FULL = """\
# my experiment
version = 1

[model]
name = "HuggingFaceTB/SmolLM2-135M-Instruct"
device = "cuda:1"
dtype = "bfloat16"
trust_remote_code = true
revision = "main"

[data]
path = "facts.jsonl"
format = "jsonl"
forget = ["wf-001", "wf-002"]
retain = "rest"
rephrase = false

[data.subjects]
wf-001 = "France"
"wf 002" = "Mount Everest"

[[data.paraphrases]]
id = "wf-001"
question = "Which city is France's capital?"
source = "generated"

[targets]
mode = "custom"
merge_factor = 2
seed = 7
pool = "pool.txt"
dummy = "No idea."

[[targets.items]]
id = "wf-001"
target = "I'm not sure about the capital of France."
source = "custom"
leak = false
mentions_subject = true

[[targets.items]]
id = "wf-002"
target = "I can't say."
source = "pool"

[eval]
max_new_tokens = 64
batch_size = 8
top_k = 50

[[runs]]
method = "none"
label = "baseline"

[[runs]]
method = "_test_method"
[runs.params]
steps = 3
lr = 0.5
"""


@dataclass
class _TestParams:
    steps: int = param(5, "optimisation steps", min=1, max=100)
    lr: float = param(0.1, "learning rate", min=0.0)
    mode: str = param("fast", "how", choices=("fast", "slow"))


class _TestMethod:
    name = "_test_method"
    Params = _TestParams
    summary = "a method that exists only in tests"
    needs_retain = False

    def __init__(self, params: _TestParams) -> None:
        self.params = params


@pytest.fixture(autouse=True)
def _test_method(monkeypatch):
    """Register ``_test_method`` for the duration of each test only."""
    monkeypatch.setitem(methods._MODULES, "_test_method", __name__)
    monkeypatch.setitem(methods._REGISTRY, "_test_method", _TestMethod)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "facts.jsonl").write_text(
        "".join(f'{{"id": "wf-{i:03d}", "question": "q{i}?", "answer": "a{i}"}}\n'
                for i in range(1, 31)))
    (tmp_path / "pool.txt").write_text("I don't know.\nNo idea.\n")
    return tmp_path


def write(folder: Path, text: str, name: str = "session.toml") -> Path:
    p = folder / name
    p.write_text(text)
    return p


def error_of(folder: Path, text: str) -> tuple[str, Path]:
    p = write(folder, text)
    with pytest.raises(UserError) as info:
        sessions.load(p)
    msg = str(info.value)
    assert "\n" not in msg
    return msg, p


# ------------------------------------------------------------------- loading
def test_minimal_session_from_brief_loads(folder):
    p = write(folder, MINIMAL)
    s = sessions.load(p)
    assert s.version == sessions.SCHEMA_VERSION == 1
    assert s.model == ModelConfig("smollm2-135m-instruct", "auto", "auto", False, None)
    assert s.data.path == "facts.jsonl" and s.data.forget == 10 and s.data.retain == 10
    assert s.data.rephrase is True and s.data.subjects == {} and s.data.paraphrases == []
    assert s.targets.mode == "idk" and s.targets.merge_factor == 1 and s.targets.items == []
    assert s.eval == EvalConfig(32, 16, 100)
    assert s.runs == [RunConfig("none", {}, None)]
    assert s.path == p and s.base_dir() == folder
    assert s.resolve(s.data.path) == folder / "facts.jsonl"
    assert s.resolve("/abs/x.jsonl") == Path("/abs/x.jsonl")


def test_only_version_gives_defaults(tmp_path):
    s = sessions.loads("version = 1\n")
    assert s.model.name == "smollm2-135m-instruct"
    assert s.data.path == "builtin:world-facts"
    assert s.targets == TargetsConfig("idk", 1, 0, None, "I have no information about that.", [])
    assert s.runs == [RunConfig("none", {}, None)]
    assert s.path is None
    assert s == sessions.new_session()


def test_full_schema_loads(folder):
    s = sessions.load(write(folder, FULL))
    assert s.model == ModelConfig("HuggingFaceTB/SmolLM2-135M-Instruct", "cuda:1", "bfloat16", True,
                                  "main")
    assert s.data == DataConfig("facts.jsonl", "jsonl", ["wf-001", "wf-002"], "rest", False,
                                {"wf-001": "France", "wf 002": "Mount Everest"},
                                [Paraphrase("wf-001", "Which city is France's capital?", "generated")])
    assert s.targets.pool == "pool.txt" and s.targets.seed == 7 and s.targets.dummy == "No idea."
    assert s.targets.items == [
        TargetItem("wf-001", "I'm not sure about the capital of France.", "custom", False, True),
        TargetItem("wf-002", "I can't say.", "pool"),
    ]
    assert s.target_for("wf-002").source == "pool" and s.target_for("nope") is None
    assert s.eval == EvalConfig(64, 8, 50)
    assert s.runs == [RunConfig("none", {}, "baseline"),
                      RunConfig("_test_method", {"steps": 3, "lr": 0.5}, None)]


def test_builtin_and_hub_paths_are_not_checked_on_disk(tmp_path):
    for path in ("builtin:world-facts", "hub:locuslab/TOFU", "hub:locuslab/TOFU:forget10",
                 "hub:locuslab/TOFU:forget10:train"):
        s = sessions.loads(f'version = 1\n[data]\npath = "{path}"\n', tmp_path / "s.toml")
        assert s.data.path == path


def test_builtin_refusal_pool_is_not_a_file(tmp_path):
    s = sessions.loads('version = 1\n[targets]\npool = "builtin:refusals"\n', tmp_path / "s.toml")
    assert s.targets.pool == "builtin:refusals"


def test_unknown_builtin_data_set(tmp_path, monkeypatch):
    import unlearn_tui.sessions.loader
    from unlearn_tui import sessions
    # the list comes from backends.data.builtin_names(); pinned here
    monkeypatch.setattr(sessions.loader, "_builtin_names", lambda: ["world-facts", "tiny"])
    sessions.loads('version = 1\n[data]\npath = "builtin:world-facts"\n')
    with pytest.raises(UserError) as info:
        sessions.loads('version = 1\n[data]\npath = "builtin:world-fact"\n', tmp_path / "s.toml")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 's.toml'}:3: data.path:")
    assert '"builtin:world-fact"' in msg and 'did you mean "builtin:world-facts"' in msg


def test_relative_paths_without_a_file_resolve_against_cwd(folder, monkeypatch):
    monkeypatch.chdir(folder)
    s = sessions.loads('version = 1\n[data]\npath = "facts.jsonl"\n')
    assert s.resolve(s.data.path) == folder / "facts.jsonl"


def test_method_names_are_case_insensitive(tmp_path):
    s = sessions.loads('version = 1\n[[runs]]\nmethod = "NONE"\n')
    assert s.runs[0].method == "none"


def test_multiline_values_do_not_confuse_line_numbers(folder):
    text = ('version = 1\n[data]\npath = "facts.jsonl"\nforget = [\n  "wf-001",\n'
            '  "wf-002",\n]\n[targets]\ndummy = """\nmode = 1\n[model]\n"""\n'
            'merge_factor = 0\n')
    msg, p = error_of(folder, text)
    assert msg.startswith(f"{p}:13: targets.merge_factor:"), msg


# -------------------------------------------------------------------- errors
BASE = 'version = 1\n[data]\npath = "facts.jsonl"\n'

ERRORS = [
    # (id, text, line or None, substrings that must appear)
    ("toml-syntax", 'version = 1\n[model\nname = "x"\n', 2, ["invalid TOML", "column"]),
    ("toml-duplicate", 'version = 1\nversion = 1\n', 2, ["invalid TOML"]),
    ("version-missing", '[model]\nname = "x"\n', None, ['missing key "version"', "supported versions: 1"]),
    ("version-unsupported", "version = 2\n", 1, ["version", "2", "supported versions: 1"]),
    ("version-string", 'version = "1"\n', 1, ['"1"', "supported versions: 1"]),
    ("unknown-top-key", 'version = 1\n[modle]\nname = "x"\n', 2,
     ['unknown key "modle"', 'did you mean "model"']),
    ("section-not-table", 'version = 1\nmodel = "gpt2"\n', 2, ["model: expected a table", '"gpt2"']),
    ("model-misspelled", 'version = 1\n[model]\nname = "x"\ndevcie = "cpu"\n', 4,
     ["model:", 'unknown key "devcie"', 'did you mean "device"']),
    ("model-name-type", 'version = 1\n[model]\nname = 3\n', 3, ["model.name", "3"]),
    ("model-device", 'version = 1\n[model]\ndevice = "gpu"\n', 3,
     ["model.device", '"gpu"', "auto, cpu, mps, cuda or cuda:N"]),
    ("model-device-index", 'version = 1\n[model]\ndevice = "cuda:x"\n', 3, ["model.device", '"cuda:x"']),
    ("model-dtype", 'version = 1\n[model]\ndtype = "fp16"\n', 3,
     ["model.dtype", '"fp16"', "float16"]),
    ("model-trust-type", 'version = 1\n[model]\ntrust_remote_code = "yes"\n', 3,
     ["model.trust_remote_code", '"yes"', "true or false"]),
    ("data-missing-file", 'version = 1\n[data]\npath = "missing.jsonl"\n', 3,
     ["data.path", '"missing.jsonl"', "not found", "missing.jsonl"]),
    ("data-builtin-empty", 'version = 1\n[data]\npath = "builtin:"\n', 3, ["data.path", "builtin:NAME"]),
    ("data-hub-bad", 'version = 1\n[data]\npath = "hub:tofu"\n', 3,
     ["data.path", '"hub:tofu"', "hub:OWNER/NAME"]),
    ("data-format", BASE + 'format = "xml"\n', 4, ["data.format", '"xml"', "jsonl"]),
    ("forget-negative", BASE + "forget = -3\n", 4, ["data.forget", "-3", ">= 1"]),
    ("forget-zero", BASE + "forget = 0\n", 4, ["data.forget", "0", ">= 1"]),
    ("forget-empty", BASE + "forget = []\n", 4, ["data.forget", "[]", "non-empty"]),
    ("forget-int-ids", BASE + "forget = [1, 2]\n", 4, ["data.forget", "1", "strings"]),
    ("forget-float", BASE + "forget = 2.5\n", 4, ["data.forget", "2.5"]),
    ("forget-dup", BASE + 'forget = ["a", "a"]\n', 4, ["data.forget", '"a"', "twice"]),
    ("retain-string", BASE + 'retain = "all"\n', 4, ["data.retain", '"all"', '"rest"']),
    ("retain-negative", BASE + "retain = -1\n", 4, ["data.retain", "-1", ">= 0"]),
    ("retain-empty", BASE + "retain = []\n", 4, ["data.retain", "[]", "retain = 0"]),
    ("retain-overlap", BASE + 'forget = ["a", "b"]\nretain = ["b", "c"]\n', 5,
     ["data.retain", '"b"', "both forget and retain"]),
    ("rephrase-type", BASE + "rephrase = 1\n", 4, ["data.rephrase", "1", "true or false"]),
    ("subjects-type", BASE + "[data.subjects]\nwf-001 = 3\n", 5, ['data.subjects.wf-001', "3"]),
    ("paraphrase-missing-question", BASE + '[[data.paraphrases]]\nid = "wf-001"\n', 4,
     ["data.paraphrases[0]", 'missing key "question"']),
    ("paraphrase-empty-question", BASE + '[[data.paraphrases]]\nid = "wf-001"\nquestion = ""\n', 6,
     ["data.paraphrases[0].question", '""', "non-empty"]),
    ("targets-mode", 'version = 1\n[targets]\nmode = "refuse"\n', 3,
     ["targets.mode", '"refuse"', "idk"]),
    ("merge-factor-zero", 'version = 1\n[targets]\nmerge_factor = 0\n', 3,
     ["targets.merge_factor", "0", ">= 1"]),
    ("merge-factor-type", 'version = 1\n[targets]\nmerge_factor = "2"\n', 3,
     ["targets.merge_factor", '"2"', "integer"]),
    ("seed-negative", 'version = 1\n[targets]\nseed = -1\n', 3, ["targets.seed", "-1"]),
    ("pool-missing", 'version = 1\n[targets]\npool = "nopool.txt"\n', 3,
     ["targets.pool", '"nopool.txt"', "not found"]),
    ("item-dup", 'version = 1\n[targets]\n[[targets.items]]\nid = "a"\ntarget = "x"\n'
     '[[targets.items]]\nid = "a"\ntarget = "y"\n', 7,
     ["targets.items[1].id", 'duplicate target id "a"', "targets.items[0]"]),
    ("item-source", 'version = 1\n[[targets.items]]\nid = "a"\ntarget = "x"\nsource = "magic"\n', 5,
     ["targets.items[0].source", '"magic"', "custom"]),
    ("item-empty-target", 'version = 1\n[[targets.items]]\nid = "a"\ntarget = ""\n', 4,
     ["targets.items[0].target", '""']),
    ("item-misspelled", 'version = 1\n[[targets.items]]\nid = "a"\ntraget = "x"\n', 4,
     ['unknown key "traget"', 'did you mean "target"']),
    ("eval-top-k", 'version = 1\n[eval]\ntop_k = 0\n', 3, ["eval.top_k", "0", "between 1 and 100000"]),
    ("eval-batch", 'version = 1\n[eval]\nbatch_size = 5000\n', 3,
     ["eval.batch_size", "5000", "between 1 and 1024"]),
    ("eval-tokens-type", 'version = 1\n[eval]\nmax_new_tokens = 1.5\n', 3,
     ["eval.max_new_tokens", "1.5"]),
    ("runs-not-array", 'version = 1\nruns = "none"\n', 2, ["runs", '"none"', "[[runs]]"]),
    ("runs-not-tables", 'version = 1\nruns = [1, 2]\n', 2, ["runs", "[[runs]]"]),
    ("run-missing-method", 'version = 1\n[[runs]]\nlabel = "x"\n', 2, ["runs[0]", 'missing key "method"']),
    ("run-misspelled", 'version = 1\n[[runs]]\nmethd = "none"\n', 3,
     ['unknown key "methd"', 'did you mean "method"']),
    ("run-unknown-method", 'version = 1\n[[runs]]\nmethod = "none"\n[[runs]]\nmethod = "rome9"\n', 5,
     ["runs[1].method", '"rome9"', "none", "ike"]),
    ("run-params-type", 'version = 1\n[[runs]]\nmethod = "none"\nparams = 3\n', 4,
     ["runs[0].params", "3"]),
    ("run-param-range", 'version = 1\n[[runs]]\nmethod = "_test_method"\n[runs.params]\nsteps = 0\n', 5,
     ["runs[0].params.steps", "0", ">= 1"]),
    ("run-param-type", 'version = 1\n[[runs]]\nmethod = "_test_method"\n[runs.params]\n'
     'lr = "fast"\n', 5, ["runs[0].params.lr", "fast", "number"]),
    ("run-param-choice", 'version = 1\n[[runs]]\nmethod = "_test_method"\n[runs.params]\n'
     'mode = "medium"\n', 5, ["runs[0].params.mode", "medium", "fast"]),
    ("run-param-unknown", 'version = 1\n[[runs]]\nmethod = "_test_method"\n[runs.params]\n'
     "stpes = 3\n", 5, ['unknown key "stpes"', 'did you mean "steps"']),
    ("run-param-unknown-inline", 'version = 1\n[[runs]]\nmethod = "_test_method"\n'
     "params = {stpes = 3}\n", 4, ['unknown key "stpes"']),
    ("run-param-second-run", 'version = 1\n[[runs]]\nmethod = "_test_method"\n[runs.params]\n'
     'steps = 1\n[[runs]]\nmethod = "_test_method"\n[runs.params]\nsteps = 0\n', 9,
     ["runs[1].params.steps", "0"]),
    ("run-label-type", 'version = 1\n[[runs]]\nmethod = "none"\nlabel = 5\n', 4, ["runs[0].label", "5"]),
]


@pytest.mark.parametrize("text,line,needles", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validation_errors(folder, text, line, needles):
    msg, p = error_of(folder, text)
    prefix = f"{p}:{line}: " if line is not None else f"{p}: "
    assert msg.startswith(prefix), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_missing_data_file_names_the_resolved_path(folder):
    sub = folder / "sub"
    sub.mkdir()
    msg, _ = error_of(sub, 'version = 1\n[data]\npath = "../nope/facts.jsonl"\n')
    assert str(sub / "../nope/facts.jsonl") in msg


def test_loads_without_path_names_the_session(tmp_path):
    with pytest.raises(UserError) as info:
        sessions.loads("version = 3\n")
    assert str(info.value).startswith("<session>:1: version: unsupported")


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="session file not found"):
        sessions.load(tmp_path / "nope.toml")


# ----------------------------------------------------------------- round trip
def test_round_trip_is_identical(folder):
    s = sessions.load(write(folder, FULL))
    out = sessions.save(s, folder / "copy.toml")
    assert out == folder / "copy.toml" and s.path == out
    assert sessions.load(out) == s


def test_new_session_round_trip(folder):
    s = sessions.new_session(model={"name": "gpt2", "device": "cpu"},
                             runs=[RunConfig("none"), {"method": "_test_method",
                                                       "params": {"steps": 2}, "label": "t"}])
    s.set_target("wf-001", 'Line one\nand "quotes"', source="generated", leak=True)
    s.data.subjects["wf-001"] = "France"
    s.data.paraphrases.append(Paraphrase("wf-001", "Capital of France?"))
    text = sessions.dumps(s)
    assert "# built-in name, hub id" in text  # fresh files are commented
    p = sessions.save(s, folder / "new.toml")
    assert sessions.load(p) == s
    assert sessions.loads(text) == s


def test_empty_runs_round_trip(folder):
    s = sessions.load(write(folder, MINIMAL))
    s.runs.clear()
    sessions.save(s)
    assert sessions.load(s.path).runs == []


def test_unchanged_save_is_byte_identical(folder):
    p = write(folder, FULL)
    s = sessions.load(p)
    assert sessions.dumps(s) == FULL
    sessions.save(s)
    assert p.read_text() == FULL


def test_comments_and_order_survive_edits(folder):
    p = write(folder, MINIMAL)
    s = sessions.load(p)
    s.targets.merge_factor = 4
    s.model.device = "cpu"
    s.set_target("wf-003", "I'm not sure.", source="pool", mentions_subject=False)
    s.data.subjects["wf-003"] = "Canberra"
    s.runs.append(RunConfig("_test_method", {"steps": 7}, "seven"))
    s.eval.top_k = 10
    sessions.save(s)
    text = p.read_text()
    for comment in ("# built-in name, hub id, local dir or .gguf", '# or "builtin:world-facts"',
                    "# first N items, or a list of ids", '# the next N items, a list of ids, or "rest"'):
        assert comment in text
    # the user's lines that did not change are still there verbatim, in order
    kept = [line for line in MINIMAL.splitlines() if "merge_factor" not in line]
    positions = [text.index(line) for line in kept]
    assert positions == sorted(positions)
    assert "merge_factor = 4" in text
    t = sessions.load(p)
    assert t == s
    assert t.targets.merge_factor == 4 and t.model.device == "cpu" and t.eval.top_k == 10
    assert t.target_for("wf-003") == TargetItem("wf-003", "I'm not sure.", "pool", None, False)
    assert t.runs[-1] == RunConfig("_test_method", {"steps": 7}, "seven")

    # a second round: replace, remove and shrink, still keeping comments
    t.set_target("wf-003", "No idea.")
    t.runs.pop(0)
    t.data.subjects.clear()
    t.runs[0].params["steps"] = 9
    sessions.save(t)
    text = p.read_text()
    assert "# first N items, or a list of ids" in text and "Canberra" not in text
    u = sessions.load(p)
    assert u == t
    assert u.runs == [RunConfig("_test_method", {"steps": 9}, "seven")]
    assert u.target_for("wf-003") == TargetItem("wf-003", "No idea.")


def test_other_toml_styles_are_kept(folder):
    text = ('# inline and dotted styles\r\nversion = 1\r\nmodel.name = "gpt2"  # dotted\r\n'
            'targets = {mode = "idk", merge_factor = 2}  # inline\r\n'
            'runs = [{method = "none"}]  # inline runs\r\n')
    p = folder / "styles.toml"
    p.write_bytes(text.encode())
    s = sessions.load(p)
    s.model.device = "cpu"
    s.targets.merge_factor = 3
    s.set_target("wf-001", "No idea.")
    s.runs.append(RunConfig("_test_method", {"steps": 2}))
    sessions.save(s)
    raw = p.read_bytes().decode()
    assert "# dotted" in raw and "# inline runs" in raw and "# inline and dotted styles" in raw
    assert "\n" not in raw.replace("\r\n", "")  # Windows line endings kept
    assert sessions.load(p) == s
    s.targets.seed = 4  # ...and still kept on the next save
    sessions.save(s)
    raw = p.read_bytes().decode()
    assert "\n" not in raw.replace("\r\n", "") and "seed = 4" in raw


def test_params_are_written_as_toml_holds_them(folder):
    s = sessions.new_session(runs=[RunConfig("_test_method", {"steps": 3, "lr": None, "x": (1, 2)})])
    text = sessions.dumps(s)
    assert 'lr = "auto"' in text and "x = [1, 2]" in text


def test_a_bad_in_place_edit_falls_back_to_a_fresh_file(folder, monkeypatch):
    import unlearn_tui.sessions.writer as writer

    p = write(folder, MINIMAL)
    s = sessions.load(p)
    s.targets.merge_factor = 6
    monkeypatch.setattr(writer, "_sync", lambda tbl, old, new: None)  # a buggy edit
    sessions.save(s)
    assert sessions.load(p) == s and sessions.load(p).targets.merge_factor == 6


def test_set_target_replaces_in_place(tmp_path):
    s = sessions.new_session()
    s.set_target("a", "one")
    s.set_target("b", "two")
    s.set_target("a", "uno", source="regenerated", leak=True)
    assert [t.id for t in s.targets.items] == ["a", "b"]
    assert s.target_for("a") == TargetItem("a", "uno", "regenerated", True, None)
    with pytest.raises(UserError):
        s.set_target("a", "   ")
    with pytest.raises(UserError):
        s.set_target("a", "x", source="bogus")


def test_save_elsewhere_rebases_relative_paths(folder):
    s = sessions.load(write(folder, FULL))
    other = folder / "elsewhere" / "deep"
    other.mkdir(parents=True)
    out = sessions.save(s, other / "s.toml")
    assert s.data.path == "../../facts.jsonl" and s.targets.pool == "../../pool.txt"
    t = sessions.load(out)
    assert t.resolve(t.data.path).resolve() == (folder / "facts.jsonl").resolve()


def test_save_needs_a_path_for_new_sessions():
    with pytest.raises(UserError, match="give a path"):
        sessions.save(sessions.new_session())


def test_validate_checks_in_memory_edits(folder):
    s = sessions.load(write(folder, MINIMAL))
    sessions.validate(s)
    s.targets.merge_factor = 0
    with pytest.raises(UserError, match=r"targets\.merge_factor: expected an integer >= 1, got 0"):
        sessions.validate(s)


# --------------------------------------------------------------- atomic save
def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_failed_replace_leaves_original_and_no_temp_file(folder, monkeypatch):
    p = write(folder, MINIMAL)
    before = _listing(folder)
    s = sessions.load(p)
    s.targets.merge_factor = 5

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match="No space left on device"):
        sessions.save(s)
    assert p.read_text() == MINIMAL
    assert _listing(folder) == before
    monkeypatch.undo()
    # the session still saves fine afterwards
    sessions.save(s)
    assert sessions.load(p).targets.merge_factor == 5


def test_failed_write_leaves_original_and_no_temp_file(folder, monkeypatch):
    p = write(folder, MINIMAL)
    before = _listing(folder)
    s = sessions.load(p)
    s.model.name = "gpt2"

    def boom(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(UserError, match="Input/output error"):
        sessions.save(s)
    assert p.read_text() == MINIMAL
    assert _listing(folder) == before


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sessions.save(sessions.new_session(), tmp_path / "no" / "s.toml")


def test_save_keeps_file_mode(folder):
    p = write(folder, MINIMAL)
    os.chmod(p, 0o600)
    s = sessions.load(p)
    s.targets.seed = 3
    sessions.save(s)
    assert (os.stat(p).st_mode & 0o777) == 0o600


# ---------------------------------------------------------------------- misc
def test_import_is_light():
    code = ("import unlearn_tui.sessions, unlearn_tui.sessions.paths, sys; "
            "assert 'torch' not in sys.modules and 'textual' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('torch', 'textual'))]")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_loading_a_session_stays_light(folder):
    p = write(folder, MINIMAL)
    code = textwrap.dedent(f"""
        import sys, sessions
        s = sessions.load({str(p)!r})
        sessions.save(s)
        assert 'torch' not in sys.modules and 'textual' not in sys.modules
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_paths_env_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_TUI_CONFIG_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("UNLEARN_TUI_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "k"))
    assert session_paths.config_dir() == tmp_path / "c"
    assert session_paths.data_dir() == tmp_path / "d"
    assert session_paths.cache_dir(create=True) == tmp_path / "k"
    assert (tmp_path / "k").is_dir() and not (tmp_path / "c").exists()
    assert session_paths.autosave_path() == tmp_path / "d" / "autosave.session.json"   # one file, not a pair
    assert session_paths.legacy_autosave_paths() == (tmp_path / "d" / "autosave.toml",
                                                     tmp_path / "d" / "autosave.json")


def test_paths_default_to_platformdirs(monkeypatch):
    for var in ("UNLEARN_TUI_CONFIG_DIR", "UNLEARN_TUI_DATA_DIR", "UNLEARN_TUI_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    for d in (session_paths.config_dir(), session_paths.data_dir(), session_paths.cache_dir()):
        assert "unlearn-tui" in str(d)


def test_session_dataclass_api():
    s = sessions.new_session(path="x/s.toml")
    assert isinstance(s, Session) and s.path.is_absolute()
    assert s.base_dir() == s.path.parent
    with pytest.raises(TypeError):
        sessions.new_session(bogus=1)


def test_asdict_has_no_private_state(folder):
    import dataclasses
    import json

    s = sessions.load(write(folder, FULL))
    d = dataclasses.asdict(s)
    assert "_doc" not in d and "_baseline" not in d
    json.dumps(sessions.to_plain(s))


def test_a_left_out_paraphrase_record_has_an_empty_question():
    """``source = "left-out"``: every model-written try failed the checks; the record keeps the item from
    being tried again, so its question may be empty (any other source needs the paraphrase)."""
    s = sessions.loads('version = 1\n[[data.paraphrases]]\nid = "wf-001"\nquestion = ""\nsource = "left-out"\n')
    (p,) = s.data.paraphrases
    assert (p.id, p.question, p.source) == ("wf-001", "", "left-out")
    assert sessions.loads(sessions.dumps(s)).data.paraphrases == s.data.paraphrases
