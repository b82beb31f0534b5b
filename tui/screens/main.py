"""The main screen: the six panes in tabs, a run strip that is always visible, the footer.

Every pane is a tab (at any width), so the layout works at 80x24; the strip
above the footer shows the current job's stage and progress from any tab.
Hidden panes are mounted lazily, right after the first frame.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.lazy import Lazy
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Static, TabbedContent, TabPane

from ..widgets.forget_set import ForgetSetPane
from ..widgets.method import MethodPane
from ..widgets.probe import ProbePane
from ..widgets.results import ResultsPane
from ..widgets.run import RunPane
from ..widgets.targets import TargetsPane

TABS = (("forget", "Forget set", ForgetSetPane), ("targets", "Targets", TargetsPane),
        ("method", "Method", MethodPane), ("run", "Run", RunPane), ("results", "Results", ResultsPane),
        ("probe", "Probe", ProbePane))


class MainScreen(Screen):
    def compose(self) -> ComposeResult:
        yield Header(icon="⌫")
        with TabbedContent(id="tabs", initial="tab-forget"):
            for tab_id, title, cls in TABS:
                with TabPane(title, id=f"tab-{tab_id}"):
                    pane = cls(id=f"pane-{tab_id}")
                    # hidden panes mount right after the first frame (faster first paint)
                    yield pane if tab_id == "forget" else Lazy(pane)
        with Horizontal(id="strip"):
            yield Static("starting…", id="strip-text")
            yield ProgressBar(total=1, id="strip-bar", show_eta=False, show_percentage=False)
        yield Footer()

    FOCUS = {"forget": "#fs-table", "targets": "#tg-list", "method": "#me-list", "run": "#rn-run",
             "results": "#rs-table", "probe": "#pb-question"}

    def on_mount(self) -> None:
        self.call_after_refresh(self._focus_pane, "forget")

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
            if self.focused is not None and self.focused.id != "tabs-list":
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
