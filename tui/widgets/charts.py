"""Small terminal charts: a bar chart of composite scores (textual-plotext)."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class CompositeChart(PlotextPlot):
    """Bars of the composite score (1 − R1 forget + R1 retain) per run."""

    def on_mount(self) -> None:
        self.set_bars([], [])

    def set_bars(self, labels: list[str], values: list[float]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("composite (higher is better)")
        if labels:
            plt.bar(labels, values, width=0.3)
            plt.ylim(0, max(2.0, max(values) if values else 2.0))
        self.refresh()
