"""Best-effort map from TOML key paths to line numbers, for error messages.

``tomllib`` does not report where a value came from, so this scans the text:
table headers (``[a.b]``, ``[[a]]``, counting array-of-tables elements) and
``key = value`` lines, skipping multi-line strings and the continuation lines
of multi-line arrays.  Paths are tuples of keys and array indices, e.g.
``("runs", 0, "params", "lr")``.  Keys inside inline tables/arrays are not
indexed; :func:`LineIndex.line` then falls back to the nearest ancestor.
"""

from __future__ import annotations

import json
import re

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_AOT = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_KEYVAL = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART = re.compile(_KEY)


def _split(dotted: str) -> list[str]:
    out = []
    for part in _PART.findall(dotted):
        if part.startswith('"'):
            try:
                part = json.loads(part)
            except ValueError:
                part = part[1:-1]
        elif part.startswith("'"):
            part = part[1:-1]
        out.append(part)
    return out


def _lex(line: str, depth: int, ml: str | None) -> tuple[int, str | None]:
    """Bracket depth and open multi-line-string delimiter after ``line``."""
    i, n = 0, len(line)
    while i < n:
        if ml is not None:
            j = line.find(ml, i)
            if j < 0:
                return depth, ml
            i, ml = j + 3, None
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            ml, i = line[i:i + 3], i + 3
            continue
        if c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
            continue
        if c == "'":
            j = line.find("'", i + 1)
            i = n if j < 0 else j + 1
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return depth, ml


class LineIndex:
    def __init__(self, text: str) -> None:
        self._lines: dict[tuple, int] = {}
        prefix: tuple = ()
        counts: dict[tuple, int] = {}  # array-of-tables name path -> elements seen
        depth, ml = 0, None
        for lineno, line in enumerate(text.splitlines(), 1):
            fresh = depth == 0 and ml is None
            depth, ml = _lex(line, depth, ml)
            if not fresh:
                continue
            m = _AOT.match(line)
            if m:
                prefix = self._path(_split(m.group(1)), counts, new_element=True)
                self._lines.setdefault(prefix, lineno)
                continue
            m = _TABLE.match(line)
            if m:
                prefix = self._path(_split(m.group(1)), counts, new_element=False)
                self._lines.setdefault(prefix, lineno)
                continue
            m = _KEYVAL.match(line)
            if m:
                parts = _split(m.group(1))
                for k in range(1, len(parts) + 1):
                    self._lines.setdefault(prefix + tuple(parts[:k]), lineno)

    @staticmethod
    def _path(parts: list[str], counts: dict[tuple, int], new_element: bool) -> tuple:
        path: list = []
        names: tuple = ()
        for i, part in enumerate(parts):
            names += (part,)
            path.append(part)
            if new_element and i == len(parts) - 1:
                counts[names] = counts.get(names, 0) + 1
                for key in [k for k in counts if len(k) > len(names) and k[:len(names)] == names]:
                    del counts[key]  # nested arrays restart in a new element
                path.append(counts[names] - 1)
            elif names in counts:
                path.append(counts[names] - 1)
        return tuple(path)

    def line(self, path: tuple) -> int | None:
        """Line of ``path``, else of its nearest indexed ancestor, else None."""
        path = tuple(path)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None
