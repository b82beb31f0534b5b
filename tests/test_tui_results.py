"""The Results pane: baseline row and deltas, legend, column chooser, fitting headers, sideways scrolling,
results kept beside the session across quit + reopen, a row per step-mode state, the A/B view, the charts,
and CSV/SVG export.  Models: none (hand-made results) or ``tiny:llama``."""

from __future__ import annotations

import csv
import io
import json

import pytest

pytest.importorskip("textual")

from test_tui_flow import ITEMS, press_job, settings, wait_idle, write_session  # noqa: E402


@pytest.fixture
def slow():
    """The slow test method of test_tui_flow (registered when that module is imported)."""
    from unlearn_tui.backends import methods

    methods.add_module("slow-test", "test_tui_flow")
    yield "slow-test"
    methods._MODULES.pop("slow-test", None)


def fake_results(base_forget: float = 1.0):
    from unlearn_tui.backends.metrics import EvalResult, ItemScore, SplitScores
    from unlearn_tui.backends.runner import RunResult

    def ev(f1: float, r1: float, gen_f: str, gen_r: str, refused: float = 0.0) -> EvalResult:
        return EvalResult({
            "forget": SplitScores("forget", [
                ItemScore("q1", ITEMS[0]["question"], "Paris", gen_f, f1, 0.2 * f1, 0.5 * f1, f1,
                          extra={"refused": refused}),
                ItemScore("q2", ITEMS[1]["question"], "Shakespeare", gen_f + " (q2)", f1, 0.1, 0.2, 0.0,
                          extra={"refused": refused})]),
            "retain": SplitScores("retain", [
                ItemScore("q3", ITEMS[2]["question"], "Jupiter", gen_r, r1, 0.6, 0.7, 1.0),
                ItemScore("q4", ITEMS[3]["question"], "blue", gen_r, r1, 0.5, 0.6, 1.0)]),
        })

    base = ev(base_forget, 1.0, "Paris, of course.", "Jupiter.")
    runs = [RunResult(0, "ike", "ike", {"k": 4}, "idk", 1, ev(0.0, 1.0, "I'm not sure.", "Jupiter.", 1.0), 0.5, 1.0),
            RunResult(1, "none", "none", {}, "idk", 1, ev(base_forget, 1.0, "Paris, of course.", "Jupiter."),
                      0.01, 1.0)]
    return base, runs


def make_app(tmp_path, base_forget: float = 1.0, session=None):
    from unlearn_tui.backends import data
    from unlearn_tui.tui.app import create_app

    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    session = session or write_session(tmp_path, p, "ike")
    app = create_app(session, settings=settings(), autostart=False, restore=False)
    app.workspace.items = data.load_items(str(p))
    app.workspace.normalize_selection()
    if base_forget is not None:
        app.workspace.baseline_eval, app.workspace.results = fake_results(base_forget)
    return app


async def results_pane(pilot):
    app = pilot.app
    for _ in range(1500):                  # 30 s: a pane that never mounts fails the test instead of hanging
        if app.pane("results") is not None:
            break
        await pilot.pause(0.02)
    assert app.pane("results") is not None, "the results pane never mounted"
    app.refresh_panes()
    app.action_show_tab("results")
    await pilot.pause()
    return app.pane("results")


def cells(table, row: int) -> list[str]:
    return [str(c) for c in table.get_row_at(row)]


def column_labels(table) -> dict[str, str]:
    return {str(k.value): str(c.label) for k, c in table.columns.items()}


# ------------------------------------------------------------------ rows, deltas, legend
def test_entries_have_a_baseline_first_and_deltas_against_it():
    from unlearn_tui.tui.results_store import StepRow, baseline_note, entries

    base, runs = fake_results()
    step = StepRow("step", 1, 2, "rome", {"forget": 0.5, "retain": 1.0})
    items = entries(base, runs, [step])
    assert [e.kind for e in items] == ["baseline", "run", "run", "step"]
    assert [e.num for e in items] == ["B", "1", "2", "s1"]
    ike = items[1]
    assert ike.values["composite"] == pytest.approx(2.0)
    assert ike.values["delta.composite"] == pytest.approx(1.0)          # 2.0 - the baseline's 1.0
    assert ike.values["delta.forget.rouge1"] == pytest.approx(-1.0)
    assert ike.values["forget.refused"] == pytest.approx(1.0)           # refusal rate, from the item extras
    assert items[3].values["composite"] == pytest.approx(1.5) and items[3].values["delta.composite"] == 0.5
    assert baseline_note(items) == ""
    # a model that knows nothing: the composite reads as perfect, the note says why it is not
    base0, runs0 = fake_results(base_forget=0.0)
    note = baseline_note(entries(base0, runs0, []))
    assert "hardly knows" in note and "Δcomp" in note


@pytest.mark.anyio
async def test_baseline_row_deltas_legend_and_the_random_model_warning(tmp_path):
    from textual.widgets import DataTable, Static

    app = make_app(tmp_path, base_forget=0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        pane = await results_pane(pilot)
        t = app.screen.query_one("#rs-table", DataTable)
        assert t.row_count == 3
        labels = column_labels(t)
        assert labels["composite"] == "comp↑" and labels["delta.composite"] == "Δcomp↑"
        assert labels["forget.rouge1"] == "forget R1↓" and labels["retain.rouge1"] == "retain R1↑"
        assert labels["forget.refused"] == "refusal↑"             # refusal rate shown (the rows have it)
        assert "WISE" not in " ".join(labels.values())           # no WISE run: no routing column by default
        base = dict(zip(labels, cells(t, 0)))
        assert base["n"] == "B" and base["label"] == "baseline" and base["composite"] == "2.000"
        none = dict(zip(labels, cells(t, 2)))
        assert none["composite"] == "2.000" and none["delta.composite"] == "+0.000"
        legend = str(app.screen.query_one("#rs-legend", Static).render())
        assert "↑ higher is better" in legend and "↓ lower is better" in legend and "R1 ROUGE-1" in legend
        note = str(app.screen.query_one("#rs-note", Static).render())
        assert "hardly knows" in note
        # the Δ view: every cell minus the baseline
        await pilot.press("d")
        await pilot.pause()
        ike = dict(zip(labels, cells(t, 1)))
        assert pane.deltas and ike["forget.rouge1"] == "+0.000" and ike["retain.rouge1"] == "+0.000"
        assert "Δ view" in str(app.screen.query_one("#rs-legend", Static).render())
        await pilot.press("d")
        await pilot.pause()
        assert dict(zip(labels, cells(t, 1)))["forget.rouge1"] == "0.000"


@pytest.mark.anyio
async def test_wise_routing_column_appears_when_a_run_has_routing(tmp_path):
    from textual.widgets import DataTable

    app = make_app(tmp_path)
    for s in app.workspace.results[0].eval.splits["forget"].items:
        s.extra.update({"wise_route": "side", "wise_side": 1.0})
    async with app.run_test(size=(120, 40)) as pilot:
        await results_pane(pilot)
        t = app.screen.query_one("#rs-table", DataTable)
        labels = column_labels(t)
        assert labels["forget.wise_side"] == "WISE fgt side↑"
        assert dict(zip(labels, cells(t, 1)))["forget.wise_side"] == "1.000"


@pytest.mark.anyio
async def test_column_chooser_hides_and_shows_columns(tmp_path):
    from textual.widgets import DataTable, SelectionList

    from unlearn_tui.tui.screens.columns import ColumnChooser

    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        pane = await results_pane(pilot)
        t = app.screen.query_one("#rs-table", DataTable)
        assert "forget.mrr" in column_labels(t)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ColumnChooser)
        sl = app.screen.query_one("#columns-list", SelectionList)
        sl.deselect("forget.mrr")
        sl.select("retain.probability")
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, ColumnChooser)
        labels = column_labels(t)
        assert "forget.mrr" not in labels and labels["retain.probability"] == "ret P↑"
        assert pane.choice is not None and "forget.mrr" not in pane.choice
        # esc: nothing changes
        await pilot.press("c")
        await pilot.pause()
        app.screen.query_one("#columns-list", SelectionList).deselect_all()
        await pilot.press("escape")
        await pilot.pause()
        assert "retain.probability" in column_labels(t)


@pytest.mark.anyio
@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
async def test_no_header_label_is_cut_and_the_table_scrolls_sideways(tmp_path, size):
    from rich.cells import cell_len
    from textual.widgets import DataTable

    from unlearn_tui.tui.results_store import COLUMNS

    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        pane = await results_pane(pilot)
        pane.set_columns([c.key for c in COLUMNS])          # every column: wider than any pane
        await pilot.pause()
        for table_id in ("#rs-table", "#rs-items"):
            t = app.screen.query_one(table_id, DataTable)
            for col in t.columns.values():
                inner = col.get_render_width(t) - 2 * t.cell_padding
                assert inner >= cell_len(str(col.label)), (table_id, str(col.label), inner)
        t = app.screen.query_one("#rs-table", DataTable)
        assert t.max_scroll_x > 0                          # wider than the pane: it scrolls
        t.focus()
        await pilot.press("right", "right", "right")
        await pilot.pause()
        assert t.scroll_x > 0


# ------------------------------------------------------------------ A/B, charts, export
@pytest.mark.anyio
async def test_ab_view_shows_both_generations_of_one_item_side_by_side(tmp_path):
    from textual.widgets import DataTable, Static

    from unlearn_tui.tui.screens.compare import CompareScreen

    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await results_pane(pilot)
        t = app.screen.query_one("#rs-table", DataTable)
        t.move_cursor(row=1)                           # run 1 (ike)
        await pilot.pause()
        await pilot.press("a")
        await pilot.pause()
        scr = app.screen
        assert isinstance(scr, CompareScreen) and (scr.a, scr.b) == ("base", "r0")
        items = scr.query_one("#ab-items", DataTable)
        assert items.row_count == 4
        a = str(scr.query_one("#ab-a", Static).render())
        b = str(scr.query_one("#ab-b", Static).render())
        assert "Paris, of course." in a and "I'm not sure." in b
        assert "A: B baseline" in scr.query_one("#ab-a", Static).border_title
        assert "B: 1 ike" in scr.query_one("#ab-b", Static).border_title
        items.move_cursor(row=1)                       # q2
        await pilot.pause()
        assert "(q2)" in str(scr.query_one("#ab-b", Static).render())
        assert "Hamlet" in str(scr.query_one("#ab-question", Static).render())
        await pilot.press("s")                         # swap
        await pilot.pause()
        assert (scr.a, scr.b) == ("r0", "base")
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, CompareScreen)


@pytest.mark.anyio
async def test_charts_show_split_bars_and_the_radar(tmp_path):
    from textual.widgets import ContentSwitcher, Static

    app = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await results_pane(pilot)
        await pilot.press("g")
        await pilot.pause()
        assert app.screen.query_one("#rs-switch", ContentSwitcher).current == "rs-charts"
        bars = str(app.screen.query_one("#rs-bars", Static).render())
        assert "forget R1 ↓" in bars and "retain R1 ↑" in bars and "1:ike" in bars and "baseline" in bars
        radar = str(app.screen.query_one("#rs-radar", Static).render())
        assert "radar" in radar and "forget 1−R1" in radar and "●" in radar and "◆" in radar
        await pilot.press("g")
        await pilot.pause()
        assert app.screen.query_one("#rs-switch", ContentSwitcher).current == "rs-answers"


@pytest.mark.anyio
async def test_export_writes_csv_and_svg_beside_the_session(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await results_pane(pilot)
        await pilot.press("x")
        await pilot.pause()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "session.results.csv").read_text())))
    assert [r["row"] for r in rows] == ["B", "1", "2"]
    assert rows[0]["kind"] == "baseline" and rows[1]["label"] == "ike"
    assert float(rows[1]["composite (↑)"]) == pytest.approx(2.0)
    assert float(rows[1]["forget.rouge1 (↓)"]) == 0.0 and float(rows[1]["delta.forget.rouge1"]) == -1.0
    for name in ("session.bars.svg", "session.radar.svg"):
        svg = (tmp_path / name).read_text()
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
        import xml.dom.minidom

        xml.dom.minidom.parseString(svg)               # well-formed
        assert "1:ike" in svg and "baseline" in svg
    assert "<rect" in (tmp_path / "session.bars.svg").read_text()
    assert "<polygon" in (tmp_path / "session.radar.svg").read_text()


def test_png_export_says_how_to_get_it_when_matplotlib_is_missing(tmp_path, monkeypatch):
    from unlearn_tui.tui import export

    monkeypatch.setattr(export, "png_available", lambda: False)
    from unlearn_tui.tui.results_store import entries

    items = entries(*fake_results(), [])
    with pytest.raises(export.PngUnavailable, match="pip install matplotlib"):
        export.write_png(items, "bars", tmp_path / "x.png")
    written, note = export.export_all(items, tmp_path, "s")
    assert {p.name for p in written} == {"s.results.csv", "s.bars.svg", "s.radar.svg"}
    assert "pip install matplotlib" in note


# ------------------------------------------------------------------ the results file
def test_results_file_round_trip(tmp_path):
    from unlearn_tui import sessions
    from unlearn_tui.tui import results_store as rs

    base, runs = fake_results()
    steps = [rs.StepRow("undo", 0, 2, "rome", {"forget": 1.0, "retain": 1.0}, ["q", "a", "b"])]
    s = sessions.new_session(path=tmp_path / "exp.toml")
    path = rs.write(s, base, runs, steps)
    assert path == tmp_path / "exp.results.json"
    b2, r2, s2 = rs.loads(path.read_text())
    assert b2.summary() == base.summary() and [r.eval.summary() for r in r2] == [r.eval.summary() for r in runs]
    assert [(r.label, r.params, r.seconds) for r in r2] == [(r.label, r.params, r.seconds) for r in runs]
    assert s2 == steps
    assert r2[0].eval.splits["forget"].items[0].generation == "I'm not sure."
    # the session key points elsewhere: that file is read
    s.eval.results = "elsewhere.json"
    assert rs.results_path(s) == tmp_path / "elsewhere.json"
    stored, note = rs.read(s)
    assert stored is None and "not found" in note
    (tmp_path / "elsewhere.json").write_text("{not json")
    stored, note = rs.read(s)
    assert stored is None and "cannot be read" in note


def test_session_results_key_round_trips(tmp_path):
    from unlearn_tui import sessions

    p = tmp_path / "s.toml"
    p.write_text('# mine\nversion = 1\n\n[eval]\nmax_new_tokens = 4  # short\n', encoding="utf-8")
    s = sessions.load(p)
    assert s.eval.results is None and "results" not in sessions.dumps(s)
    s.eval.results = "s.results.json"
    text = sessions.dumps(s)
    assert 'results = "s.results.json"' in text and "# mine" in text and "# short" in text
    sessions.save(s)
    again = sessions.load(p)
    assert again.eval.results == "s.results.json" and sessions.dumps(again) == text
    p.write_text('version = 1\n[eval]\nresults = 3\n', encoding="utf-8")
    from unlearn_tui.backends.errors import UserError

    with pytest.raises(UserError, match="eval.results"):
        sessions.load(p)


@pytest.mark.anyio
async def test_results_survive_quit_and_reopen(tmp_path):
    from textual.widgets import DataTable, Static

    from unlearn_tui import sessions
    from unlearn_tui.tui.app import create_app

    app = make_app(tmp_path)
    session_file = tmp_path / "session.toml"
    async with app.run_test(size=(100, 30)) as pilot:
        await results_pane(pilot)
        assert app.file_actions.save_to(None)
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert sessions.load(session_file).eval.results == "session.results.json"
    assert (tmp_path / "session.results.json").is_file()

    app2 = create_app(session_file, settings=settings(), autostart=False, restore=False)
    async with app2.run_test(size=(100, 30)) as pilot:
        await results_pane(pilot)
        assert not app2.workspace.dirty
        t = app2.screen.query_one("#rs-table", DataTable)
        assert t.row_count == 3
        assert [cells(t, i)[1] for i in range(3)] == ["baseline", "ike", "none"]
        assert "stored row(s) from session.results.json" in str(app2.screen.query_one("#rs-note", Static).render())
        # the drill-down of a stored run has its answers
        t.move_cursor(row=1)
        await pilot.pause()
        d = app2.screen.query_one("#rs-items", DataTable)
        assert d.row_count == 4 and "I'm not sure." in cells(d, 0)


# ------------------------------------------------------------------ the engine: runs and step mode (tiny:llama)
@pytest.mark.anyio
async def test_run_and_steps_land_rows_and_are_stored(tmp_path, llama_handle, slow):
    from textual.widgets import DataTable

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.results_store import loads

    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    session = write_session(tmp_path, p, slow, extra="params = { steps = 2, delay = 0.0 }\n")
    app = create_app(session, handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await press_job(pilot, app, "run", "ctrl+r")
        await press_job(pilot, app, "step", "ctrl+t")
        await press_job(pilot, app, "undo", "ctrl+z")
        await press_job(pilot, app, "redo", "ctrl+y")
        await results_pane(pilot)
        t = app.screen.query_one("#rs-table", DataTable)
        rows = [cells(t, i) for i in range(t.row_count)]
        assert [r[0] for r in rows] == ["B", "1", "s1", "s2", "s3"]
        assert rows[2][1].startswith("step 1/") and rows[3][1].startswith("undo 0/")
        assert rows[4][1].startswith("redo 1/")
        labels = list(column_labels(t))
        fr1 = labels.index("forget.rouge1")
        assert all(r[fr1] != "—" for r in rows)           # every state has its forget ROUGE-1
    stored = loads((tmp_path / "session.results.json").read_text())
    assert len(stored[1]) == 1 and [s.what for s in stored[2]] == ["step", "undo", "redo"]
    assert stored[0] is not None
