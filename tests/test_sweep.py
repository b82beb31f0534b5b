"""Sweeps (``unlearn-tui sweep``, sessions/sweep.py): the grid expands as documented, trials equal
sequential replays, --out resumes, a failed trial is recorded while the others finish, bad input is one
line and exit 2 with nothing written, no Ray means sequential (and says so), and a real local Ray of 2 CPUs
gives the same results."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from unlearn_tui.sessions import sweep as sw
from unlearn_tui.tui import cli

SESSION = """version = 1
[model]
name = "tiny:llama"
[data]
path = "builtin:world-facts"
forget = 3
retain = 2
rephrase = false
[data.subjects]
wf-001 = "France"
[targets]
mode = "idk"
[eval]
max_new_tokens = 4
[[runs]]
method = "rome"
params = { v_steps = 2, templates = 0, token_budget = 512 }
"""

GRID = """
[sweep]
method = ["rome", "grace"]
merge_factor = [1, 2]
"""

GRID_2X3 = """
[sweep]
method = ["rome", "grace"]
merge_factor = [1, 2, 3]
"""

SCORES = ("forget", "retain", "composite", "method", "label", "params", "target_mode", "merge_factor")


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def scores(run: dict) -> dict:
    return {k: run.get(k) for k in SCORES}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The 2x2 sweep run one trial after another in this process, into an --out folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = sw.load_sweep(write(tmp, SESSION + GRID))
    events: list = []
    results = sw.run_sweep(spec, tmp / "out", events.append, backend="local")
    return spec, results, tmp / "out", events


# ----------------------------------------------------------------------------- the grid
def test_the_product_form_expands_as_documented(tmp_path):
    spec = sw.load_sweep(write(tmp_path, SESSION + GRID))
    trials = spec.trials()
    assert [(t.values["method"], t.values["merge_factor"]) for t in trials] == \
        [("rome", 1), ("rome", 2), ("grace", 1), ("grace", 2)]          # the last key varies fastest
    assert spec.axes == ("method", "merge_factor")
    for t in trials:   # each trial: a complete session with one run; the method replaces the session's runs
        (run,) = t.session.runs
        assert run.method == t.values["method"] and t.session.targets.merge_factor == t.values["merge_factor"]
        assert t.values["forget"] == 3 and t.values["mode"] == "idk" and t.values["seed"] == 0
    assert trials[0].session.runs[0].params == {"v_steps": 2, "templates": 0, "token_budget": 512}   # the session's
    assert trials[2].session.runs[0].params == {}
    assert len({t.hash for t in trials}) == 4
    assert sw.load_sweep(write(tmp_path, SESSION + GRID, "again.toml")).trials()[3].hash == trials[3].hash

    # a method's params grid multiplies that method's trials only; without `method`, the session's runs
    spec = sw.load_sweep(write(tmp_path, SESSION + GRID + "[sweep.params.rome]\nv_steps = [2, 3]\n"))
    assert [(t.values["method"], t.values.get("params.v_steps")) for t in spec.trials()] == \
        [("rome", 2), ("rome", 3), ("rome", 2), ("rome", 3), ("grace", None), ("grace", None)]
    spec = sw.load_sweep(write(tmp_path, SESSION + '[sweep]\nseed = [0, 1]\nmode = ["idk", "dummy"]\n'
                                                    "forget = [2, 3]\n"))
    assert len(spec.trials()) == 8 and {t.values["method"] for t in spec.trials()} == {"rome"}
    assert spec.trials()[-1].session.data.forget == 3 and spec.trials()[-1].session.targets.mode == "dummy"


def test_the_list_form_and_zipped_lists(tmp_path):
    text = SESSION + """
[sweep]
seed = [0, 1]
[[sweep.trials]]
method = "rome"
params = { v_steps = 3 }
[[sweep.trials]]
method = "grace"
label = "grace-default"
merge_factor = 2
"""
    trials = sw.load_sweep(write(tmp_path, text)).trials()
    assert [(t.values["method"], t.values["seed"]) for t in trials] == \
        [("rome", 0), ("rome", 1), ("grace", 0), ("grace", 1)]
    assert trials[0].session.runs[0].params == {"v_steps": 3, "templates": 0, "token_budget": 512}
    assert trials[0].values["params.v_steps"] == 3
    assert trials[2].session.runs[0].label == "grace-default" and trials[2].session.targets.merge_factor == 2

    zipped = sw.load_sweep(write(tmp_path, SESSION + GRID + "product = false\n")).trials()
    assert [(t.values["method"], t.values["merge_factor"]) for t in zipped] == [("rome", 1), ("grace", 2)]


@pytest.mark.parametrize("grid, line, where, says", [
    ('[sweep]\nmerge_factr = [1, 2]\n', 2, "sweep.merge_factr", 'did you mean "merge_factor"'),
    ("[sweep]\nmerge_factor = 2\n", 2, "sweep.merge_factor", "expected a non-empty list"),
    ('[sweep]\nmerge_factor = [1, "two"]\n', 2, "sweep.merge_factor", 'got "two" (element 2)'),
    ("[sweep]\nseed = []\n", 2, "sweep.seed", "got []"),
    ('[sweep]\nmethod = ["rome", "romee"]\n', 2, "sweep.method", "romee"),
    ('[sweep]\nmethod = ["rome"]\n[sweep.params.rome]\nv_stepz = [1, 2]\n', 4, "sweep.params.rome.v_stepz",
     "v_stepz"),
    ('[sweep]\nmethod = ["rome"]\n[sweep.params.grace]\nn_iter = [1]\n', 3, "sweep.params.grace",
     "not a method of this sweep"),
    ('[sweep]\nmethod = ["rome", "grace"]\nseed = [0, 1, 2]\nproduct = false\n', 3, "sweep.seed", "same length"),
    ('[sweep]\nseed = [0, 1]\n[[sweep.trials]]\nseed = 3\n', 4, "sweep.trials[0].seed", "also swept"),
    ('[sweep]\nmode = ["idk", "idunno"]\n', 2, "sweep.mode", '"idunno"'),
    ("[sweep]\ncpus_per_trial = 0\n", 2, "sweep.cpus_per_trial", "> 0"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, grid, line, where, says):
    path = write(tmp_path, SESSION + grid)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unlearn-tui: error: "), err
    assert f"{path}:{SESSION.count(chr(10)) + line}: {where}" in err and says in err, err
    assert not out.exists()


def test_a_session_error_names_its_line_and_a_missing_sweep_table_is_refused(tmp_path, capsys):
    text = SESSION.replace('mode = "idk"', "mode = 3") + GRID
    path = write(tmp_path, text)
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{text.splitlines().index('mode = 3') + 1}: targets.mode" in err and err.count("\n") == 1, err
    assert cli.main(["sweep", str(write(tmp_path, SESSION, "plain.toml"))]) == 2
    assert "no [sweep] table" in capsys.readouterr().err
    assert cli.main(["sweep", str(write(tmp_path, SESSION + GRID, "ok.toml")), "--out", str(path)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- running
def test_trials_equal_sequential_replays_and_out_has_the_documented_fields(local_sweep, tmp_path, capsys):
    spec, results, out, events = local_sweep
    assert [r.status for r in results] == ["ok"] * 4
    assert sum(bool(r.loaded_model) for r in results) == 1        # one model load for the whole process
    assert isinstance(events[0], sw.SweepStarted) and events[0].backend == "local"
    progress = [e for e in events if type(e).__name__ == "Progress"]
    assert [e.done for e in progress] == [1, 2, 3, 4] and progress[-1].eta_s == 0.0
    # each trial's own stages come wrapped, so a long trial shows its progress (paper/sweep --local)
    inner = [e for e in events if isinstance(e, sw.TrialEvent)]
    assert {e.index for e in inner} == {0, 1, 2, 3} and all(e.total == 4 for e in inner)
    assert any(type(e.event).__name__ == "Progress" and e.event.total for e in inner)
    first = inner[0].labelled()
    assert first.stage == f"trial 1/4: {inner[0].event.stage}" and type(first) is type(inner[0].event)

    for t, r in zip(spec.trials(), results):   # `replay` of each trial's own session file: the same run
        session = write(tmp_path, t.toml(), f"trial{t.index}.toml")
        assert cli.main(["replay", str(session), "--out", str(tmp_path / "r.json"), "--no-save", "--quiet"]) == 0
        (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
        assert scores(r.run) == scores(run), t.label
    capsys.readouterr()

    lines = [json.loads(x) for x in (out / sw.RESULTS_JSONL).read_text().splitlines()]
    assert len(lines) == 4
    replay_fields = {"method", "label", "params", "target_mode", "merge_factor", "forget", "retain", "composite",
                     "seconds", "eval_seconds", "report"}
    for t, line in zip(spec.trials(), lines):
        assert line["trial"] == t.values and line["hash"] == t.hash and line["status"] == "ok"
        assert replay_fields <= set(line) and line["baseline"]["composite"] is not None
        assert "items" not in line       # the generations live in the trial's record only
        record = json.loads((out / sw.TRIALS_DIR / f"{t.hash}.json").read_text())
        gens = record["items"]["forget"]
        assert len(gens) == t.values["forget"] and len({g["id"] for g in gens}) == len(gens)
        assert all(isinstance(g["generation"], str) and g["question"] for g in gens)
        assert len(record["items"]["retain"]) > 0
    with (out / sw.RESULTS_CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial.method"] for r in rows] == ["rome", "rome", "grace", "grace"]
    assert {"hash", "status", "error", "forget.rouge1", "retain.rouge1", "composite", "delta_composite",
            "seconds"} <= set(rows[0])
    assert float(rows[1]["composite"]) == pytest.approx(lines[1]["composite"])


def test_resume_skips_finished_trials(local_sweep, monkeypatch):
    spec, results, out, _ = local_sweep
    calls: list[str] = []
    real = sw.execute_trial

    def counting(text, path, label, **kw):
        calls.append(label)
        return real(text, path, label, **kw)

    monkeypatch.setattr(sw, "execute_trial", counting)
    again = sw.run_sweep(spec, out, backend="local")
    assert calls == [] and all(r.cached for r in again)
    assert [scores(r.run) for r in again] == [scores(r.run) for r in results]
    (out / sw.TRIALS_DIR / f"{spec.trials()[2].hash}.json").unlink()    # as if interrupted before trial 3 ended
    again = sw.run_sweep(spec, out, backend="local")
    assert len(calls) == 1 and [r.cached for r in again] == [True, True, False, True]
    assert scores(again[2].run) == scores(results[2].run)


def test_a_failing_trial_records_its_error_and_the_others_finish(tmp_path, capsys):
    text = SESSION + '[sweep]\nmethod = ["rome"]\n[sweep.params.rome]\nlayer = [1, 99]\n'
    out = tmp_path / "out"
    assert cli.main(["sweep", str(write(tmp_path, text)), "--out", str(out), "--local", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 trial(s) failed" in err
    ok, bad = [json.loads(x) for x in (out / sw.RESULTS_JSONL).read_text().splitlines()]
    assert ok["status"] == "ok" and ok["composite"] is not None
    assert bad["status"] == "error" and bad["trial"]["params.layer"] == 99 and "forget" not in bad
    assert "layer" in bad["error"] and "\n" not in bad["error"]
    assert sorted(f.name for f in (out / sw.TRIALS_DIR).iterdir()) == sorted([f"{ok['hash']}.json",
                                                                              f"{bad['hash']}.json"])


def test_without_ray_the_trials_run_in_this_process_and_it_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` raises ImportError
    text = SESSION + '[sweep]\nmethod = ["none"]\nmerge_factor = [1, 2]\n'
    assert cli.main(["sweep", str(write(tmp_path, text)), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: Ray is not installed (pip install 'unlearn-tui[ray]')" in captured.err
    assert "one after another in this process" in captured.err
    assert "unlearn-tui sweep" in captured.out and "merge_factor" in captured.out
    out = tmp_path / "out"
    assert cli.main(["sweep", str(write(tmp_path, text, "b.toml")), "--address", "ray://127.0.0.1:1",
                     "--out", str(out)]) == 2
    assert "--address: joining a Ray cluster needs Ray" in capsys.readouterr().err
    assert not out.exists()


def test_an_interrupted_sweep_resumes_where_it_stopped(local_sweep, tmp_path):
    spec, local, _, _ = local_sweep
    cancel = sw.CancelToken()

    def stop_after_the_second(e):
        if isinstance(e, sw.TrialFinished) and e.done == 2:
            cancel.cancel()

    with pytest.raises(sw.Cancelled):
        sw.run_sweep(spec, tmp_path / "out", stop_after_the_second, cancel=cancel, backend="local")
    assert len(list((tmp_path / "out" / sw.TRIALS_DIR).glob("*.json"))) == 2
    assert len((tmp_path / "out" / sw.RESULTS_JSONL).read_text().splitlines()) == 2
    results = sw.run_sweep(spec, tmp_path / "out", backend="local")
    assert [r.cached for r in results] == [True, True, False, False]
    assert [scores(r.run) for r in results] == [scores(r.run) for r in local]


def test_a_real_local_ray_gives_the_same_results_and_resumes(local_sweep, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'unlearn-tui[ray]'); "
                                            "the test extra installs it")
    spec, local, _, _ = local_sweep
    out = tmp_path / "out"
    sw.init_ray(num_cpus=2)       # one local cluster for both runs (run_sweep leaves a Ray it did not start running)
    try:
        events: list = []
        first = sw.run_sweep(spec, out, events.append, num_cpus=2)
        for t in spec.trials()[1:3]:            # as if interrupted before trials 2 and 3 ended
            (out / sw.TRIALS_DIR / f"{t.hash}.json").unlink()
        again = sw.run_sweep(spec, out, num_cpus=2)
    finally:
        ray.shutdown()
    assert events[0].backend == "ray" and [r.status for r in first] == ["ok"] * 4
    assert [scores(r.run) for r in first] == [scores(r.run) for r in local]      # = the sequential run = replay
    assert [r.cached for r in again] == [True, False, False, True]
    assert [scores(r.run) for r in again] == [scores(r.run) for r in local]
    pids = {r.pid for r in first}
    assert len(pids) <= 2 and os.getpid() not in pids                   # Ray's workers ran them
    loads = Counter(r.pid for r in first if r.loaded_model)
    assert all(n == 1 for n in loads.values())                          # a worker loads the model once ...
    assert sum(not r.loaded_model for r in first) >= 4 - len(pids)      # ... and reuses it for its next trials
    assert not any(r.loaded_model for r in again if r.pid in loads and not r.cached)   # ... in the next sweep too


@pytest.fixture(scope="module")
def local_sweep_2x3(tmp_path_factory):
    """The 2x3 sweep run one trial after another in this process (what sequential replays give)."""
    tmp = tmp_path_factory.mktemp("sweep2x3")
    spec = sw.load_sweep(write(tmp, SESSION + GRID_2X3))
    return spec, sw.run_sweep(spec, tmp / "out", backend="local")


def test_a_2x3_sweep_on_local_ray_is_interrupted_and_resumed_without_rerunning(local_sweep_2x3, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'unlearn-tui[ray]'); "
                                            "the test extra installs it")
    spec, local = local_sweep_2x3
    assert len(spec.trials()) == 6 and [r.status for r in local] == ["ok"] * 6
    out = tmp_path / "out"
    cancel = sw.CancelToken()

    def stop_after_two(e):
        if isinstance(e, sw.TrialFinished) and e.done == 2:
            cancel.cancel()

    sw.init_ray(num_cpus=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(sw.Cancelled):      # interrupted: the trials in flight are stopped
            sw.run_sweep(spec, out, stop_after_two, cancel=cancel, num_cpus=2)
        assert time.monotonic() - t0 < sw.CANCEL_GRACE_S      # they stopped themselves (no forced cancel)
        finished = {p.stem for p in (out / sw.TRIALS_DIR).glob("*.json")}
        assert 2 <= len(finished) < 6
        again = sw.run_sweep(spec, out, num_cpus=2)
    finally:
        ray.shutdown()
    assert [r.cached for r in again] == [t.hash in finished for t in spec.trials()]   # finished ones not re-run
    assert [r.status for r in again] == ["ok"] * 6
    assert [scores(r.run) for r in again] == [scores(r.run) for r in local]           # = the sequential run
    lines = (out / sw.RESULTS_JSONL).read_text().splitlines()
    assert sorted(json.loads(x)["hash"] for x in lines) == sorted(t.hash for t in spec.trials())


def test_sweep_help_and_loading_import_neither_torch_textual_nor_ray(tmp_path):
    import subprocess

    path = write(tmp_path, SESSION + GRID)
    code = ("import sys\nfrom unlearn_tui.tui import cli\ntry:\n    cli.main(['sweep', '--help'])\nexcept SystemExit:\n"
            "    pass\nfrom unlearn_tui.sessions import sweep\nassert len(sweep.load_sweep(sys.argv[1]).trials()) == 4\n"
            "bad = [m for m in ('torch', 'textual', 'ray') if m in sys.modules]\nassert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--address" in proc.stdout and "--out" in proc.stdout


class _FakeRay:
    """What the cancel path uses of ``ray``: named actors (the flag), ``wait`` and ``cancel``."""

    def __init__(self, flag_after: float | None = None, done_at: dict | None = None):
        self.t0, self.flag_after, self.done_at = time.monotonic(), flag_after, done_at or {}
        self.lookups, self.cancelled, self.actors = 0, [], {}

    def get_actor(self, name):
        self.lookups += 1
        if name in self.actors or (self.flag_after is not None and time.monotonic() - self.t0 >= self.flag_after):
            return object()
        raise ValueError(f"Failed to look up actor with name '{name}'")

    def remote(self, num_cpus=None):
        fake = self

        class Actor:
            def options(self, name):
                class Handle:
                    def remote(self):
                        fake.actors[name] = True
                        return name
                return Handle()
        return lambda cls: Actor()

    def wait(self, refs, num_returns=1, timeout=None):
        time.sleep(0.05)
        now = time.monotonic() - self.t0
        return [r for r in refs if self.done_at.get(r) is not None and now >= self.done_at[r]][:num_returns], []

    def cancel(self, ref, force=False):
        self.cancelled.append((ref, force))


def test_a_trial_watches_the_sweeps_cancel_flag(monkeypatch):
    """The cooperative cancel: the watcher cancels the trial's own token soon after the flag actor exists
    (and when it cannot be looked up); a trial whose flag is already set never starts."""
    import threading

    fake = _FakeRay(flag_after=0.3)
    monkeypatch.setitem(sys.modules, "ray", fake)
    token, stop = sw.CancelToken(), threading.Event()
    watcher = threading.Thread(target=sw._watch, args=("f", token, stop))
    watcher.start()
    watcher.join(timeout=5)
    assert token.cancelled and not watcher.is_alive() and fake.lookups >= 1
    quiet = _FakeRay(flag_after=None)
    monkeypatch.setitem(sys.modules, "ray", quiet)
    token, stop = sw.CancelToken(), threading.Event()
    watcher = threading.Thread(target=sw._watch, args=("f", token, stop))
    watcher.start()
    time.sleep(4 * sw.CANCEL_POLL_S)
    stop.set()
    watcher.join(timeout=5)
    assert not token.cancelled and quiet.lookups >= 2 and not watcher.is_alive()

    def unreadable(name):
        raise ConnectionError("the driver is gone")

    quiet.get_actor = unreadable
    token = sw.CancelToken()
    sw._watch("f", token, threading.Event())
    assert token.cancelled
    monkeypatch.setitem(sys.modules, "ray", _FakeRay(flag_after=0.0))
    monkeypatch.setattr(sw, "execute_trial", lambda *a, **k: pytest.fail("a cancelled sweep started a trial"))
    with pytest.raises(sw.Cancelled):
        sw._ray_trial("", None, "t", 1, "f")


def test_stopping_trials_waits_for_them_and_forces_only_the_stuck(monkeypatch):
    """Stopping creates the flag actor; trials that return (stopped, or finished: kept) are collected; only
    one still running after the grace period is force-cancelled."""
    monkeypatch.setattr(sw, "CANCEL_GRACE_S", 1.0)
    fake = _FakeRay(done_at={"stops": 0.2, "finishes": 0.4, "stuck": None})
    refs = {"stops": 1, "finishes": 2, "stuck": 3}
    collected = []

    def collect(ref, stopping=False):
        collected.append((refs.pop(ref), stopping))

    flag = sw._stop_trials(fake, "the-flag", refs, collect)
    assert flag == "the-flag" and sw._flag_is_set(fake, "the-flag") and not sw._flag_is_set(fake, "other")
    assert sorted(collected) == [(1, True), (2, True)]
    assert fake.cancelled == [("stuck", True)] and time.monotonic() - fake.t0 >= 1.0
