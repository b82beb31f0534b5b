"""Snapshot tests of each pane at 80x24 and 120x40 (tabs), and of the wide side-by-side main screen.

Cursor blink is off.

No model is loaded (``autostart=False``); items come from a small data file and
the Results pane shows fixed, hand-made run results, so the pictures are
deterministic.  Snapshots live in ``tests/snapshots/``; refresh them with
``pytest tests/test_tui_snapshots.py --snapshot-update`` after a deliberate
UI change (and look at them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot")

from pytest_textual_snapshot import SVGImageExtension  # noqa: E402

from test_tui_flow import ITEMS, write_session  # noqa: E402

PANES = ("forget", "targets", "method", "run", "results", "probe")
SIZES = ((80, 24), (120, 40))
WIDE = (((200, 50), "forget"), ((160, 40), "probe"))   # (size, focused pane): every pane on screen at once


_RULE = re.compile(r"\.(terminal-r\d+) \{([^}]*)\}")


def canonical_svg(svg: str) -> str:
    """Number the style classes by first use of their CSS, merging classes with the same CSS.

    Rich numbers classes by distinct Style objects; two renders of the same
    picture can carry styles that differ only in invisible metadata, which
    shifts every number.  After this, equal pictures give equal text.
    """
    if "terminal-r" not in svg:      # already canonical
        return svg
    css = {name: body.strip() for name, body in _RULE.findall(svg)}
    new_names: dict[str, str] = {}
    by_css: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        old = m.group(0)
        if old not in css:
            return old
        body = css[old]
        if body not in by_css:
            by_css[body] = f"terminal-c{len(by_css)}"
        new_names[old] = by_css[body]
        return new_names[old]

    head, sep, body = svg.partition("</style>")
    body = re.sub(r"terminal-r\d+", rename, body)
    rules = "".join(f"\n    .{name} {{ {b} }}" for b, name in by_css.items())
    head = re.sub(r"\n\s*(?=\n)", "", _RULE.sub("", head)).rstrip() + rules + "\n    "
    return head + sep + body


class PaneSnapshot(SVGImageExtension):
    """SVG snapshots stored in tests/snapshots/<test file>/ (not __snapshots__), canonicalised."""

    @classmethod
    def dirname(cls, *, test_location) -> str:  # type: ignore[override]
        return str(Path(test_location.filepath).parent / "snapshots" / test_location.basename)

    def _read_snapshot_data_from_location(self, *args, **kwargs):
        data = super()._read_snapshot_data_from_location(*args, **kwargs)
        return canonical_svg(data) if data is not None else None

    def serialize(self, data, **kwargs):
        return canonical_svg(super().serialize(data, **kwargs))


def fake_results():
    from unlearn_tui.backends.metrics import EvalResult, ItemScore, SplitScores
    from unlearn_tui.backends.runner import RunResult

    def ev(f1: float, r1: float, gen_f: str, gen_r: str) -> EvalResult:
        return EvalResult({
            "forget": SplitScores("forget", [
                ItemScore("q1", ITEMS[0]["question"], "Paris", gen_f, f1, 0.2 * f1, 0.5 * f1, f1),
                ItemScore("q2", ITEMS[1]["question"], "Shakespeare", gen_f, f1, 0.1, 0.2, 0.0)]),
            "retain": SplitScores("retain", [
                ItemScore("q3", ITEMS[2]["question"], "Jupiter", gen_r, r1, 0.6, 0.7, 1.0),
                ItemScore("q4", ITEMS[3]["question"], "blue", gen_r, r1, 0.5, 0.6, 1.0)]),
        })

    base = ev(1.0, 1.0, "Paris, of course.", "Jupiter.")
    runs = [RunResult(0, "ike", "ike", {"k": 4}, "idk", 1, ev(0.0, 1.0, "I'm not sure.", "Jupiter."), 0.5, 1.0),
            RunResult(1, "none", "none", {}, "idk", 1, ev(1.0, 1.0, "Paris, of course.", "Jupiter."), 0.01, 1.0)]
    return base, runs


@pytest.fixture
def make_app(tmp_path, monkeypatch):
    def make():
        from unlearn_tui.backends import data
        from unlearn_tui.tui.app import create_app
        from unlearn_tui.tui.settings import Settings

        p = tmp_path / "facts.json"
        p.write_text(json.dumps(ITEMS), encoding="utf-8")
        session = write_session(tmp_path, p, "ike")
        app = create_app(session, settings=Settings(), autostart=False)
        app.animation_level = "none"   # tab underline etc. jump straight to their end state
        app.workspace.items = data.load_items(str(p))
        app.workspace.normalize_selection()
        app.workspace.baseline_scores = {"q1": 1.0, "q2": 0.5, "q3": 1.0, "q4": 0.0, "q5": 0.0}
        app.workspace.baseline_eval, app.workspace.results = fake_results()
        return app

    return make


async def _settle(pilot) -> None:
    """Let every queued message, after-refresh callback and animation run."""
    for _ in range(3):
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()


async def _prepare(pilot, pane: str, fill: tuple[str, ...] = ()) -> None:
    """Every pane ready, ``pane`` shown and focused; the run and probe panes get fixed content when shown."""
    from textual.widgets import Input, TabbedContent, TextArea

    from unlearn_tui.tui.screens.main import DeferredPane, MainScreen

    app = pilot.app
    app.animation_level = "none"
    # every deferred pane mounted (not only this one): the placeholders are gone and all panes are ready
    while app.screen.query(DeferredPane) or any(app.pane(p) is None for p in PANES):
        await pilot.pause(0.01)
    await _settle(pilot)
    app.refresh_panes()
    app.action_show_tab(pane)
    tabs = app.screen.query_one("#tabs", TabbedContent)
    while tabs.active != f"tab-{pane}":
        await pilot.pause(0.01)
    if pane == "probe" or "probe" in fill:
        app.screen.query_one("#pb-question", Input).value = "Who wrote Hamlet?"
        app.screen.query_one("#pane-probe").show("q", "I'm not sure.", "Shakespeare wrote it.")
    if pane == "run" or "run" in fill:
        run = app.screen.query_one("#pane-run")
        run.stage("slow-test", 10, "")
        run.status("finished: 1 run(s)")
        run.log_line("evaluate forget 2 items")
    for w in list(app.screen.query(Input)) + list(app.screen.query(TextArea)):
        w.cursor_blink = False
    await _settle(pilot)
    # focus a fixed widget explicitly (the pane's main widget), then let everything settle again
    want = app.screen.query_one(MainScreen.FOCUS[pane])
    app.screen.set_focus(want, scroll_visible=False)
    await _settle(pilot)
    while app.focused is not want:
        await pilot.pause(0.02)
    await _settle(pilot)
    assert app.focused is want and tabs.active == f"tab-{pane}"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pane", PANES)
def test_pane_snapshot(pane, size, make_app, snapshot):
    from textual._doc import take_svg_screenshot

    async def before(pilot):
        await _prepare(pilot, pane)

    svg = take_svg_screenshot(app=make_app(), terminal_size=size, run_before=before)
    assert snapshot.use_extension(PaneSnapshot) == svg


@pytest.mark.parametrize("size, pane", WIDE, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v)
def test_wide_main_snapshot(size, pane, make_app, snapshot):
    from textual._doc import take_svg_screenshot

    async def before(pilot):
        assert pilot.app.screen.wide
        await _prepare(pilot, pane, fill=("run", "probe"))

    svg = take_svg_screenshot(app=make_app(), terminal_size=size, run_before=before)
    assert snapshot.use_extension(PaneSnapshot) == svg
