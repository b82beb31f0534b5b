"""The one exception type for problems a user can fix.

``UserError`` carries a message and, optionally, *where* the problem is (a file,
a TOML key, an item id, ``file:line``).  The CLI prints it as one line and exits
with code 2; the TUI shows it as a notification.  Anything else escaping the
engine is a bug.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, rendered as ``where: message``."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:  # one line, always
        text = f"{self.where}: {self.message}" if self.where else self.message
        return " ".join(text.split())


class Cancelled(Exception):
    """Raised inside the engine when the user's cancel token is set."""


class NonFiniteError(Exception):
    """An update produced NaN/inf weights; the transaction rolls it back."""
