"""The main screen's two layouts: all panes side by side on a wide terminal, tabs below the threshold."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("textual")

PANES = ("forget", "targets", "method", "run", "results", "probe")


def make_app(tmp_path, settings=None):
    from unlearn_tui.backends import data
    from test_tui_flow import ITEMS, write_session
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.settings import Settings

    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    app = create_app(write_session(tmp_path, p), settings=settings or Settings(), autostart=False)
    app.workspace.items = data.load_items(str(p))
    app.workspace.normalize_selection()
    return app


async def ready(pilot) -> None:
    app = pilot.app
    while any(app.pane(p) is None for p in PANES):
        await pilot.pause(0.01)
    app.refresh_panes()
    await pilot.pause()


def shown(app) -> dict[str, bool]:
    """Pane -> drawn on screen now (displayed, with a non-empty region inside the screen)."""
    out = {}
    for p in PANES:
        w = app.screen.query_one(f"#pane-{p}")
        out[p] = bool(w.display and w.parent.display and w.region.area > 0
                      and app.screen.region.contains_region(w.region))
    return out


def test_threshold():
    from textual.geometry import Size

    from unlearn_tui.tui.screens.main import WIDE_MIN_HEIGHT, WIDE_MIN_WIDTH, is_wide

    assert is_wide(Size(WIDE_MIN_WIDTH, WIDE_MIN_HEIGHT))
    assert not is_wide(Size(WIDE_MIN_WIDTH - 1, 60)) and not is_wide(Size(300, WIDE_MIN_HEIGHT - 1))
    assert not is_wide(Size(80, 24)) and not is_wide(Size(120, 40))      # the common sizes keep the tabs


@pytest.mark.anyio
async def test_wide_terminal_shows_every_pane_at_once(tmp_path):
    from textual.widgets import TabbedContent

    app = make_app(tmp_path)
    async with app.run_test(size=(200, 50)) as pilot:
        await ready(pilot)
        assert app.screen.wide
        assert shown(app) == dict.fromkeys(PANES, True)
        assert not app.screen.query_one("#tabs > ContentTabs").display        # no tab bar
        regions = [app.screen.query_one(f"#tab-{p}").region for p in PANES]
        for i, a in enumerate(regions):                                        # side by side, no overlap
            assert all(not a.overlaps(b) for b in regions[i + 1:])
        f, t, m = (app.screen.query_one(f"#tab-{p}").region for p in ("forget", "targets", "method"))
        assert f.x < t.x < m.x and f.y == t.y == m.y
        # f2-f7 move focus between the visible panes; nothing gets hidden
        tabs = app.screen.query_one("#tabs", TabbedContent)
        for key, pane, widget in (("f4", "method", "me-list"), ("f7", "probe", "pb-question"),
                                  ("f2", "forget", "fs-table"), ("f6", "results", "rs-table")):
            await pilot.press(key)
            await pilot.pause(0.2)
            assert app.focused.id == widget and tabs.active == f"tab-{pane}"
            assert shown(app) == dict.fromkeys(PANES, True)
        # every pane is in the focus chain, and tab walks from one pane into the next
        def pane_of(node) -> str | None:
            while node is not None and not (node.id or "").startswith("tab-"):
                node = node.parent
            return None if node is None else node.id.removeprefix("tab-")

        assert {pane_of(w) for w in app.screen.focus_chain} == set(PANES)
        seen = {pane_of(app.focused)}
        for _ in range(len(app.screen.focus_chain)):
            await pilot.press("tab")
            seen.add(pane_of(app.focused))
            if seen == set(PANES):
                break
        assert seen == set(PANES)
        assert shown(app) == dict.fromkeys(PANES, True)
        # a click into another pane focuses it without hiding anything
        await pilot.click("#fs-table")
        await pilot.pause(0.2)
        assert tabs.active == "tab-forget" and shown(app) == dict.fromkeys(PANES, True)


@pytest.mark.anyio
async def test_small_terminal_keeps_the_tabs(tmp_path):
    from textual.widgets import TabbedContent

    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert not app.screen.wide
        assert app.screen.query_one("#tabs > ContentTabs").display
        assert shown(app) == {p: p == "forget" for p in PANES}
        await pilot.press("f3")
        await pilot.pause(0.3)
        assert app.screen.query_one("#tabs", TabbedContent).active == "tab-targets"
        assert shown(app) == {p: p == "targets" for p in PANES}


@pytest.mark.anyio
async def test_user_settings_move_the_threshold(tmp_path):
    """``wide_min_width`` / ``wide_min_height`` from settings.toml decide the layout, not the constants."""
    from unlearn_tui.tui.settings import Settings

    app = make_app(tmp_path, Settings(wide_min_width=100, wide_min_height=30))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        assert app.screen.wide
        assert all(shown(app).values())
    app = make_app(tmp_path, Settings(wide_min_width=250))
    async with app.run_test(size=(200, 50)) as pilot:
        await ready(pilot)
        assert not app.screen.wide


@pytest.mark.anyio
async def test_resize_switches_layout_live_and_keeps_state(tmp_path):
    from textual.widgets import Input, TabbedContent

    app = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        tabs = app.screen.query_one("#tabs", TabbedContent)
        assert not app.screen.wide and shown(app) == {p: p == "forget" for p in PANES}
        await pilot.press("f7")
        await pilot.pause(0.3)
        question = app.screen.query_one("#pb-question", Input)
        question.value = "Who wrote Hamlet?"
        assert app.focused is question

        await pilot.resize_terminal(200, 50)
        await pilot.pause(0.3)
        assert app.screen.wide and shown(app) == dict.fromkeys(PANES, True)
        assert app.focused is question and question.value == "Who wrote Hamlet?"   # same widgets, same state
        await pilot.press("f3")
        await pilot.pause(0.3)
        assert app.focused.id == "tg-list" and tabs.active == "tab-targets"

        await pilot.resize_terminal(159, 50)                      # one column short: tabs again
        await pilot.pause(0.3)
        assert not app.screen.wide and tabs.active == "tab-targets"
        assert shown(app) == {p: p == "targets" for p in PANES}
        assert app.focused.id == "tg-list"

        await pilot.resize_terminal(160, 39)                      # one row short: still tabs
        await pilot.pause(0.3)
        assert not app.screen.wide
        await pilot.resize_terminal(160, 40)
        await pilot.pause(0.3)
        assert app.screen.wide and shown(app) == dict.fromkeys(PANES, True)

        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        assert not app.screen.wide and shown(app) == {p: p == "targets" for p in PANES}
        await pilot.press("f2")                                   # the tab behaviour is intact afterwards
        await pilot.pause(0.3)
        assert tabs.active == "tab-forget" and app.focused.id == "fs-table"
        assert shown(app) == {p: p == "forget" for p in PANES}


@pytest.mark.anyio
async def test_resize_under_a_dialog_applies_when_it_closes(tmp_path):
    from unlearn_tui.tui.screens.help import HelpScreen

    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        main = app.screen
        await pilot.press("f1")
        await pilot.pause(0.2)
        assert isinstance(app.screen, HelpScreen)
        await pilot.resize_terminal(200, 50)
        await pilot.pause(0.2)
        await pilot.press("escape")
        await pilot.pause(0.3)
        assert app.screen is main and main.wide and shown(app) == dict.fromkeys(PANES, True)
