"""The panes of the main screen (one per module) and small helper widgets.

The protocol between the App and a pane:

* **down** — the pane is built with the :class:`tui.workspace.Workspace` and
  reads it; after every change the App calls ``refresh_from(workspace)`` on each
  mounted pane, which redraws what the change touched (:class:`Revisions`);
* **up** — the pane never changes the workspace: it posts a typed message
  (``ForgetSetPane.Toggled``, ``MethodPane.ParamChanged``, ... or
  :class:`ActionRequested` for an app action) that the App handles.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message


class ActionRequested(Message):
    """A pane asks for one of the App's actions (``"run"``, ``"open_data"``, ...)."""

    def __init__(self, action: str) -> None:
        super().__init__()
        self.action = action


class ScreenRequested(Message):
    """A pane asks the App to show a screen (a dialog it built); ``callback`` gets the screen's answer."""

    def __init__(self, screen: Any, callback: Any = None) -> None:
        super().__init__()
        self.screen, self.callback = screen, callback


class Revisions:
    """Which workspace aspects changed since a pane last drew them."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], tuple[int, ...]] = {}

    def changed(self, ws: Any, *aspects: str) -> bool:
        now = tuple(ws.revs[a] for a in aspects)
        if self._seen.get(aspects) == now:
            return False
        self._seen[aspects] = now
        return True
