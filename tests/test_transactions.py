"""Transactions around the lifelong editors (issue 12) on tiny random models.

* non-finite wrapper state (a NaN GRACE value, a NaN WISE side memory) is rolled back like a
  non-finite parameter, bit for bit;
* step mode's undo stack grows with the size of each edit (copy-on-write wrapper state), and undo /
  redo over a long stack stays exact;
* ``save_state`` / ``load_state`` (and the statistics ``corpus``) are relative to the session's folder
  and confined to it, ``save_state`` never creates folders, never replaces a file that is not its own
  kind of state file, and writes atomically through ``tempfile.mkstemp``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from unlearn_tui.backends.errors import NonFiniteError, UserError
from unlearn_tui.backends.events import Progress
from unlearn_tui.backends.targets import Request

TARGET = "I don't know."
UNRELATED = "The quick brown fox jumps over the lazy dog."
# small, fast settings sized for the tiny models (see tests/test_wise_grace.py for why these margins)
WISE_FAST = {"n_iter": 5, "edit_lr": 0.05, "norm_constraint": 1.0, "act_margin": [0.01, 0.2, 0.1],
             "first_token_weight": 0.0, "above_out_of_scope": False}
GRACE_FAST = {"n_iter": 5, "edit_lr": 0.3}


def _requests(n: int, start: int = 0) -> list[Request]:
    from tests.conftest import make_items

    items = make_items(start + n)[start:]
    return [Request(prompt=f"{it.question} ({it.id})", target=TARGET, subject=it.subject, item_ids=[it.id])
            for it in items]


def _ctx(**kw):
    from unlearn_tui.backends.events import CancelToken
    from unlearn_tui.backends.runner import EditContext

    return EditContext(kw.pop("on_event", lambda e: None), CancelToken(), [], [], {}, seed=0, **kw)


def _apply(handle, name: str, params: dict, reqs, keep: bool = True, ctx=None):
    from unlearn_tui.backends.methods import make

    m = make(name, params)
    with handle.transaction(m.touched_parameters(handle), keep_after=keep) as tx:
        report = m.apply(handle, reqs, ctx or _ctx())
    return tx, report


def _logits(handle, question: str):
    ids = torch.tensor([handle.prompt_ids(question)])
    with torch.no_grad():
        return handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def _wrapper(handle, kind: str):
    return next(w for w in handle.wrappers if getattr(w, "name", "") == kind)


def _frozen(state):
    """A private copy of a wrapper state (every tensor cloned), for bit-for-bit comparisons."""
    import copy

    return copy.deepcopy(state)


def _assert_same_state(got, want, where: str = "state") -> None:
    """Equal structure, equal plain values, and tensors equal bit for bit (same dtype and shape)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            _assert_same_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_state(g, w, f"{where}[{i}]")
    else:
        assert got == want or (got != got and want != want), where   # NaN == NaN here


def _model_state(handle) -> tuple[list, list]:
    """(wrapper names with frozen states, logits of probe prompts) of the model as it answers now."""
    wrappers = [(getattr(w, "name", ""), _frozen(w.get_state()) if hasattr(w, "get_state") else None)
                for w in handle.wrappers]
    return wrappers, [_logits(handle, q) for q in PROBES]


PROBES = [r.prompt for r in _requests(2)] + [UNRELATED]


def _assert_same_model(handle, want: tuple[list, list]) -> None:
    wrappers, logits = _model_state(handle)
    assert [n for n, _ in wrappers] == [n for n, _ in want[0]]
    for (_, g), (_, w) in zip(wrappers, want[0]):
        if w is not None:
            _assert_same_state(g, w)
    assert all(torch.equal(a, b) for a, b in zip(logits, want[1]))


# ------------------------------------------------------------------------------ 1. non-finite wrapper state


def test_nan_value_in_a_grace_codebook_is_rolled_back_bit_for_bit(llama_handle, monkeypatch):
    from unlearn_tui.backends.editing.grace_codebook import GraceCodebook

    h = llama_handle
    reqs = _requests(3)
    _apply(h, "grace", {**GRACE_FAST, "eps": 1e-6}, reqs[:1])      # a tiny radius: every edit adds an entry
    cb = _wrapper(h, "grace")
    before = _model_state(h)
    edit_before = _logits(h, reqs[1].prompt)
    original = GraceCodebook._append

    def poisoned(self, key, value, radius, label, ids):   # a bug that slips a NaN past the value check
        original(self, key, value * float("nan"), radius, label, ids)

    monkeypatch.setattr(GraceCodebook, "_append", poisoned)
    with pytest.raises(NonFiniteError, match="grace state"):
        _apply(h, "grace", {**GRACE_FAST, "eps": 1e-6}, reqs[1:2])
    assert h.wrappers == [cb] and len(cb) == 1
    _assert_same_model(h, before)
    after = _logits(h, reqs[1].prompt)
    assert torch.isfinite(after).all() and torch.equal(after, edit_before)


def test_nan_in_a_wise_side_memory_is_rolled_back_bit_for_bit(llama_handle, monkeypatch):
    from unlearn_tui.backends.editing.wise_memory import WiseMemory

    h = llama_handle
    reqs = _requests(3)
    _apply(h, "wise", WISE_FAST, reqs[:1])
    mem = _wrapper(h, "wise")
    before = _model_state(h)
    original = WiseMemory.refresh

    def poisoned(self, density):   # merging goes wrong after the trained shard passed its own check
        original(self, density)
        if self.delta is not None:
            self.delta = self.delta * float("nan")

    monkeypatch.setattr(WiseMemory, "refresh", poisoned)
    with pytest.raises(NonFiniteError, match="wise state"):
        _apply(h, "wise", WISE_FAST, reqs[1:2])
    assert h.wrappers == [mem] and len(mem.edits) == 1
    _assert_same_model(h, before)
    assert all(torch.isfinite(x).all() for x in before[1])


def test_a_new_wrapper_with_non_finite_state_is_removed(llama_handle):
    """A wrapper added inside the transaction with a NaN in its state never stays installed."""
    from unlearn_tui.backends.editing.grace_codebook import GraceCodebook

    h = llama_handle
    before = _model_state(h)
    hidden = h.adapter.hidden_size
    with pytest.raises(NonFiniteError):
        with h.transaction([]):
            cb = GraceCodebook(h.adapter.n_layers - 1, hidden)
            h.add_wrapper(cb)
            cb._append(torch.zeros(hidden), torch.full((hidden,), float("inf")), 1.0, TARGET, ["x"])
    assert h.wrappers == []
    _assert_same_model(h, before)


class _PlainWrapper:
    """A wrapper without copy-on-write: it writes its tensor in place; the transaction deep-copies it."""

    name = "plain"

    def __init__(self, n: int = 4) -> None:
        self.t = torch.arange(float(n))
        self.installed = 0

    def install(self, handle):
        self.installed += 1

    def remove(self, handle):
        self.installed -= 1

    def get_state(self):
        return {"t": self.t}

    def set_state(self, state):
        self.t = state["t"]


def test_non_finite_state_of_a_plain_wrapper_written_in_place_is_rolled_back(llama_handle):
    h = llama_handle
    w = _PlainWrapper()
    h.add_wrapper(w)
    with pytest.raises(NonFiniteError, match='plain state "t"'):
        with h.transaction([]):
            w.t[1] = float("nan")
    assert torch.equal(w.t, torch.arange(4.0)) and h.wrappers == [w] and w.installed == 1
    with h.transaction([], keep_after=True) as tx:   # a kept in-place edit undoes and redoes exactly
        w.t.mul_(2)
    tx.undo()
    assert torch.equal(w.t, torch.arange(4.0))
    tx.redo()
    assert torch.equal(w.t, torch.arange(4.0) * 2)
    tx.undo()
    assert torch.equal(w.t, torch.arange(4.0))


def test_a_copy_on_write_wrapper_that_writes_in_place_is_caught(llama_handle):
    class Broken(_PlainWrapper):
        copy_on_write = True

    h = llama_handle
    w = Broken()
    h.add_wrapper(w)
    with pytest.raises(RuntimeError, match="in place"):
        with h.transaction([]):
            w.t.add_(1.0)


# ------------------------------------------------------------------------------ 2. step-mode undo stack


def _walk_bytes(obj, seen: dict, visited: set) -> None:
    """Tensor storage bytes reachable through dicts, lists and tuples (each storage once)."""
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, dict):
        for v in obj.values():
            _walk_bytes(v, seen, visited)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk_bytes(v, seen, visited)


def _held_bytes(transactions, seen: dict | None = None) -> int:
    """What a list of transactions keeps alive in tensors (their records, not the model or the wrappers)."""
    seen = {} if seen is None else seen
    for tx in transactions:
        _walk_bytes({k: v for k, v in vars(tx).items() if k != "handle"}, seen, set())
    return sum(seen.values())


@pytest.mark.parametrize("method", ["wise", "grace"])
def test_step_mode_undo_stack_grows_linearly_and_undo_redo_stays_exact(tmp_path, method):
    from unlearn_tui import sessions
    from unlearn_tui.backends.runner import Workbench
    from tests.test_cli import write_facts

    n = 20
    params = WISE_FAST if method == "wise" else {**GRACE_FAST, "eps": 1e-6}
    write_facts(tmp_path / "facts.jsonl")
    s = sessions.new_session(model={"name": "tiny:llama"}, data={"path": "facts.jsonl", "forget": 1, "retain": 1},
                             runs=[{"method": method, "params": params}])
    s.path = tmp_path / "s.toml"
    wb = Workbench(s)
    wb.load_model()
    h = wb.handle
    levels = [_model_state(h)]
    per_edit = []
    for r in _requests(n):
        wb.step(s.runs[0], r)
        per_edit.append(_held_bytes([wb.undo_stack[-1]]))
        levels.append(_model_state(h))
    w = _wrapper(h, method)
    assert len(w.edits if method == "wise" else w) == n
    total = _held_bytes(wb.undo_stack)
    # each edit's record costs about the same however long the stack is (it was the whole state,
    # before and after, growing with every edit), and the stack holds at most a few edits' worth each
    first = max(per_edit[:5])   # WISE: one merge group (5 edits), so every kind of edit is in it
    assert max(per_edit[-5:]) <= 2 * first, per_edit
    assert total <= 2 * n * first, (total, per_edit)
    # undo everything, then redo everything: every level is restored bit for bit
    for k in range(n, 0, -1):
        assert wb.undo()
        _assert_same_model(h, levels[k - 1])
    assert h.wrappers == [] and not wb.undo()
    for k in range(1, n + 1):
        assert wb.redo()
        _assert_same_model(h, levels[k])
    assert not wb.redo()


def test_undo_records_only_the_entries_an_edit_changed(llama_handle):
    """A GRACE edit that adds one entry records that entry, not the codebook; the rest is shared."""
    from unlearn_tui.backends.model import _MISSING

    h = llama_handle
    reqs = _requests(4)
    txs = [_apply(h, "grace", {**GRACE_FAST, "eps": 1e-6}, [r])[0] for r in reqs]
    cb = _wrapper(h, "grace")
    assert len(cb) == 4
    (w, old, new), = txs[-1].changes
    assert w is cb
    assert set(new) == {"entries", "labels", "item_ids", "log", "key.3", "value.3", "radius.3", "label.3",
                        "item_ids.3", "log.3"}
    assert old["entries"] == 3 and new["entries"] == 4 and old["key.3"] is _MISSING
    assert new["key.3"] is cb.get_state()["key.3"]   # shared with the live state, not copied
    assert txs[-1].stored_bytes() == sum(new[k].untyped_storage().nbytes()
                                         for k in ("key.3", "value.3", "radius.3"))


@pytest.mark.parametrize("rule", ["coverage", "moving_avg", "split"])
def test_grace_rules_that_rewrite_an_entry_undo_and_redo_exactly(llama_handle, rule):
    """Expanding (both ways) and splitting change an existing entry's key or radius: new tensors, exact undo."""
    from unlearn_tui.backends.editing.grace_codebook import mlp_io

    h = llama_handle
    a, b = "What do you know about France?", "What do you know about Spain?"
    layer = h.adapter.n_layers - 1
    d = float(torch.dist(mlp_io(h, layer, h.prompt_ids(a))[0], mlp_io(h, layer, h.prompt_ids(b))[0]))
    params = {"eps": d, "n_iter": 2, "layer": layer, "eps_expand": "moving_avg" if rule == "moving_avg" else "coverage"}
    _apply(h, "grace", params, [Request(a, TARGET, None, ["a"])])
    cb = _wrapper(h, "grace")
    one = _model_state(h)
    key0, radius0 = cb.get_state()["key.0"], cb.get_state()["radius.0"]
    tx, report = _apply(h, "grace", params, [Request(b, TARGET if rule != "split" else "Something else.", None, ["b"])])
    assert report["actions"][{"coverage": "expand", "moving_avg": "expand", "split": "split"}[rule]] == 1
    two = _model_state(h)
    if rule == "moving_avg":   # the key moved to the mean of the two keys
        assert not torch.equal(cb.keys[0], key0)
    if rule == "split":        # the ball shrank to half the distance
        assert float(cb.radii[0]) == pytest.approx(d / 2, rel=1e-5) and float(radius0) > d / 2
    assert torch.equal(key0, one[0][0][1]["key.0"]) and torch.equal(radius0, one[0][0][1]["radius.0"])  # untouched
    tx.undo()
    _assert_same_model(h, one)
    tx.redo()
    _assert_same_model(h, two)


# ------------------------------------------------------------------------------ 3. session-controlled paths


def _session(folder: Path, runs: list[dict]):
    from unlearn_tui import sessions
    from tests.test_cli import write_facts

    folder.mkdir(parents=True, exist_ok=True)
    write_facts(folder / "facts.jsonl")
    s = sessions.new_session(model={"name": "tiny:llama"}, data={"path": "facts.jsonl", "forget": 1, "retain": 1},
                             runs=runs)
    s.path = folder / "s.toml"
    return s


def _bench(s, events=None):
    from unlearn_tui.backends.runner import Workbench

    wb = Workbench(s, events.append if events is not None else (lambda e: None))
    wb.load_model()
    return wb


def _run(wb, index: int, reqs=None):
    tx, _, report, _ = wb.apply(wb.session.runs[index], reqs or _requests(1), index=index)
    return report


def test_state_files_are_relative_to_the_session_folder_not_the_current_directory(tmp_path, monkeypatch):
    proj, cwd = tmp_path / "proj", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for method, params in (("grace", {**GRACE_FAST, "eps": 1e-6}), ("wise", WISE_FAST)):
        name = f"{method}.safetensors"
        s = _session(proj, [{"method": method, "params": {**params, "save_state": name}},
                            {"method": method, "params": {"load_state": name}}])
        wb = _bench(s)
        _run(wb, 0)
        assert (proj / name).is_file() and not (cwd / name).exists()
        want = _logits(wb.handle, _requests(1)[0].prompt)
        fresh = _bench(s)
        report = _run(fresh, 1)
        assert report["edits"] == 0 and report["loaded"] == name
        assert torch.equal(_logits(fresh.handle, _requests(1)[0].prompt), want)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlinked-file", "symlinked-folder"])
@pytest.mark.parametrize("key", ["save_state", "load_state"])
def test_state_paths_outside_the_session_folder_are_refused(tmp_path, how, key):
    proj, outside = tmp_path / "proj", tmp_path / "outside"
    outside.mkdir()
    proj.mkdir()
    victim = outside / "victim.safetensors"
    if key == "load_state":   # a real state file, outside: reading it needs the opt-in too
        from unlearn_tui.backends import tiny

        _apply(tiny.handle("llama"), "grace", {**GRACE_FAST, "save_state": str(victim)}, _requests(1))
    value = {"dotdot": "../outside/victim.safetensors", "absolute": str(victim),
             "symlinked-file": "link.safetensors", "symlinked-folder": "dir/victim.safetensors"}[how]
    if how == "symlinked-file":
        (proj / "link.safetensors").symlink_to(victim)
    if how == "symlinked-folder":
        (proj / "dir").symlink_to(outside, target_is_directory=True)
    params = {**GRACE_FAST, key: value}
    s = _session(proj, [{"method": "none"}, {"method": "grace", "params": params},
                        {"method": "grace", "params": {**params, "allow_outside": True}}])
    wb = _bench(s)
    with pytest.raises(UserError) as e:
        _run(wb, 1)
    assert e.value.where == f"runs[1].params.{key}"
    assert "outside the session folder" in str(e.value) and "\n" not in str(e.value)
    assert wb.handle.wrappers == []
    assert victim.exists() == (key == "load_state")
    _run(wb, 2)   # the explicit opt-in
    assert victim.is_file()


def test_the_environment_opt_in_allows_outside_paths(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    s = _session(proj, [{"method": "grace", "params": {**GRACE_FAST, "save_state": "../out.safetensors"}}])
    with pytest.raises(UserError):
        _run(_bench(s), 0)
    monkeypatch.setenv("UNLEARN_TUI_ALLOW_OUTSIDE", "1")
    _run(_bench(s), 0)
    assert (tmp_path / "out.safetensors").is_file()


def test_save_state_never_creates_folders_and_fails_before_any_work(tmp_path):
    proj = tmp_path / "proj"
    s = _session(proj, [{"method": "wise", "params": {**WISE_FAST, "save_state": str(proj / "states" / "w.st")}}])
    events = []
    wb = _bench(s, events)
    with pytest.raises(UserError) as e:
        _run(wb, 0)
    assert e.value.where == "runs[0].params.save_state" and "does not exist" in str(e.value)
    assert not (proj / "states").exists() and wb.handle.wrappers == []
    assert not any(isinstance(ev, Progress) and ev.stage.startswith("wise: edit") for ev in events)


def test_save_state_replaces_only_its_own_kind_of_state_file(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("my notes")
    notes, state = str(proj / "notes.txt"), str(proj / "grace.safetensors")   # absolute, inside: allowed
    s = _session(proj, [{"method": "grace", "params": {**GRACE_FAST, "save_state": notes}},
                        {"method": "grace", "params": {**GRACE_FAST, "save_state": state}},
                        {"method": "wise", "params": {**WISE_FAST, "save_state": state}},
                        {"method": "grace", "params": {**GRACE_FAST, "save_state": notes, "overwrite": True}}])
    wb = _bench(s)
    with pytest.raises(UserError) as e:   # a file we did not write
        _run(wb, 0)
    assert e.value.where == "runs[0].params.save_state" and "not an unlearn-tui state file" in str(e.value)
    assert (proj / "notes.txt").read_text() == "my notes" and wb.handle.wrappers == []
    _run(wb, 1)
    first = (proj / "grace.safetensors").read_bytes()
    _run(wb, 1, _requests(1, start=1))   # our own GRACE state file: replaced without asking
    assert (proj / "grace.safetensors").read_bytes() != first
    with pytest.raises(UserError) as e:   # a state file of another kind
        _run(wb, 2)
    assert e.value.where == "runs[2].params.save_state" and "grace-codebook" in str(e.value)
    _run(wb, 3)   # the explicit opt-in
    from unlearn_tui.backends.editing.lifelong import state_file_kind

    assert state_file_kind(proj / "notes.txt") == "unlearn-tui/grace-codebook"


def test_save_state_writes_through_mkstemp_fsyncs_and_never_follows_a_planted_temp_name(tmp_path, monkeypatch):
    proj, outside = tmp_path / "proj", tmp_path / "outside"
    outside.mkdir()
    proj.mkdir()
    victim = outside / "victim"
    victim.write_text("precious")
    (proj / "grace.safetensors.tmp").symlink_to(victim)   # the old predictable temp name, planted
    made, synced = [], []
    real_mkstemp, real_fsync = tempfile.mkstemp, os.fsync

    def mkstemp(*a, **kw):
        out = real_mkstemp(*a, **kw)
        made.append((kw.get("dir"), out[1]))
        return out

    def fsync(fd):
        synced.append(fd)
        return real_fsync(fd)

    target = str(proj / "grace.safetensors")   # absolute, inside the session folder: allowed
    s = _session(proj, [{"method": "grace", "params": {**GRACE_FAST, "save_state": target}}])
    wb = _bench(s)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fsync", fsync)
    _run(wb, 0)
    assert victim.read_text() == "precious" and (proj / "grace.safetensors.tmp").is_symlink()
    assert [Path(d) for d, _ in made] == [proj] and not Path(made[0][1]).exists() and synced
    assert sorted(p.name for p in proj.iterdir()) == ["facts.jsonl", "grace.safetensors", "grace.safetensors.tmp"]


def test_a_failed_write_removes_the_temp_file_and_keeps_the_old_state(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    s = _session(proj, [{"method": "grace", "params": {**GRACE_FAST, "save_state": str(proj / "grace.safetensors")}}])
    wb = _bench(s)
    _run(wb, 0)
    old = (proj / "grace.safetensors").read_bytes()
    listing = sorted(p.name for p in proj.iterdir())

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    wrappers = list(wb.handle.wrappers)
    with pytest.raises(UserError) as e:
        _run(wb, 0, _requests(1, start=1))
    assert e.value.where == "runs[0].params.save_state" and "No space left" in str(e.value)
    assert sorted(p.name for p in proj.iterdir()) == listing          # no temp file left behind
    assert (proj / "grace.safetensors").read_bytes() == old
    assert wb.handle.wrappers == wrappers and len(wrappers[0]) == 1   # the edit was rolled back


def test_stats_corpus_is_relative_to_the_session_folder_and_confined(llama_handle, tmp_path, monkeypatch):
    from unlearn_tui.backends import stats

    proj, cwd = tmp_path / "proj", tmp_path / "cwd"
    proj.mkdir()
    cwd.mkdir()
    text = "The sun rises in the east and sets in the west. Water boils at one hundred degrees.\n" * 20
    (proj / "corpus.txt").write_text(text)
    (tmp_path / "outside.txt").write_text(text)
    monkeypatch.chdir(cwd)
    mats, _ = stats.second_moments(llama_handle, [1], "corpus.txt", token_budget=300, tol=0.0, use_cache=False,
                                   base_dir=proj)
    assert torch.isfinite(mats[1]).all()
    with pytest.raises(UserError) as e:
        stats.second_moments(llama_handle, [1], "../outside.txt", token_budget=300, use_cache=False,
                             base_dir=proj, where="runs[0].params.corpus")
    assert e.value.where == "runs[0].params.corpus" and "outside the session folder" in str(e.value)
    other, _ = stats.second_moments(llama_handle, [1], "../outside.txt", token_budget=300, tol=0.0,
                                    use_cache=False, base_dir=proj, allow_outside=True)
    assert torch.equal(other[1], mats[1])   # the same text gives the same statistics
