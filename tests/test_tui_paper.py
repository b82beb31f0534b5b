"""The paper's results in the app (tui/screens/paper.py): ``load_paper_report`` checks a ``paper --out``
folder's paper.json (one UserError line otherwise), the PaperScreen shows every table and setting as a
DataTable (the unedited baseline first), the composite bars and the figures as terminal plots, Escape / q
close it; F10 in the app and ``unlearn-tui paper --view --out DIR`` open it.  No model, no data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from unlearn_tui.sessions.paper import TABLE1_COLUMNS, TABLE2_COLUMNS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T1, T2 = TABLE1_COLUMNS[1:], TABLE2_COLUMNS[1:]


def _scores(cols: tuple[str, ...], start: float) -> dict[str, float]:
    """Distinct values per column: start, start + 0.01, ... (composite last)."""
    return {c: round(start + 0.01 * i, 4) for i, c in enumerate(cols)}


def _point(x: int, composite: float | None, status: str = "ok") -> dict:
    return {"x": x, "forget R1": 0.2, "retain R1": 0.8, "rephrase R1": 0.3, "composite": composite,
            "status": status, "error": None if status == "ok" else "boom"}


def report() -> dict:
    """A small report in paper.json's shape (sessions/paper.py: write_outputs, tables(), figures())."""
    base1 = {**_scores(T1, 0.5), "rephrase R1": 0.7, "rephrase Prob": 0.4, "rephrase MRR": 0.6, "rephrase Hit": 0.9,
             "composite": 1.0}
    info = {"setting": "factual", "forget": 4, "retain": 10, "rephrase": 4, "baseline": base1, "items": 14,
            "known": 12, "paraphrases_left_out": 0, "finetune": None}
    rome = {"method": "rome", **_scores(T1, 0.1), "composite": 1.8, "merge_factor": 1, "status": "ok", "error": None,
            "refused": 0.0}
    gd = {"method": "gd", **{c: None for c in T1}, "merge_factor": 1, "status": "error",
          "error": "CUDA out of memory\n(tried 2 GiB)", "refused": None}
    pistol_info = {"setting": "pistol", "forget": 2, "retain": 10, "rephrase": None, "baseline": None, "items": 12,
                   "known": None, "paraphrases_left_out": 0, "finetune": {"items": 12, "epochs": 2}}
    return {
        "format": 1, "model": "tiny:llama", "config": {"model": "tiny:llama", "quick": True},
        "plan": {"table1": 3, "total": 7}, "trials": {"total": 7, "ran": 7, "cached": 0, "failed": 1},
        "tables": {
            "table1": {"factual": {"info": info, "rows": [rome, gd]},
                       "pistol": {"info": pistol_info, "rows": [dict(rome, composite=1.25)]}},
            "table2": {"factual": {"info": info, "rows": [{"method": "rome", **_scores(T2, 0.3), "status": "ok",
                                                            "error": None}]}},
        },
        "figures": {
            "figure4": {"xlabel": "forget samples", "x": [2, 4],
                        "series": {"rome": [_point(2, 1.5), None], "gd": [_point(2, 1.1), _point(4, 1.2)]},
                        "baseline": [1.0, 0.98], "info": info},
            "figure6": {"xlabel": "merge factor (4 forget)", "x": [1, 2, 5],
                        "series": {"rome": [_point(1, 1.4), _point(2, 1.3), _point(5, None, "error")]},
                        "baseline": [1.0, 1.0, 1.0], "info": info},
        },
        "skipped": [], "runs": [], "png": False,
    }


@pytest.fixture
def paper_dir(tmp_path: Path) -> Path:
    out = tmp_path / "paper-results"
    out.mkdir()
    (out / "paper.json").write_text(json.dumps(report(), indent=1) + "\n")
    return out


def rows_of(table) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


# ------------------------------------------------------------------ load_paper_report
def test_load_paper_report_reads_a_folder_or_its_file(paper_dir):
    from unlearn_tui.tui.screens.paper import load_paper_report

    assert load_paper_report(paper_dir) == report()
    assert load_paper_report(paper_dir / "paper.json") == report()


def _bad(tmp: Path, name: str) -> Path:
    if name == "missing folder":
        return tmp / "nowhere"
    if name == "folder without paper.json":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    p = tmp / "paper.json"
    r = report()
    if name == "not JSON":
        p.write_text("# paper\n| a | b |\n")
    elif name == "not UTF-8":
        p.write_bytes(b"\xff\xfe{\x00")
    elif name == "a list":
        p.write_text("[1, 2]")
    elif name == "wrong format":
        p.write_text(json.dumps({**r, "format": 99}))
    elif name == "format true":
        p.write_text(json.dumps({**r, "format": True}))
    elif name == "rows not a list":
        r["tables"]["table1"]["factual"]["rows"] = {"rome": 1}
        p.write_text(json.dumps(r))
    elif name == "row without method":
        r["tables"]["table2"]["factual"]["rows"][0].pop("method")
        p.write_text(json.dumps(r))
    elif name == "unknown table":
        r["tables"]["table9"] = {}
        p.write_text(json.dumps(r))
    elif name == "series shorter than x":
        r["figures"]["figure6"]["series"]["rome"].pop()
        p.write_text(json.dumps(r))
    elif name == "nothing to show":
        p.write_text(json.dumps({"format": 1, "tables": {"table1": {}}, "figures": {}}))
    return p


@pytest.mark.parametrize("name, says", [
    ("missing folder", "not found"), ("folder without paper.json", "no paper.json in this folder"),
    ("not JSON", "not JSON"), ("not UTF-8", "not UTF-8"), ("a list", "expected an object"),
    ("wrong format", "format: expected 1"), ("format true", "format: expected 1"),
    ("rows not a list", "tables.table1.factual.rows: expected a list"),
    ("row without method", "tables.table2.factual.rows[0].method"), ("unknown table", "tables.table9"),
    ("series shorter than x", "figures.figure6.series.rome: expected a list of 3"),
    ("nothing to show", "at least one table or figure"),
])
def test_load_paper_report_bad_input_is_one_user_error_line(tmp_path, name, says):
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.tui.screens.paper import load_paper_report

    path = _bad(tmp_path, name)
    with pytest.raises(UserError) as exc:
        load_paper_report(path)
    text = str(exc.value)
    assert "\n" not in text and says in text, text
    assert str(path) in text                      # names the file (or the folder)


@pytest.mark.anyio
async def test_a_report_built_by_sessions_paper_loads_and_shows(tmp_path):
    """tables()/figures() of a real PaperResult (fake trial results, no model) in paper.json's JSON."""
    from textual.widgets import DataTable

    from unlearn_tui.sessions import paper as pp
    from unlearn_tui.sessions import sweep as sw
    from unlearn_tui.tui.screens.paper import PaperApp, load_paper_report

    cfg = pp.PaperConfig(tables=(1, 2), figures=(4, 6), settings=("factual",), methods=("rome", "gd"),
                         forget_sizes=(2, 4), merge_factors=(1, 2), quick=True)
    ids = [f"author-{i:03d}" for i in range(1, 13)]
    prep = pp.Prepared("factual", Path("f.jsonl"), "jsonl", 12, ids, ids)
    split = {"rouge1": 0.2, "probability": 0.3, "mrr": 0.4, "top_hit": 0.5}
    run = {"forget": split, "retain": {**split, "rouge1": 0.9}, "rephrase": split, "composite": 1.7}
    baseline = {"forget": {**split, "rouge1": 0.95}, "retain": {**split, "rouge1": 0.9}, "composite": 0.95}
    points = pp.plan(cfg)
    results, by_hash = [], {}
    for i, p in enumerate(points):
        h = f"h{i}"
        by_hash[h] = p
        ok = p.method == "rome"
        results.append(sw.TrialResult(sw.Trial(i, {}, None, h), "ok" if ok else "error",
                                      None if ok else "diverged", run if ok else None, baseline))
    res = pp.PaperResult(points, results, by_hash, {"factual": prep}, [])
    (tmp_path / "paper.json").write_text(json.dumps({"format": pp.PAPER_FORMAT, "model": cfg.model,
                                                     "tables": pp.tables(cfg, res), "figures": pp.figures(cfg, res)}))
    r = load_paper_report(tmp_path)
    assert r["figures"]["figure6"]["series"]["rome"][0]["composite"] == 1.7
    app = PaperApp(tmp_path, r)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        t1 = rows_of(app.screen.query_one("#paper-table1-factual", DataTable))
        assert [row[0] for row in t1] == ["unedited (baseline)", "gd", "rome"]       # the paper's order
        assert t1[0][1] == "0.950" and t1[0][-2:] == ["0.950", "baseline"]
        assert t1[1][-1] == "failed: diverged" and t1[2][-2:] == ["1.700", "ok"]
        assert app.screen.plotted["paper-figure4"]["series"]["gd"] == [None, None]           # failed runs
        assert app.screen.plotted["paper-figure6"]["series"]["rome"] == [1.7, 1.7]
        assert app.screen.plotted["paper-figure6"]["series"]["unedited"] == [0.95, 0.95]
        assert app.screen.plotted["paper-bars-factual"]["labels"] == ["rome"]


# ------------------------------------------------------------------ the screen
@pytest.mark.anyio
async def test_paper_screen_shows_tables_bars_and_figures(paper_dir):
    from textual.widgets import DataTable, Static
    from textual_plotext import PlotextPlot

    from unlearn_tui.tui.screens.paper import PaperApp, PaperScreen

    app = PaperApp(paper_dir)
    async with app.run_test(size=(140, 50)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, PaperScreen)
        tables = {t.id: t for t in screen.query(DataTable)}
        assert set(tables) == {"paper-table1-factual", "paper-table1-pistol", "paper-table2-factual"}

        t1 = tables["paper-table1-factual"]
        assert [str(c.label) for c in t1.ordered_columns][:2] == ["method", "forget R1 ↓"]
        assert [str(c.label) for c in t1.ordered_columns][-2:] == ["composite ↑", "status"]
        rows = rows_of(t1)
        assert [r[0] for r in rows] == ["unedited (baseline)", "rome", "gd"]
        assert rows[0][1:] == ["0.500", "0.510", "0.520", "0.530", "0.540", "0.550", "0.560", "0.570", "1.000",
                               "baseline"]
        assert rows[1][1] == "0.100" and rows[1][-2:] == ["1.800", "ok"]
        assert rows[2][1:-1] == ["—"] * len(T1)                               # a failed row: no numbers...
        assert rows[2][-1] == "failed: CUDA out of memory (tried 2 GiB)"   # ...its error, on one line
        assert rows_of(tables["paper-table1-pistol"])[0] == ["unedited (baseline)", *["—"] * len(T1),
                                                             "not measured"]
        t2 = rows_of(tables["paper-table2-factual"])
        assert t2[0][1:] == ["0.700", "0.400", "0.600", "0.900", "1.000", "baseline"]
        assert t2[1][:2] == ["rome", "0.300"]

        captions = [str(s.render()) for s in screen.query(".paper-caption").results(Static)]
        assert any("model tiny:llama" in c and "4 forget / 10 retain" in c and "composite 1.000" in c
                   for c in captions)
        assert any("2 forget / 10 retain" in c and "not measured" in c for c in captions)

        plots = {p.id: p for p in screen.query(PlotextPlot)}
        assert set(plots) == {"paper-bars-factual", "paper-bars-pistol", "paper-figure4", "paper-figure6"}
        bars = screen.plotted["paper-bars-factual"]
        assert bars["labels"] == ["rome"] and bars["values"] == [1.8] and bars["baseline"] == 1.0
        assert "unedited 1.000" in bars["title"] and "no composite: gd" in bars["title"]
        assert screen.plotted["paper-bars-pistol"]["values"] == [1.25]
        f4 = screen.plotted["paper-figure4"]
        assert f4["x"] == [2, 4] and f4["xlabel"] == "forget samples"
        assert f4["series"] == {"unedited": [1.0, 0.98], "rome": [1.5, None], "gd": [1.1, 1.2]}
        assert screen.plotted["paper-figure6"]["series"]["rome"] == [1.4, 1.3, None]
        for pid in ("paper-bars-factual", "paper-figure6"):     # plotext draws them (title included)
            drawn = plots[pid].render().plain
            assert ("unedited 1.000" if pid.startswith("paper-bars") else "Figure 6") in drawn

        await pilot.press("escape")
        await pilot.pause()
    assert app.return_value == 0                 # closing the screen ends `paper --view`'s app


# ------------------------------------------------------------------ the app: F10
@pytest.mark.anyio
async def test_f10_opens_the_results_q_closes_and_a_bad_file_is_an_error_line(paper_dir, tmp_path):
    from textual.widgets import Input

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.dialogs import PathDialog
    from unlearn_tui.tui.screens.paper import PaperScreen
    from unlearn_tui.tui.settings import Settings

    bad = tmp_path / "notes.json"
    bad.write_text("not json")
    app = create_app(settings=Settings(autosave_seconds=3600), autostart=False, restore=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        main = app.screen
        await pilot.press("f10")
        await pilot.pause()
        assert isinstance(app.screen, PathDialog)
        app.screen.query_one("#path-input", Input).value = str(paper_dir)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, PaperScreen) and app.screen.path == paper_dir / "paper.json"
        await pilot.press("q")
        await pilot.pause()
        assert app.screen is main

        await pilot.press("f10")
        await pilot.pause()
        app.screen.query_one("#path-input", Input).value = str(bad)
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is main                          # no screen, one error line
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1 and "\n" not in errors[0] and str(bad) in errors[0] and "not JSON" in errors[0]


def test_the_action_is_in_the_registry_with_its_key():
    from unlearn_tui.tui import actions
    from unlearn_tui.tui.app import UnlearnApp

    a = actions.BY_ID["paper_results"]
    assert (a.key, a.action, a.scope, a.show) == ("f10", "paper_results", "app", False)
    assert [x.id for x in actions.ACTIONS if "f10" in x.key.split(",")] == ["paper_results"]
    assert any(b.id == "unlearn.paper_results" and b.key == "f10" for b in UnlearnApp.BINDINGS)
    assert callable(getattr(UnlearnApp, "action_paper_results", None))


# ------------------------------------------------------------------ unlearn-tui paper --view
def test_view_of_a_missing_or_bad_folder_is_one_line_exit_2(tmp_path, capsys):
    from unlearn_tui.tui import cli

    missing = tmp_path / "missing"
    assert cli.main(["paper", "--view", "--out", f"{missing}/"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unlearn-tui: error: ") and "\n" not in err and str(missing) in err
    assert not missing.exists()                            # nothing run, nothing written
    (tmp_path / "paper.json").write_text('{"format": 1, "tables": []}')
    assert cli.main(["paper", "--view", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tables: expected an object" in err


def test_view_opens_the_paper_app_on_the_folder(paper_dir, monkeypatch):
    from unlearn_tui.tui import cli
    from unlearn_tui.tui.screens import paper as screen

    seen: list = []
    monkeypatch.setattr(screen.PaperApp, "run", lambda self, **kw: seen.append((self.path, self.report)) or 0)
    assert cli.main(["paper", "--view", "--out", str(paper_dir)]) == 0
    assert seen == [(paper_dir, report())]


def test_view_imports_no_torch(tmp_path):
    code = ("import sys\nfrom unlearn_tui.tui.cli import main\n"
            f"rc = main(['paper', '--view', '--out', {str(tmp_path / 'missing')!r}])\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
            "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "unlearn-tui: error:" in p.stderr
