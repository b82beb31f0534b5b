"""``unlearn-tui export``: the edited model as a Hugging Face folder or a delta, and ``[[steps]]``."""

from __future__ import annotations

from pathlib import Path

import pytest

ROME = "{ v_steps = 2, templates = 0, token_budget = 512 }"


def session_text(method: str = "rome", params: str = ROME, extra: str = "", forget: int = 2) -> str:
    return f"""version = 1
[model]
name = "tiny:llama"
[data]
path = "builtin:world-facts"
forget = {forget}
retain = 2
[data.subjects]
wf-001 = "France"
[targets]
mode = "idk"
[eval]
max_new_tokens = 4
[[runs]]
method = "{method}"
params = {params}
{extra}"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def edited_workbench(path: Path, runs: bool = True):
    """The session's model with its runs (and recorded steps) applied and kept, as export replays them."""
    from unlearn_tui import sessions
    from unlearn_tui.backends.runner import Workbench

    s = sessions.load(path)
    wb = Workbench(s)
    wb.load_data()
    wb.load_model()
    if runs:
        for i, r in enumerate(s.runs):
            wb.keep(r, index=i)
    wb.replay_steps(s.steps)
    return wb


def greedy(model, tok, questions, n: int = 8):
    """Plain transformers greedy generations (no unlearn-tui code)."""
    import torch

    out = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def handle_answers(handle, questions, n: int = 8):
    from unlearn_tui.backends.generation import generate

    return [generate(handle, [handle.prompt_ids(q)], n, 1)[0] for q in questions]


QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What colour is the sky?"]


def cli(*args: str) -> int:
    from unlearn_tui.tui.cli import main

    return main(list(args))


# ---------------------------------------------------------------- full export
def test_rome_export_reloads_with_plain_transformers(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_tui.backends import tiny
    from unlearn_tui.backends.export import EXPORT_FILE, read_export
    from unlearn_tui.backends.model import state_hash

    path = write(tmp_path, session_text())
    out = tmp_path / "out"
    assert cli("export", str(path), str(out), "--quiet") == 0
    assert "exported the edited model" in capsys.readouterr().out
    wb = edited_workbench(path)
    edited = wb.handle.model
    assert state_hash(edited) != state_hash(tiny.handle("llama").model)   # ROME changed something

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file() and (out / EXPORT_FILE).is_file()
    # the same weights, bit for bit, and the tied unembedding is still tied
    mine, theirs = edited.state_dict(), model.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert greedy(model, tok, QUESTIONS) == greedy(edited, wb.handle.tokenizer, QUESTIONS)
    info = read_export(out)
    assert info["kind"] == "full" and info["methods"] == ["rome"] and info["session"] == "s.toml"
    assert info["edits"][0]["items"] and info["base_state_hash"] == state_hash(tiny.handle("llama").model)


# ---------------------------------------------------------------- delta
def test_rome_delta_holds_only_the_touched_tensors_and_refuses_another_model(tmp_path):
    import torch
    from safetensors import safe_open

    from unlearn_tui.backends import tiny
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.export import DELTA_FILE, apply_delta, read_export

    path = write(tmp_path, session_text())
    out = tmp_path / "delta"
    assert cli("export", str(path), str(out), "--delta", "--quiet") == 0
    wb = edited_workbench(path)
    touched = {n for tx in wb.undo_stack for n in tx.names}
    with safe_open(str(out / DELTA_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert keys == touched and len(keys) < len(dict(wb.handle.model.named_parameters()))   # ROME: one matrix
    assert not (out / "model.safetensors").exists()
    assert set(read_export(out)["tensors"]) == keys

    fresh = tiny.handle("llama").model
    assert apply_delta(fresh, out) is fresh
    mine, theirs = wb.handle.model.state_dict(), fresh.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(UserError) as e:            # twice: refused, the weights stay as they are
        apply_delta(fresh, out)
    assert "already has the delta" in str(e.value) and "\n" not in str(e.value)
    other = tiny.handle("llama", seed=1).model      # same shapes, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(UserError) as e:
        apply_delta(other, out)
    assert "exported for another model" in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(UserError) as e:             # another architecture
        apply_delta(tiny.handle("gpt2").model, out)
    assert "another model" in str(e.value) and "\n" not in str(e.value)


# above_out_of_scope = false: on the random tiny model the in-scope and out-of-scope routing scores
# overlap (more so since the literary out-of-scope questions joined the pool), and the default rule then
# routes nothing; this test is about the export carrying the wrapper, not about routing
WISE = '{ n_iter = 8, edit_lr = 0.05, norm_constraint = 1.0, act_margin = [0.01, 0.2, 0.1], above_out_of_scope = false }'
GRACE = "{ n_iter = 10, edit_lr = 0.3 }"


@pytest.mark.parametrize("method,params", [("wise", WISE), ("grace", GRACE), ("ike", "{}")])
def test_wrapper_delta_reproduces_the_edited_generations(method, params, tmp_path):
    from unlearn_tui.backends import tiny
    from unlearn_tui.backends.export import apply_delta, read_export

    path = write(tmp_path, session_text(method, params))
    full = tmp_path / "full"
    assert cli("export", str(path), str(full), "--quiet") == 2    # a plain folder cannot carry the wrapper
    assert not full.exists()
    out = tmp_path / "delta"
    assert cli("export", str(path), str(out), "--delta", "--quiet") == 0
    info = read_export(out)
    assert [w["kind"] for w in info["wrappers"]] == [method] and info["tensors"] == []
    wb = edited_workbench(path)
    questions = [it.question for it in wb.forget] + QUESTIONS
    want = handle_answers(wb.handle, questions)
    fresh = tiny.handle("llama")
    assert handle_answers(fresh, questions) != want       # the edit shows
    loaded = apply_delta(fresh.model, out)                # a bare model: a handle with the exported tokenizer
    assert [w.name for w in loaded.wrappers] == [method]
    assert handle_answers(loaded, questions) == want
    again = tiny.handle("llama")
    assert apply_delta(again, out) is again and handle_answers(again, questions) == want


# ---------------------------------------------------------------- [[steps]]
def test_steps_recorded_by_the_workspace_round_trip_and_export_bit_for_bit(tmp_path):
    import torch
    from safetensors.torch import load_file

    from unlearn_tui import sessions
    from unlearn_tui.backends.runner import Workbench
    from unlearn_tui.tui.workspace import Workspace

    path = write(tmp_path, session_text(forget=3, extra="# keep this comment\n"))
    ws = Workspace(sessions.load(path))
    wb = Workbench(ws.session)
    wb.load_data()
    wb.load_model()
    for what in ("step", "step", "undo", "redo", "step", "undo"):
        step = wb.step_next() if what == "step" else getattr(wb, what)()
        ws.step_finished(what, step)
    assert [s.items for s in ws.session.steps] == [["wf-001"], ["wf-002"]] and ws.dirty
    assert [s.method for s in ws.session.steps] == ["rome", "rome"]
    sessions.save(ws.session)
    text = path.read_text()
    assert "# keep this comment" in text and "[[steps]]" in text
    back = sessions.load(path)
    assert back.steps == ws.session.steps
    out = tmp_path / "out"
    assert cli("export", str(path), str(out), "--steps-only", "--quiet") == 0
    saved = load_file(str(out / "model.safetensors"))
    mine = wb.handle.model.state_dict()
    for k, v in saved.items():
        assert torch.equal(mine[k], v), k
    ws.step_finished("undo", wb.undo())
    ws.step_finished("undo", wb.undo())
    assert ws.session.steps == []
    ws.step_finished("redo", wb.redo())
    assert [s.items for s in ws.session.steps] == [["wf-001"]]


def test_a_step_the_session_no_longer_makes_is_one_line(tmp_path, capsys):
    extra = '[[steps]]\nmethod = "rome"\nitems = ["wf-009"]\n'
    path = write(tmp_path, session_text(extra=extra))
    out = tmp_path / "out"
    assert cli("export", str(path), str(out), "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steps[0].items" in err and "s.toml:" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["s.toml"]


# ---------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, session_text())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    cases = [
        (str(tmp_path / "missing.toml"), str(tmp_path / "o1"), []),
        (str(path), str(busy), []),
        (str(path), str(tmp_path / "o2"), ["--run", "9"]),
        (str(path), str(tmp_path / "o3"), ["--run", "1", "--steps-only"]),
        (str(path), str(tmp_path), ["--force"]),                     # holds the session itself
        (str(path), str(tmp_path / "no" / "such"), []),
    ]
    for session, out, flags in cases:
        assert cli("export", session, out, *flags) == 2, (out, flags)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("unlearn-tui: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "s.toml"]
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    # an earlier export is replaced without --force; a busy folder with --force
    out = tmp_path / "again"
    assert cli("export", str(path), str(out), "--quiet", "--run", "1") == 0
    assert cli("export", str(path), str(out), "--quiet") == 0
    assert cli("export", str(path), str(busy), "--quiet", "--force") == 0
    assert not (busy / "mine.txt").exists()


# ---------------------------------------------------------------- the app
@pytest.mark.anyio
async def test_app_exports_the_step_edited_model(tmp_path, llama_handle):
    """The palette's "Export edited model…" writes the app's step-edited model (its kept edits)."""
    pytest.importorskip("textual")
    import json

    import torch
    from test_tui_flow import ITEMS, press_job, settings, wait_idle, write_session
    from transformers import AutoModelForCausalLM

    from unlearn_tui.backends.export import read_export
    from unlearn_tui.tui import actions
    from unlearn_tui.tui.app import create_app

    assert "export_model" in actions.BY_ID and "export_delta" in actions.BY_ID
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(ITEMS), encoding="utf-8")
    app = create_app(write_session(tmp_path, data, "rome", extra=f"params = {ROME}\n"), handle=llama_handle,
                     settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await press_job(pilot, app, "step", "ctrl+t")
        assert [s.items for s in app.workspace.session.steps] == [["q1"]]
        out = tmp_path / "exported"
        mark = len(app.jobs_done)
        app.export_model(str(out))
        await wait_idle(pilot, app)
        assert "export" in app.jobs_done[mark:]
    assert len(read_export(out)["edits"]) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    mine = llama_handle.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in model.state_dict().items())
