"""Export of the results: the table as CSV (stdlib ``csv``), the charts as SVG (written here as text) and,
when matplotlib is installed, as PNG.

No Textual here.  The rows are :class:`tui.results_store.Entry` values; the
SVG charts are the same two the Results pane draws in the terminal: ROUGE-1
per split (grouped bars) and the forget/retain/rephrase radar.  PNG needs a
rasteriser the project does not depend on: with matplotlib importable the PNGs
are drawn with it, else :func:`write_png` raises :class:`PngUnavailable`, whose
message says how to get it (``pip install matplotlib``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .results_store import AXES, BARS, COLUMNS, HEX, Column, chart_entries, radar_value

PNG_HINT = "PNG export needs matplotlib, which is not installed: pip install matplotlib (SVG files were written)"


class PngUnavailable(RuntimeError):
    pass


# ==================================================================== CSV
def table_csv(items: list, columns: tuple[Column, ...] = COLUMNS) -> str:
    """The table as CSV: one row per entry, every column (blank where there is no value), plus deltas."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["row", "kind", "label", "target_mode", "merge_factor"]
    keys = [c.key for c in columns]
    extra = [f"delta.{c.key}" for c in columns if not c.key.startswith("delta.")
             and c.key not in ("seconds", "eval_seconds", "composite")]
    w.writerow(head + [f"{c.key} ({c.arrow or '-'})" for c in columns] + extra)
    for e in items:
        vals = [e.values.get(k) for k in keys + extra]
        w.writerow([e.num, e.kind, e.label, e.target_mode, e.merge] +
                   ["" if v is None else f"{v:.6g}" for v in vals])
    return buf.getvalue()


# ==================================================================== SVG
def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
            f'<title>{escape(title)}</title>\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def bars_svg(items: list) -> str:
    """ROUGE-1 per split (forget ↓, retain ↑, rephrase ↓): one group per split, one bar per row."""
    rows = chart_entries(items)
    groups = [(k, t) for k, t in BARS if any(e.values.get(k) is not None for e in rows)]
    n = max(1, len(rows))
    bar_w, gap = 18, 28
    group_w = n * bar_w + gap
    left, top, plot_h = 50, 40, 220
    width = left + max(1, len(groups)) * group_w + 180
    height = top + plot_h + 70
    body = [f'<text x="{left}" y="22" font-size="15" font-weight="bold">ROUGE-1 per split</text>']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - t)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + len(groups) * group_w}" y2="{y:.1f}" '
                    f'stroke="#ddd"/><text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{t:.2f}</text>')
    for g, (key, title) in enumerate(groups):
        x0 = left + g * group_w + gap / 2
        for i, e in enumerate(rows):
            v = e.values.get(key)
            if v is None:
                continue
            v = max(0.0, min(1.0, float(v)))
            h = plot_h * v
            body.append(f'<rect x="{x0 + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 3}" '
                        f'height="{h:.1f}" fill="{HEX[i % len(HEX)]}"><title>{escape(e.short)}: {v:.3f}'
                        f'</title></rect>')
        label = title.split(" (")[0]
        body.append(f'<text x="{x0 + n * bar_w / 2:.1f}" y="{top + plot_h + 18}" text-anchor="middle">'
                    f'{escape(label)}</text>')
    body.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + len(groups) * group_w}" '
                f'y2="{top + plot_h}" stroke="black"/>')
    body += _legend(rows, left + len(groups) * group_w + 20, top)
    return _svg(int(width), int(height), body, "ROUGE-1 per split")


def _legend(rows: list, x: float, y: float) -> list[str]:
    out = []
    for i, e in enumerate(rows):
        out.append(f'<rect x="{x}" y="{y + i * 18}" width="12" height="12" fill="{HEX[i % len(HEX)]}"/>'
                   f'<text x="{x + 18}" y="{y + i * 18 + 11}">{escape(e.short)}</text>')
    return out


def radar_svg(items: list) -> str:
    """The forget/retain/rephrase radar (outward = better); one triangle per row."""
    rows = chart_entries(items)
    cx, cy, r = 200.0, 190.0, 140.0
    body = ['<text x="20" y="24" font-size="15" font-weight="bold">forget / retain / rephrase '
            '(outward = better)</text>']
    for t in (0.25, 0.5, 0.75, 1.0):
        pts = " ".join(f"{cx + r * t * math.cos(math.radians(a)):.1f},{cy - r * t * math.sin(math.radians(a)):.1f}"
                       for _, _, a in AXES)
        body.append(f'<polygon points="{pts}" fill="none" stroke="#ddd"/>')
    for _, label, a in AXES:
        x, y = cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a))
        body.append(f'<line x1="{cx}" y1="{cy}" x2="{x:.1f}" y2="{y:.1f}" stroke="#999"/>')
        lx, ly = cx + (r + 18) * math.cos(math.radians(a)), cy - (r + 18) * math.sin(math.radians(a))
        body.append(f'<text x="{lx:.1f}" y="{ly + 4:.1f}" text-anchor="middle">{escape(label)}</text>')
    for i, e in enumerate(rows):
        vals = [radar_value(e, k) or 0.0 for k, _, _ in AXES]
        pts = " ".join(f"{cx + r * v * math.cos(math.radians(a)):.1f},{cy - r * v * math.sin(math.radians(a)):.1f}"
                       for v, (_, _, a) in zip(vals, AXES))
        c = HEX[i % len(HEX)]
        body.append(f'<polygon points="{pts}" fill="{c}" fill-opacity="0.15" stroke="{c}" stroke-width="2">'
                    f'<title>{escape(e.short)}</title></polygon>')
    body += _legend(rows, 400, 60)
    return _svg(600, 360, body, "forget / retain / rephrase radar")


# ==================================================================== PNG (optional)
def png_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_png(items: list, chart: str, path: Path) -> Path:
    """``chart`` ("bars" | "radar") as a PNG with matplotlib; PngUnavailable when it is not installed."""
    if not png_available():
        raise PngUnavailable(PNG_HINT)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = chart_entries(items)
    if chart == "bars":
        fig, ax = plt.subplots(figsize=(7, 4))
        n = max(1, len(rows))
        for i, e in enumerate(rows):
            xs = [g + i / (n + 1) for g in range(len(BARS))]
            ax.bar(xs, [e.values.get(k) or 0.0 for k, _ in BARS], width=1 / (n + 1), color=HEX[i % len(HEX)],
                   label=e.short)
        ax.set_xticks([g + (n - 1) / (2 * (n + 1)) for g in range(len(BARS))],
                      [t.split(" (")[0] for _, t in BARS])
        ax.set_ylim(0, 1)
        ax.set_title("ROUGE-1 per split")
    else:
        fig = plt.figure(figsize=(6, 5))
        ax = fig.add_subplot(projection="polar")
        angles = [math.radians(a) for _, _, a in AXES]
        for i, e in enumerate(rows):
            vals = [radar_value(e, k) or 0.0 for k, _, _ in AXES]
            ax.plot(angles + angles[:1], vals + vals[:1], color=HEX[i % len(HEX)], label=e.short)
        ax.set_xticks(angles, [label for _, label, _ in AXES])
        ax.set_ylim(0, 1)
        ax.set_title("forget / retain / rephrase (outward = better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ==================================================================== all at once
def export_all(items: list, folder: Path, stem: str, columns: tuple[Column, ...] = COLUMNS) -> tuple[list, str]:
    """Write ``<stem>.results.csv``, ``<stem>.bars.svg``, ``<stem>.radar.svg`` (and the PNGs when possible)
    in ``folder`` (atomically); returns (paths written, a note: '' or why the PNGs are missing).
    OSError when a file cannot be written."""
    from unlearn_tui.backends.fileio import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in ((f"{stem}.results.csv", table_csv(items, columns)), (f"{stem}.bars.svg", bars_svg(items)),
                       (f"{stem}.radar.svg", radar_svg(items))):
        atomic_write(folder / name, text)
        written.append(folder / name)
    note = ""
    try:
        for chart in ("bars", "radar"):
            written.append(write_png(items, chart, folder / f"{stem}.{chart}.png"))
    except PngUnavailable as exc:
        note = str(exc)
    return written, note


def export_stem(session: Any) -> tuple[Path, str]:
    """Where exports go: beside the session file (its stem), else the current folder ("unlearn-tui")."""
    path = getattr(session, "path", None)
    if path is not None:
        return Path(path).parent, Path(path).stem
    return Path.cwd(), "unlearn-tui"
