"""The main screen: the six panes, a run strip that is always visible, the footer.

Two layouts of the same widgets, switched live on every resize:

* **tabs** (below :data:`WIDE_MIN_WIDTH` x :data:`WIDE_MIN_HEIGHT`, e.g. 80x24
  and 120x40): every pane is a tab;
* **wide** (at least that size): the tab bar is hidden and all six panes are
  shown at once in a grid, in the same order as the tabs (and f2–f7)::

      +------------+-----------+-----------+
      | Forget set | Targets   | Method    |
      |            +-----------+-----------+
      |            | Run       | Results   |
      +------------+-----------+-----------+
      | Probe                              |
      +------------------------------------+

The panes stay inside the one ``TabbedContent`` in both layouts (no widget is
moved or re-mounted, so no state is lost on a resize): the wide layout is the
screen class ``-wide`` (see ``app.tcss``) plus every ``TabPane`` displayed.
``#tabs.active`` still names the pane that has (or last had) focus, and the
pane ids, focus targets and actions are the same in both layouts.

The strip above the footer shows the current job's stage and progress.

Only the Forget set pane is built for the first frame.  The other five stand
as :class:`DeferredPane` placeholders: their modules (and the Textual widgets
they use) are imported, and the panes composed and mounted, once the first
frame is on the terminal (the App calls :meth:`MainScreen.mount_deferred`
from its first-frame hook; a timer is the fallback).  Until then
``app.pane(name)`` is None for them, which every caller already allows; a pane
built later reads the workspace as it is then.
"""

from __future__ import annotations

import importlib

from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.geometry import Size
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import ContentSwitcher, Footer, Header, ProgressBar, Static, TabbedContent, TabPane

from ..widgets.forget_set import ForgetSetPane

# (tab id, title, module in tui.widgets, pane class); the pane's id is "pane-<tab id>"
NARROW_FOOTER = 100          # columns; see MainScreen._apply_layout

TABS = (("forget", "Forget set", "forget_set", "ForgetSetPane"), ("targets", "Targets", "targets", "TargetsPane"),
        ("method", "Method", "method", "MethodPane"), ("run", "Run", "run", "RunPane"),
        ("results", "Results", "results", "ResultsPane"), ("probe", "Probe", "probe", "ProbePane"))

DEFER_FALLBACK_S = 1.0
"""Mount the deferred panes after this long even if the App never reported its first frame."""

WIDE_MIN_WIDTH = 160
"""Default terminal columns from which all panes are shown side by side (below: tabs);
``wide_min_width`` in the user's settings.toml overrides it."""
WIDE_MIN_HEIGHT = 40
"""Default terminal rows needed as well (``wide_min_height`` in settings.toml)."""


def is_wide(size: Size, min_width: int = WIDE_MIN_WIDTH, min_height: int = WIDE_MIN_HEIGHT) -> bool:
    """Whether a terminal of this size gets the side-by-side layout."""
    return size.width >= min_width and size.height >= min_height


class DeferredPane(Widget):
    """Stands in for a pane until the first frame is drawn (see the module doc)."""

    DEFAULT_CSS = """
    DeferredPane {
        display: none;
    }
    """

    def __init__(self, module: str, cls_name: str, pane_id: str, workspace=None) -> None:
        super().__init__()
        self.module, self.cls_name, self.pane_id = module, cls_name, pane_id
        self.workspace = workspace
        self.claimed = False

    def build(self) -> Widget:
        mod = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.widgets.{self.module}")
        return getattr(mod, self.cls_name)(self.workspace, id=self.pane_id)

    async def materialize(self) -> None:
        """Mount the real pane in this placeholder's place (runs on the placeholder's own message pump)."""
        parent, screen = self.parent, self.screen
        if parent is None or not self.app.is_running:
            return          # removed, or the app is shutting down: nothing to build
        await parent.mount(self.build(), after=self)
        await self.remove()
        if isinstance(screen, MainScreen):
            screen.pane_mounted(self.pane_id.removeprefix("pane-"))


class MainScreen(Screen):
    """The panes are built with the app's :class:`tui.workspace.Workspace` (see tui/widgets/__init__.py)."""

    def __init__(self, workspace) -> None:
        super().__init__()
        self.workspace = workspace

    def compose(self) -> ComposeResult:
        from ..actions import current_keys

        keys = current_keys(self.app)
        yield Header(icon="⌫")
        with TabbedContent(id="tabs", initial="tab-forget"):
            for tab_id, title, module, cls_name in TABS:
                with TabPane(title, id=f"tab-{tab_id}") as tab:
                    # drawn only in the wide layout (tabs have no border); names the pane and its key
                    tab.border_title = f"{title} · {keys.get(f'tab_{tab_id}', '')}".rstrip(" ·")
                    if tab_id == "forget":
                        yield ForgetSetPane(self.workspace, id="pane-forget")
                    else:   # built after the first frame (faster first paint)
                        yield DeferredPane(module, cls_name, f"pane-{tab_id}", self.workspace)
        with Horizontal(id="strip"):
            yield Static("starting…", id="strip-text")
            yield ProgressBar(total=1, id="strip-bar", show_eta=False, show_percentage=False)
        yield Footer()

    FOCUS = {"forget": "#fs-table", "targets": "#tg-list", "method": "#me-list", "run": "#rn-run",
             "results": "#rs-table", "probe": "#pb-question"}

    def on_mount(self) -> None:
        switcher = self._tabs().get_child_by_type(ContentSwitcher)
        # the switcher hides every pane but the current one whenever the active tab changes;
        # in the wide layout this (later) watcher shows them all again, in the same update
        self.watch(switcher, "current", self._switcher_changed, init=False)
        self._apply_layout(self.app.size)
        self.call_after_refresh(self._focus_pane, "forget")
        self.set_timer(DEFER_FALLBACK_S, self.mount_deferred)

    def mount_deferred(self) -> None:
        """Import, build and mount the panes still deferred (idempotent)."""
        for p in self.query(DeferredPane):
            if not p.claimed:
                p.claimed = True      # a second call finds nothing to do
                p.call_later(p.materialize)

    def pane_mounted(self, tab_id: str) -> None:
        self._focus_pane(tab_id)   # its tab was chosen (f3-f7) before the pane existed: focus it now

    # ---- layout: tabs or side by side
    @property
    def wide(self) -> bool:
        """True while all panes are shown side by side."""
        return self.has_class("-wide")

    def on_resize(self, event: events.Resize) -> None:
        self._apply_layout(event.size)

    def on_screen_resume(self) -> None:
        self._apply_layout(self.app.size)   # the terminal may have been resized under a dialog

    def _apply_layout(self, size: Size) -> None:
        # below NARROW_FOOTER columns the footer drops its spacing and the "^p palette" label (ctrl+p still
        # opens the palette, which lists every action), so the focused pane's keys are not cut off
        for footer in self.query(Footer):
            narrow = size.width < NARROW_FOOTER
            footer.compact = narrow
            footer.show_command_palette = not narrow
        st = getattr(self.app, "settings", None)
        wide = is_wide(size, getattr(st, "wide_min_width", WIDE_MIN_WIDTH),
                       getattr(st, "wide_min_height", WIDE_MIN_HEIGHT))
        if wide == self.wide:
            return
        tabs = self._tabs()
        with self.app.batch_update():
            self.set_class(wide, "-wide")
            self._show_panes(tabs.active)

    def _switcher_changed(self, current: str | None) -> None:
        if self.wide:
            self._show_panes(current)

    def _show_panes(self, active: str | None) -> None:
        """Every pane displayed (wide), or only the active tab's (tabs)."""
        wide = self.wide
        for tab in self._tabs().get_child_by_type(ContentSwitcher).query_children(TabPane):
            tab.display = wide or tab.id == active

    # Focus and tabs.  Textual's TabbedContent activates the tab of any pane that
    # receives focus (TabPane.Focused), and a focused widget that gets hidden
    # blurs itself and hands focus to a sibling — found from a focus chain that
    # still contains the pane being hidden.  So switching tabs while focus is in
    # the old pane re-activated the old tab; both TabActivated messages then
    # scheduled a _focus_pane for their own tab, each of which re-activated its
    # tab again: an endless forget <-> targets ping-pong that stole focus (and
    # keystrokes) from whatever the user had focused.  Hence:
    #   * show_tab drops focus before switching (nothing to blur-on-hide);
    #   * TabActivated for a tab that is no longer active is ignored;
    #   * _focus_pane only acts on the active tab and never moves focus that is
    #     already inside that tab's pane (unless asked to, for f2–f7).
    # In the wide layout nothing is hidden, so focus simply moves (and the
    # TabbedContent's active tab follows it).
    def _tabs(self) -> TabbedContent:
        return self.query_one("#tabs", TabbedContent)

    def _focus_inside(self, tab_id: str) -> bool:
        node = self.focused
        while node is not None and node is not self:
            if node.id == f"tab-{tab_id}":
                return True
            node = node.parent
        return False

    def show_tab(self, tab_id: str) -> None:
        tabs = self._tabs()
        if tabs.active != f"tab-{tab_id}":
            if not self.wide and self.focused is not None and self.focused.id != "tabs-list":
                self.set_focus(None, scroll_visible=False)
            tabs.active = f"tab-{tab_id}"
        self.call_after_refresh(self._focus_pane, tab_id, True)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        tab = (event.pane.id or "").removeprefix("tab-")
        if tab not in self.FOCUS or event.tabbed_content.active != event.pane.id:
            return  # unknown, or stale: another tab was activated since
        if self.focused is not None and self.focused.id == "tabs-list":
            return  # keyboard navigation along the tab bar: keep focus there
        self.call_after_refresh(self._focus_pane, tab)

    def _focus_pane(self, tab_id: str, force: bool = False) -> None:
        sel = self.FOCUS.get(tab_id)
        if not sel or self._tabs().active != f"tab-{tab_id}":
            return
        if not force and self._focus_inside(tab_id):
            return
        try:
            self.query_one(sel).focus()
        except Exception:
            pass
