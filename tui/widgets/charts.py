"""Terminal charts of the results: per-split ROUGE-1 bars and the forget/retain/rephrase radar.

Both are drawn as Rich text from :class:`tui.results_store.Entry` rows (no
plotting library; the same geometry is written as SVG by :mod:`tui.export`).
The radar's three axes point outward where the result is better:
``forget 1−R1`` (up), ``retain R1`` (lower left), ``rephrase 1−R1`` (lower right);
the unedited model's triangle is the baseline to beat.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from ..results_store import AXES, BARS, chart_entries, radar_value

PALETTE = ("bold cyan", "bold magenta", "bold yellow", "bold green", "bold red", "bold blue", "bold white")
MARKS = "●◆■▲★✚◉"


def split_bars(items: list, width: int = 60) -> Text:
    """One horizontal bar per row and split (ROUGE-1, 0..1)."""
    items = chart_entries(items)
    out = Text()
    if not items:
        return Text("no results to chart yet", style="dim")
    name_w = min(18, max(len(e.short) for e in items))
    bar_w = max(8, width - name_w - 8)
    for key, title in BARS:
        rows = [(i, e) for i, e in enumerate(items) if e.values.get(key) is not None]
        if not rows:
            continue
        out.append(title + "\n", style="bold")
        for i, e in rows:
            v = max(0.0, min(1.0, float(e.values[key])))
            full = int(round(v * bar_w))
            out.append(f"{e.short[:name_w]:<{name_w}} ")
            out.append("█" * full, style=PALETTE[i % len(PALETTE)])
            out.append("░" * (bar_w - full), style="dim")
            out.append(f" {v:.2f}\n")
    return out


def radar_points(items: list, cx: float, cy: float, radius: float, y_scale: float = 1.0) -> list:
    """[(entry index, [(x, y) per axis])] for the rows with all three values (x right, y down)."""
    out = []
    for i, e in enumerate(chart_entries(items)):
        vals = [radar_value(e, key) for key, _, _ in AXES]
        if any(v is None for v in vals):
            vals = [0.0 if v is None else v for v in vals]
        pts = []
        for v, (_, _, angle) in zip(vals, AXES):
            a = math.radians(angle)
            pts.append((cx + radius * v * math.cos(a), cy - radius * v * math.sin(a) * y_scale))
        out.append((i, pts))
    return out


def radar(items: list, width: int = 44, height: int = 17) -> Text:
    """The forget/retain/rephrase radar on a character grid (each row its own mark and colour)."""
    rows = chart_entries(items)
    if not rows:
        return Text("no results to chart yet", style="dim")
    width, height = max(24, width), max(9, height)
    grid: list[list[tuple[str, str]]] = [[(" ", "")] * width for _ in range(height)]
    y_scale = 0.5   # a terminal cell is about twice as tall as it is wide
    # up: radius * y_scale above the centre; down: radius * sin(30°) * y_scale below it
    radius = min((width - 3) / (2 * math.cos(math.radians(30))), (height - 2) / (0.75 * y_scale * 2))
    cx, cy = (width - 1) / 2, 0.5 + radius * y_scale

    def put(x: float, y: float, ch: str, style: str) -> None:
        xi, yi = int(round(x)), int(round(y))
        if 0 <= xi < width and 0 <= yi < height:
            grid[yi][xi] = (ch, style)

    def line(p: tuple, q: tuple, ch: str, style: str) -> None:
        n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
        for t in range(n + 1):
            f = t / n
            put(p[0] + (q[0] - p[0]) * f, p[1] + (q[1] - p[1]) * f, ch, style)

    ends = []
    for _, _, angle in AXES:
        a = math.radians(angle)
        end = (cx + radius * math.cos(a), cy - radius * math.sin(a) * y_scale)
        ends.append(end)
        line((cx, cy), end, "·", "dim")
    for i, pts in radar_points(items, cx, cy, radius, y_scale):
        style, mark = PALETTE[i % len(PALETTE)], MARKS[i % len(MARKS)]
        for j in range(3):
            line(pts[j], pts[(j + 1) % 3], "─" if abs(pts[j][1] - pts[(j + 1) % 3][1]) < 0.5 else "∙", style)
        for p in pts:
            put(p[0], p[1], mark, style)
    put(cx, cy, "+", "dim")
    text = Text()
    for row in grid:
        for ch, style in row:
            text.append(ch, style=style or None)
        text.append("\n")
    legend = Text()
    legend.append("axes (outward = better): ", style="dim")
    legend.append(" · ".join(label for _, label, _ in AXES) + "\n", style="dim")
    for i, e in enumerate(rows):
        vals = " ".join(f"{label.split()[0]} {radar_value(e, key) or 0:.2f}" for key, label, _ in AXES)
        legend.append(f"{MARKS[i % len(MARKS)]} ", style=PALETTE[i % len(PALETTE)])
        legend.append(f"{e.short}  {vals}\n")
    head = Text("forget / retain / rephrase radar\n", style="bold")
    return Text.assemble(head, text, legend)


class ChartsView(VerticalScroll):
    """The per-split bars and the radar, one under the other (scrolls)."""

    DEFAULT_CSS = """
    ChartsView { height: 1fr; }
    ChartsView > Static { height: auto; margin-bottom: 1; }
    """

    def compose(self):
        yield Static("", id="rs-bars")
        yield Static("", id="rs-radar")

    def set_entries(self, items: list) -> None:
        w = max(30, (self.size.width or 70) - 2)
        self.query_one("#rs-bars", Static).update(split_bars(items, w))
        self.query_one("#rs-radar", Static).update(radar(items, min(w, 56), 15))
