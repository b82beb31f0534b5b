"""Unit tests of the app's parts: themes, keymap, settings, progress coalescing, start-up without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("textual")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ themes
def test_our_themes_load_as_textual_themes():
    from unlearn_tui.tui import themes

    found, problems = themes.load_all()
    names = {t.name: t for t in found}
    assert problems == []
    assert {"unlearn-dark", "unlearn-light"} <= set(names)
    assert names["unlearn-dark"].dark is True and names["unlearn-light"].dark is False
    assert names["unlearn-dark"].primary == "#2bb3a3"


def test_user_theme_files_and_bad_files(tmp_path, monkeypatch):
    from unlearn_tui.sessions.paths import config_dir

    from unlearn_tui.tui import themes

    d = config_dir() / "themes"
    d.mkdir(parents=True)
    (d / "mine.toml").write_text('primary = "#ff0000"\ndark = false\n[variables]\nfooter-key-foreground = "#00ff00"\n')
    (d / "broken.toml").write_text("primary = \n")
    (d / "nocolour.toml").write_text('name = "x"\nprimary = "not-a-colour"\n')
    (d / "extra.toml").write_text('primary = "#010203"\nbogus = 1\n')
    found, problems = themes.load_all()
    mine = [t for t in found if t.name == "mine"]
    assert mine and mine[0].primary == "#ff0000" and mine[0].dark is False
    assert mine[0].variables == {"footer-key-foreground": "#00ff00"}
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "broken.toml" in joined and "not valid TOML" in joined
    assert "nocolour.toml" in joined and "not a colour" in joined
    assert "extra.toml" in joined and "bogus" in joined


@pytest.mark.anyio
async def test_bad_theme_file_is_a_notification_not_a_crash(tmp_path):
    from unlearn_tui.sessions.paths import config_dir

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.settings import Settings

    d = config_dir() / "themes"
    d.mkdir(parents=True)
    (d / "broken.toml").write_text("primary = \n")
    (d / "paper.toml").write_text('name = "paper"\nprimary = "#123456"\ndark = false\n')
    app = create_app(settings=Settings(theme="paper"), autostart=False, restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.theme == "paper"                                  # the user's theme is registered and used
        assert {"unlearn-dark", "unlearn-light", "paper"} <= set(app.available_themes)
        texts = [n.message for n in app._notifications]
        assert any("broken.toml" in t for t in texts)
        app.theme = "unlearn-light"                                   # switching works (the palette does this)
        await pilot.pause()
        assert app.current_theme.name == "unlearn-light"


# ------------------------------------------------------------------ keymap and actions
def test_every_action_has_a_binding_with_an_id():
    from unlearn_tui.tui import actions
    from unlearn_tui.tui.app import UnlearnApp

    ids = [b.id for b in UnlearnApp.BINDINGS]
    assert all(i and i.startswith("unlearn.") for i in ids)
    assert len(set(ids)) == len(ids)
    app_actions = [a for a in actions.ACTIONS if a.scope == "app"]
    assert len(ids) == len(app_actions)
    for a in app_actions:   # every bound action exists on the App
        name = a.action.split("(")[0]
        assert hasattr(UnlearnApp, f"action_{name}"), a.id


def test_keymap_file(tmp_path):
    from unlearn_tui.tui import actions

    p = tmp_path / "keymap.toml"
    p.write_text('run = "f9"\n[keys]\ncancel = ["ctrl+k", "f10"]\nnosuch = "x"\nsave = 3\n')
    keymap, problems = actions.load_keymap(p)
    assert keymap == {"unlearn.run": "f9", "unlearn.cancel": "ctrl+k,f10"}
    assert len(problems) == 2 and any("nosuch" in x for x in problems) and any("save" in x for x in problems)
    p.write_text("run = [")
    keymap, problems = actions.load_keymap(p)
    assert keymap == {} and problems


@pytest.mark.anyio
async def test_user_keymap_rebinds_and_help_lists_it(tmp_path):
    from unlearn_tui.sessions.paths import config_dir
    from textual.widgets import DataTable

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.help import HelpScreen
    from unlearn_tui.tui.settings import Settings

    config_dir(create=True)
    (config_dir() / "keymap.toml").write_text('help = "f9"\n')
    app = create_app(settings=Settings(), autostart=False, restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)      # f1 is no longer help
        await pilot.press("f9")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one("#help-table", DataTable)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert ["f9", "Help", "help", "anywhere"] in rows
        assert any(r[2] == "toggle_forget" and r[0] == "space" for r in rows)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


@pytest.mark.anyio
async def test_command_palette_offers_every_action():
    from unlearn_tui.tui import actions
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.settings import Settings

    app = create_app(settings=Settings(), autostart=False, restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for a in actions.ACTIONS:
            if a.scope == "app" and a.id != "quit":
                assert a.description in titles
        assert "Quit" in titles and "Theme" in titles     # Textual's own commands stay


# ------------------------------------------------------------------ settings
def test_settings_file_bad_values_keep_defaults(tmp_path):
    from unlearn_tui.tui.settings import Settings, load

    p = tmp_path / "settings.toml"
    p.write_text('theme = "unlearn-light"\nautosave_seconds = 5\nprogress_hz = 1000\nwide_min_width = "x"\nfoo = 1\n')
    s, problems = load(p)
    assert s.theme == "unlearn-light" and s.autosave_seconds == 5.0
    assert s.progress_hz == Settings().progress_hz and s.wide_min_width == Settings().wide_min_width
    assert len(problems) == 3
    p.write_text("theme = [")
    s, problems = load(p)
    assert s == Settings() and problems


# ------------------------------------------------------------------ coalescing
def test_coalescer_limits_rate_keeps_last_and_all_losses():
    from unlearn_tui.backends import events as ev

    from unlearn_tui.tui import messages as msg
    from unlearn_tui.tui.worker import Coalescer

    now = [0.0]
    posted: list = []
    c = Coalescer(posted.append, "run", hz=10, clock=lambda: now[0])
    c(ev.StageStarted("opt", 100))
    for i in range(1, 101):
        now[0] += 0.001            # 1000 events/s
        c(ev.Progress("opt", i, 100, loss=float(i)))
    c(ev.Log("done"))
    progress = [m for m in posted if isinstance(m, msg.ProgressUpdate)]
    assert isinstance(posted[0], msg.StageChanged)
    assert 2 <= len(progress) <= 3               # 0.1 s of events at <= 10/s, plus the final one
    assert progress[-1].done == 100              # the last state always arrives
    assert [x for m in progress for x in m.losses] == [float(i) for i in range(1, 101)]
    assert isinstance(posted[-1], msg.LogLine)


def test_coalescer_flushes_pending_progress_before_other_events():
    from unlearn_tui.backends import events as ev

    from unlearn_tui.tui import messages as msg
    from unlearn_tui.tui.worker import Coalescer

    posted: list = []
    c = Coalescer(posted.append, "run", hz=1, clock=lambda: 5.0)
    c(ev.Progress("a", 1, None))
    c(ev.Progress("a", 2, None, loss=0.5))       # throttled (same clock)
    c(ev.StageStarted("b", 3))
    kinds = [type(m).__name__ for m in posted]
    assert kinds == ["ProgressUpdate", "ProgressUpdate", "StageChanged"]
    assert posted[1].done == 2 and posted[1].losses == [0.5]


# ------------------------------------------------------------------ start-up
def test_first_frame_before_torch_is_imported(tmp_path):
    """A fresh process: the first frame is drawn before torch is imported; the model loads afterwards."""
    script = r"""
import asyncio, json, sys, time
from unlearn_tui.tui.app import create_app
async def main():
    app = create_app(model="tiny:llama", restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        while app.first_frame is None:
            await pilot.pause(0.01)
        first = (app.first_frame, app.torch_at_first_frame)
        t0 = time.monotonic()
        while not app.model_ready and time.monotonic() - t0 < 120:
            await pilot.pause(0.05)
        print(json.dumps({"first": first[0], "torch_at_first": first[1], "model_ready": app.model_ready,
                          "torch_after": "torch" in sys.modules}))
asyncio.run(main())
"""
    env = {"UNLEARN_TUI_CONFIG_DIR": str(tmp_path / "c"), "UNLEARN_TUI_DATA_DIR": str(tmp_path / "d"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "settings.toml").write_text("baseline_on_load = false\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch_at_first"] is False
    assert res["model_ready"] is True and res["torch_after"] is True
    assert res["first"] > 0


def test_first_frame_builds_only_the_forget_pane(tmp_path):
    """The other panes (their modules and widgets) are imported and mounted after the first frame."""
    script = r"""
import asyncio, json, sys
from unlearn_tui.tui.app import UnlearnApp, create_app
from unlearn_tui.tui.settings import Settings
LATER = ["unlearn_tui.tui.widgets.targets", "unlearn_tui.tui.widgets.method", "unlearn_tui.tui.widgets.run", "unlearn_tui.tui.widgets.results",
         "unlearn_tui.tui.widgets.probe", "textual.widgets._text_area", "textual.widgets._selection_list",
         "unlearn_tui.backends.targets", "unlearn_tui.backends.methods", "rich._emoji_codes"]
seen = {}
mark = UnlearnApp._mark_first_frame
def spy(self):
    seen["at_first_frame"] = [m for m in LATER if m in sys.modules]
    seen["panes"] = [n for n in ("forget", "targets", "method", "run", "results", "probe") if self.pane(n)]
    mark(self)
UnlearnApp._mark_first_frame = spy
async def main():
    app = create_app(model="tiny:llama", settings=Settings(baseline_on_load=False), autostart=False, restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        while app.first_frame is None or any(app.pane(n) is None for n in ("targets", "probe")):
            await pilot.pause(0.01)
        seen["later"] = [m for m in LATER[:5] if m in sys.modules]
    print(json.dumps(seen))
asyncio.run(main())
"""
    env = {"UNLEARN_TUI_CONFIG_DIR": str(tmp_path / "c"), "UNLEARN_TUI_DATA_DIR": str(tmp_path / "d"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["at_first_frame"] == [] and res["panes"] == ["forget"]
    assert len(res["later"]) == 5                     # ... and they all arrive right after it


def test_quitting_while_the_deferred_panes_mount_is_clean(tmp_path):
    """Leaving right after the first frame (panes still mounting) ends without an error."""
    script = r"""
import asyncio
from unlearn_tui.tui.app import create_app
from unlearn_tui.tui.settings import Settings
async def main():
    for _ in range(3):
        app = create_app(model="tiny:llama", settings=Settings(baseline_on_load=False), autostart=False,
                         restore=False)
        async with app.run_test(size=(200, 50)) as pilot:
            while app.first_frame is None:
                await pilot.pause(0.001)
    print("ok")
asyncio.run(main())
"""
    env = {"UNLEARN_TUI_CONFIG_DIR": str(tmp_path / "c"), "UNLEARN_TUI_DATA_DIR": str(tmp_path / "d"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_modules_import_no_torch():
    code = ("import sys, tui.app, tui.worker, tui.screens.main, tui.themes, tui.actions; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ focus and tabs
@pytest.mark.anyio
async def test_tab_switch_with_focus_in_a_pane_does_not_ping_pong(tmp_path):
    """Regression: f3 while the forget table had focus re-activated the Forget tab (blur-on-hide moved focus
    to a hidden sibling), and the two tabs then stole focus from each other forever; typing lost keys."""
    from textual.widgets import TabbedContent, TextArea

    from unlearn_tui.backends import data
    from test_tui_flow import ITEMS, write_session
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.settings import Settings

    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    app = create_app(write_session(tmp_path, p), settings=Settings(), autostart=False)
    app.workspace.items = data.load_items(str(p))
    app.workspace.normalize_selection()
    activated: list[str] = []
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(3000):              # 30 s at most
            if app.pane("targets") is not None:
                break
            await pilot.pause(0.01)
        assert app.pane("targets") is not None, "the targets pane never mounted"
        app.refresh_panes()
        await pilot.pause()
        tabs = app.screen.query_one("#tabs", TabbedContent)
        app.screen.query_one("#fs-table").focus()
        await pilot.pause(0.1)
        app.screen.watch(tabs, "active", lambda value: activated.append(value), init=False)
        await pilot.press("f3")
        await pilot.pause(0.5)
        assert tabs.active == "tab-targets" and app.focused.id == "tg-list"
        assert activated == ["tab-targets"]                      # switched once, never back
        area = app.screen.query_one("#tg-text", TextArea)
        area.focus()
        area.clear()
        for ch in "Nope":
            await pilot.press(ch)
        await pilot.pause(0.3)
        assert area.text == "Nope" and app.focused is area and tabs.active == "tab-targets"
        assert app.workspace.session.target_for("q1").target == "Nope"
        await pilot.press("f2")                                   # and back, focus in the targets pane
        await pilot.pause(0.5)
        assert tabs.active == "tab-forget" and app.focused.id == "fs-table"
        assert activated == ["tab-targets", "tab-forget"]
