"""The look every figure shares, writing figures to HTML, and helpers for error bars and faceted heatmaps."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

TEMPLATE = "plotly_white"


def write_html(fig: go.Figure, path) -> None:
    """Write a figure that opens offline (plotly.js embedded, no CDN)."""
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def error_bars(table: pd.DataFrame, value: str, low: str | None = None, high: str | None = None) -> dict:
    """Plotly express keywords that draw the interval ``[low, high]`` around ``value`` (columns of ``table``;
    by default ``{value}_low`` and ``{value}_high``)."""
    low, high = low or f"{value}_low", high or f"{value}_high"
    return {"error_y": table[high] - table[value], "error_y_minus": table[value] - table[low]}


def mean_heatmap(grid: pd.DataFrame, y: str, facet: str, title: str, facet_wrap: int = 0) -> go.Figure:
    """Heatmap of the mean ``weight`` over (thought, ``y``), one panel per ``facet`` value."""
    return px.density_heatmap(
        grid,
        x="thought",
        y=y,
        z="weight",
        facet_col=facet,
        facet_col_wrap=facet_wrap,
        histfunc="avg",
        color_continuous_scale="Blues",
        template=TEMPLATE,
        title=title,
        labels={"thought": "thought k (0 = BOT)", "head": "query head", "weight": "attention"},
        nbinsx=int(grid["thought"].max()) + 1,
        nbinsy=int(grid[y].max()) + 1,
    )
