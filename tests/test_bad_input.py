"""Bad input never gives a traceback (issue 12): one line naming the file/key/value, exit 2,
nothing half-written, nothing lost.

Most cases call ``tui.cli.main`` in-process (a tiny random llama, the built-in data set):
an exception escaping it fails the test, so "no traceback" is checked too.  Cases that
could block forever (FIFOs) run in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from unlearn_tui import sessions
from unlearn_tui.backends.errors import UserError
from unlearn_tui.tui import cli

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
version = 1
[model]
name = "tiny:llama"
[data]
path = "builtin:world-facts"
forget = 2
retain = 2
[eval]
max_new_tokens = 4
batch_size = 4
[[runs]]
method = "none"
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def with_run(method: str, params: str) -> str:
    return BASE + f'[[runs]]\nmethod = "{method}"\n[runs.params]\n{params}\n'


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def replay(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["replay", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str, *needles: str, only: bool = True) -> str:
    """The one error line; ``only``: stderr holds nothing else (load-time errors) but progress lines."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("unlearn-tui: progress: ")]
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("unlearn-tui: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    if only:
        assert len(lines) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    try:
        return subprocess.run([sys.executable, "-m", "unlearn_tui.tui.cli", *args], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"unlearn-tui {' '.join(args)} did not finish within {timeout} s (it blocks)")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model."""
    import unlearn_tui.backends.model
    from unlearn_tui import backends
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(backends.model, "load", refuse)


# ----------------------------------------------------------------- 1. results are never lost
def _facts_without_paraphrases(tmp_path: Path) -> None:
    facts = [("What is the capital of France?", "Paris"), ("Who wrote the play Hamlet?", "William Shakespeare"),
             ("What is the largest planet?", "Jupiter"), ("How many days are in a week?", "seven")]
    with (tmp_path / "facts.jsonl").open("w") as f:
        for i, (q, a) in enumerate(facts):
            f.write(json.dumps({"id": f"f{i}", "question": q, "answer": a}) + "\n")


def test_results_are_written_when_the_session_write_back_fails(tmp_path, capsys, monkeypatch):
    # the model writes paraphrases; while the run goes on the user edits the session file
    # (here: into something that no longer loads), so caching them back fails
    _facts_without_paraphrases(tmp_path)
    from unlearn_tui.backends import selfimprove

    # the tiny random model's own paraphrases fail the checks; a stand-in writes ones that are stored
    monkeypatch.setattr(selfimprove, "generate_paraphrases", lambda h, todo, *a, **k: {
        t.id: (f"Which answer fits this one: {t.question}", "generated", None) for t in todo})
    s = write(tmp_path, BASE.replace("builtin:world-facts", "facts.jsonl"))
    import unlearn_tui.tui.replay_view
    from unlearn_tui import tui
    real = tui.replay_view.run_with_progress

    def run_then_edit(*a, **k):
        result = real(*a, **k)
        s.write_text("version = 1\n[model\n")  # edited meanwhile
        return result

    monkeypatch.setattr(tui.replay_view, "run_with_progress", run_then_edit)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out), "--quiet", "--save")
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["runs"]] == ["none"] and data["paraphrases"]
    warnings = [ln for ln in err.splitlines() if ln.startswith("unlearn-tui: warning:")]
    assert len(warnings) == 1 and "could not cache" in warnings[0] and str(out) in warnings[0], err
    assert "Traceback" not in err and "error:" not in err
    assert s.read_text() == "version = 1\n[model\n"  # the user's edit is kept


# ----------------------------------------------------------------- 2. non-finite numbers
@pytest.mark.parametrize("method,params,key", [
    ("wise", "mask_ratio = nan", "mask_ratio"),
    ("wise", "alpha = inf", "alpha"),
    ("rome", "v_lr = -inf", "v_lr"),
    ("grace", "eps = nan", "eps"),
    ("npo", "lr = 1e999", "lr"),               # TOML reads it as inf
    ("wise", "act_margin = [0.1, nan, 0.3]", "act_margin"),
])
def test_non_finite_hyper_parameters_are_refused_at_load(tmp_path, method, params, key):
    text = with_run(method, params)
    with pytest.raises(UserError) as e:
        sessions.loads(text, tmp_path / "s.toml")
    assert e.value.where == f"{tmp_path / 's.toml'}:{line_of(text, params)}"
    assert f"runs[1].params.{key}" in e.value.message and "finite" in e.value.message


def test_non_finite_hyper_parameter_in_replay_is_one_line_and_writes_nothing(tmp_path, capsys, no_model_load):
    s = write(tmp_path, with_run("wise", "mask_ratio = nan"))
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out))
    assert rc == 2
    error_line(err, f"s.toml:{line_of(s.read_text(), 'mask_ratio')}", "runs[1].params.mask_ratio", "nan")
    assert not out.exists()


@pytest.mark.parametrize("method,params,key,shown", [
    ("wise", 'act_margin = ["a", "b", "c"]', "act_margin", "'a'"),
    ("wise", "act_margin = [[1], 2, 3]", "act_margin", "[1]"),
    ("wise", "act_margin = [-1, 2, 3]", "act_margin", "-1"),
    ("memit", 'layers = ["x"]', "layers", "'x'"),
    ("alphaedit", "layers = [1, 2.5]", "layers", "2.5"),
    ("ga", "layers = [true]", "layers", "True"),
    ("ga", "max_steps = 99999999999999999999", "max_steps", "99999999999999999999"),
])
def test_list_elements_and_integer_range_are_checked_at_load(tmp_path, method, params, key, shown):
    text = with_run(method, params)
    with pytest.raises(UserError) as e:
        sessions.loads(text, tmp_path / "s.toml")
    assert e.value.where.endswith(f"s.toml:{line_of(text, params)}")
    assert f"runs[1].params.{key}" in e.value.message and shown in e.value.message


def test_good_lists_still_load(tmp_path):
    s = sessions.loads(with_run("wise", "act_margin = [0.1, 0.2, 0.3]") +
                       '[[runs]]\nmethod = "ga"\n[runs.params]\nlayers = [-1, 2]\n', tmp_path / "s.toml")
    from unlearn_tui.backends import methods

    assert methods.make("wise", s.runs[1].params).params.act_margin == [0.1, 0.2, 0.3]
    assert methods.make("ga", s.runs[2].params).params.layers == [-1, 2]


def test_a_field_can_opt_in_to_non_finite_numbers():
    from unlearn_tui.backends.params import param, parse_params

    @dataclass
    class P:
        bound: float = param(1.0, "may be infinite", min=0.0, finite=False)
        strict: float = param(1.0, "finite only", min=0.0)

    assert parse_params(P, {"bound": math.inf}).bound == math.inf
    with pytest.raises(UserError, match="finite"):
        parse_params(P, {"strict": math.inf}, where="runs[0].params")
    assert math.isnan(parse_params(P, {"bound": math.nan}).bound)
    with pytest.raises(UserError) as e:  # the bounds still hold
        parse_params(P, {"bound": -math.inf})
    assert e.value.where == "params.bound" and ">= 0.0" in e.value.message


@pytest.mark.parametrize("old,new,key", [
    ("batch_size = 4", "batch_size = nan", "eval.batch_size"),
    ("max_new_tokens = 4", "max_new_tokens = inf", "eval.max_new_tokens"),
    ("forget = 2", "forget = nan", "data.forget"),
    ("retain = 2", "retain = -inf", "data.retain"),
    ("[eval]", "[targets]\nmerge_factor = inf\n[eval]", "targets.merge_factor"),
    ("[eval]", "[targets]\nseed = nan\n[eval]", "targets.seed"),
])
def test_non_finite_session_numbers_are_refused(tmp_path, old, new, key):
    # (these were already refused: every numeric session key is an integer)
    text = BASE.replace(old, new)
    with pytest.raises(UserError) as e:
        sessions.loads(text, tmp_path / "s.toml")
    assert key in e.value.message and e.value.where.endswith(f":{line_of(text, key.split('.')[-1] + ' =')}")


def test_results_json_is_strict_and_non_finite_scores_become_null():
    text, nulls = cli.results_json({"a": 1.5, "b": [1, float("nan")], "c": {"d": float("-inf"), "e": "x"}})
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert strict == {"a": 1.5, "b": [1, None], "c": {"d": None, "e": "x"}}
    assert nulls == ["b[1]", "c.d"]
    finite = {"x": [0.25, 2, True, None, "t"], "y": {"z": 1e-9}}
    assert cli.results_json(finite) == (json.dumps(finite, indent=2), [])  # numbers stay numbers


def test_replay_writes_non_finite_scores_as_null_with_a_warning(tmp_path, capsys, monkeypatch):
    from unlearn_tui.backends.runner import SessionResult

    real = SessionResult.to_json

    def with_nan(self, items=False):
        out = real(self, items)
        out["baseline"]["forget"]["probability"] = float("nan")
        return out

    monkeypatch.setattr(SessionResult, "to_json", with_nan)
    s = write(tmp_path, BASE)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out), "--quiet", "--no-save")
    assert rc == 0, err
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["baseline"]["forget"]["probability"] is None
    assert data["baseline"]["forget"]["rouge1"] is not None
    warnings = [ln for ln in err.splitlines() if ln.startswith("unlearn-tui: warning:")]
    assert len(warnings) == 1 and "baseline.forget.probability" in warnings[0], err


# ----------------------------------------------------------------- 3. tracebacks
def test_data_file_nested_100000_levels(tmp_path, capsys, no_model_load):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    s = write(tmp_path, BASE.replace("builtin:world-facts", "deep.json"))
    from unlearn_tui.backends import data

    with pytest.raises(UserError) as e:
        data.load_items("deep.json", base_dir=tmp_path)
    assert "deep.json" in e.value.where and "nested too deeply" in e.value.message
    # the same through the CLI (the model is loaded only after the data: patch it away)
    rc, _, err = replay(capsys, str(s), "--out", str(tmp_path / "r.json"))
    assert rc == 2
    error_line(err, "deep.json", "nested")
    assert not (tmp_path / "r.json").exists()


def test_data_records_nested_too_deep_for_the_walkers(tmp_path):
    from unlearn_tui.backends import data

    (tmp_path / "d.json").write_text('[{"question": "q?", "answer": "a", "x": ' + "[" * 500 + "]" * 500 + "}]")
    with pytest.raises(UserError) as e:
        data.load_items(tmp_path / "d.json")
    assert "record 0" in e.value.message and "nested" in e.value.message
    # a CSV cell that looks like a deep JSON array is read as text (no RecursionError)
    (tmp_path / "d.csv").write_text('question,answer,perturbed_answer\nq?,a,"' + "[" * 5000 + "]" * 5000 + '"\n')
    items = data.load_items(tmp_path / "d.csv")
    assert items[0].answer == "a"


def test_data_file_with_an_integer_too_long_to_read(tmp_path):
    from unlearn_tui.backends import data

    (tmp_path / "d.json").write_text('[{"question": "q?", "answer": ' + "9" * 5000 + "}]")
    with pytest.raises(UserError) as e:
        data.load_items(tmp_path / "d.json")
    assert "d.json" in e.value.where


@pytest.mark.parametrize("text,needle", [
    (BASE + "x = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    (BASE.replace("forget = 2", "forget = " + "9" * 5000), "digits"),
    (BASE.replace("builtin:world-facts", "fa\\u0000cts.jsonl"), "NUL"),
], ids=["nested-3000", "int-5000-digits", "nul-in-path"])
def test_session_files_that_broke_the_toml_reader(tmp_path, capsys, text, needle):
    s = write(tmp_path, text)
    rc, _, err = replay(capsys, str(s), "--out", str(tmp_path / "r.json"))
    assert rc == 2
    line = error_line(err, "s.toml", needle)
    assert "\x00" not in line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--device", "tpu", '"tpu"'),
    ("--device", "", 'got ""'),
    ("--device", "cuda:x", '"cuda:x"'),
    ("--dtype", "fp16", '"fp16"'),
    ("--dtype", "", 'got ""'),
])
def test_device_and_dtype_overrides_are_validated_like_the_file(tmp_path, capsys, no_model_load, flag, value,
                                                                 needle):
    s = write(tmp_path, BASE)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), flag, value, "--out", str(out))
    assert rc == 2
    line = error_line(err, flag, needle, "expected")
    # the same rule (and wording) as the session key
    key = flag.lstrip("-")
    with pytest.raises(UserError) as e:
        sessions.loads(BASE.replace('name = "tiny:llama"', f'name = "tiny:llama"\n{key} = "{value}"'))
    assert e.value.message.split(": ", 1)[1] in line
    assert not out.exists()


# ----------------------------------------------------------------- 4. hangs
def test_fifo_as_data_path_or_session_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    s = write(tmp_path, BASE.replace("builtin:world-facts", "pipe.jsonl"))
    proc = run_cli("replay", str(s), "--out", str(tmp_path / "r.json"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, "s.toml:5", "data.path", "FIFO")
    os.mkfifo(tmp_path / "pipe.toml")
    proc = run_cli("replay", str(tmp_path / "pipe.toml"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, "pipe.toml", "FIFO")
    proc = run_cli("replay", str(write(tmp_path, BASE, "ok.toml")), "--out", str(tmp_path / "pipe.jsonl"),
                   timeout=60)
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, "--out", "not a regular file")
    assert not (tmp_path / "r.json").exists()
    assert (tmp_path / "pipe.jsonl").is_fifo()  # --out never replaces a special file


def test_fifo_as_data_file_through_the_data_api(tmp_path):
    # in a child process: on a regression the read blocks, and the timeout ends it
    os.mkfifo(tmp_path / "p.json")
    code = ("import sys\nfrom unlearn_tui.backends import data\nfrom unlearn_tui.backends.errors import UserError\n"
            "for f in (data.load_items, data.load_lines):\n"
            "    try:\n        f(sys.argv[1])\n    except UserError as e:\n        print(e)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.json")], capture_output=True,
                              text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO as a data file blocks")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("FIFO" in ln and "p.json" in ln for ln in lines), proc.stdout


# ----------------------------------------------------------------- 5. tiny models: device and dtype
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_tiny_model_on_an_unavailable_device_is_one_line(tmp_path, capsys):
    text = BASE.replace('name = "tiny:llama"', 'name = "tiny:llama"\ndevice = "cuda"')
    s = write(tmp_path, text)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out), "--quiet")
    assert rc == 2
    error_line(err, f"s.toml:{line_of(text, 'device')}", "model.device", "CUDA", only=False)
    assert not out.exists()
    rc, _, err = replay(capsys, str(write(tmp_path, BASE, "plain.toml")), "--device", "cuda", "--out", str(out),
                        "--quiet")
    assert rc == 2
    line = error_line(err, "--device", "CUDA", only=False)
    assert "plain.toml" not in line  # the flag, not the file, asked for it
    assert not out.exists()


@pytest.mark.parametrize("how", ["file", "flag"])
def test_tiny_model_honours_dtype(tmp_path, capsys, monkeypatch, how):
    import torch

    import unlearn_tui.backends.model

    from unlearn_tui import backends
    seen = []
    real = backends.model.load

    def spy(spec=None, *a, **k):
        handle = real(spec, *a, **k)
        seen.append((spec.device, spec.dtype, handle.dtype, str(next(handle.model.parameters()).device)))
        return handle

    monkeypatch.setattr(backends.model, "load", spy)
    text = BASE.replace('name = "tiny:llama"', 'name = "tiny:llama"\ndevice = "cpu"\ndtype = "bfloat16"')
    args = ["--quiet", "--no-save"]
    if how == "flag":
        text, args = BASE, args + ["--device", "cpu", "--dtype", "bfloat16"]
    rc, _, err = replay(capsys, str(write(tmp_path, text)), *args)
    assert rc == 0, err
    assert seen == [("cpu", "bfloat16", torch.bfloat16, "cpu")]


def test_empty_out_is_an_error(tmp_path, capsys, no_model_load):
    s = write(tmp_path, BASE)
    rc, _, err = replay(capsys, str(s), "--out", "")
    assert rc == 2
    error_line(err, "--out", 'got ""')


# ----------------------------------------------------------------- 6. --out must not replace inputs
@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink", "data"])
def test_out_may_not_replace_the_session_or_its_files(tmp_path, capsys, monkeypatch, no_model_load, how):
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps({"id": f"q{i}", "question": f"Q{i}?",
                                                                "answer": f"A{i}"}) for i in range(6)) + "\n")
    text = BASE.replace("builtin:world-facts", "facts.jsonl")
    s = write(tmp_path, text)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if how == "same":
        out = str(s)
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = "./s.toml"
    elif how == "symlink":
        (tmp_path / "link.json").symlink_to(s)
        out = str(tmp_path / "link.json")
    elif how == "hardlink":
        os.link(s, tmp_path / "hard.json")
        out = str(tmp_path / "hard.json")
    else:
        out = str(tmp_path / "facts.jsonl")
    rc, _, err = replay(capsys, str(s), "--out", out)
    assert rc == 2
    error_line(err, "--out", "data file" if how == "data" else "session file")
    assert s.read_text() == text
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before


# ----------------------------------------------------------------- 7. apply-time errors keep file:line
def test_layer_out_of_range_names_the_run_and_the_line(tmp_path, capsys):
    text = with_run("rome", "layer = 99")
    s = write(tmp_path, text)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out), "--quiet", "--no-save")
    assert rc == 2
    error_line(err, f"s.toml:{line_of(text, 'layer = 99')}", "runs[1].params.layer", "99", only=False)
    assert not out.exists()


def test_session_locates_key_paths(tmp_path):
    text = with_run("rome", "layer = 99")
    s = sessions.load(write(tmp_path, text))
    assert s.locate("runs[1].params.layer") == f"{tmp_path / 's.toml'}:{line_of(text, 'layer = 99')}"
    assert s.locate("model.device") == f"{tmp_path / 's.toml'}:2"  # absent: its table's line
    assert s.locate("params.layer") is None and s.locate(str(tmp_path / "facts.jsonl")) is None
    assert s.locate("--out") is None and s.locate(None) is None


def test_cross_field_checks_in_post_init_are_located():
    from unlearn_tui.backends.params import param, parse_params

    @dataclass
    class P:
        a: int = param(1, "a", min=1)
        b: int = param(2, "b", min=1)

        def __post_init__(self):
            if self.b % self.a:
                raise UserError("b must be a multiple of a", "params.b")

    with pytest.raises(UserError) as e:
        parse_params(P, {"a": 2, "b": 3}, where="runs[4].params")
    assert e.value.where == "runs[4].params.b"


# ----------------------------------------------------------------- 8. trust_remote_code needs the flag too
TRUSTING = BASE.replace('name = "tiny:llama"', 'name = "tiny:llama"\ntrust_remote_code = true')


def test_trust_remote_code_in_a_session_needs_the_flag(tmp_path, capsys, no_model_load):
    s = write(tmp_path, TRUSTING)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out))
    assert rc == 2
    error_line(err, f"s.toml:{line_of(TRUSTING, 'trust_remote_code')}", "trust_remote_code", "--trust-remote-code")
    assert not out.exists()


def test_trust_remote_code_with_the_flag_runs(tmp_path, capsys):
    s = write(tmp_path, TRUSTING)
    out = tmp_path / "r.json"
    rc, _, err = replay(capsys, str(s), "--out", str(out), "--quiet", "--no-save", "--trust-remote-code")
    assert rc == 0, err
    assert json.loads(out.read_text())["runs"][0]["method"] == "none"


def test_app_launch_refuses_trust_remote_code_without_the_flag(tmp_path, capsys, monkeypatch):
    calls = []
    fake = types.ModuleType("unlearn_tui.tui.app")

    def run_app(session_path=None, model=None, device=None, trust_remote_code=False):
        calls.append((session_path, trust_remote_code))
        return 0

    fake.run_app = run_app
    monkeypatch.setitem(sys.modules, "unlearn_tui.tui.app", fake)
    s = write(tmp_path, TRUSTING)
    assert cli.main([str(s)]) == 2
    error_line(capsys.readouterr().err, "s.toml:4", "--trust-remote-code")
    assert calls == []
    assert cli.main([str(s), "--trust-remote-code"]) == 0
    assert calls == [(str(s), True)]
    assert cli.main([str(s), "--device", "tpu", "--trust-remote-code"]) == 2
    error_line(capsys.readouterr().err, "--device", "tpu")
    assert len(calls) == 1


@pytest.mark.parametrize("params, key", [("merge_freq = 7", "runs[1].params.merge_freq"),
                                         ("act_margin = [1.0, 2.0]", "runs[1].params.act_margin")])
def test_wise_cross_field_checks_fail_at_load_with_file_and_line(tmp_path, params, key):
    text = with_run("wise", params)
    with pytest.raises(UserError) as info:
        sessions.load(write(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 's.toml'}:{line_of(text, params)}: ")
    assert key in str(info.value) and "\n" not in str(info.value)
