"""The look every figure shares, writing figures to HTML, and helpers for error bars and faceted heatmaps."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

TEMPLATE = "plotly_white"


def write_html(fig: go.Figure, path) -> None:
    """Write a figure that opens offline (plotly.js embedded, no CDN)."""
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def error_bars(table: pd.DataFrame, value: str, low: str | None = None, high: str | None = None) -> dict:
    """Plotly express keywords that draw the interval ``[low, high]`` around ``value`` (columns of ``table``;
    by default ``{value}_low`` and ``{value}_high``)."""
    low, high = low or f"{value}_low", high or f"{value}_high"
    return {"error_y": table[high] - table[value], "error_y_minus": table[value] - table[low]}


def ci_bars(
    table: pd.DataFrame,
    x: str,
    value: str,
    low: str,
    high: str,
    *,
    color: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Bars of ``value`` per ``x`` (grouped by ``color``) with the interval ``[low, high]`` drawn on each."""
    frame = table.assign(**{x: table[x].astype(str)})
    return px.bar(
        frame,
        x=x,
        y=value,
        color=color,
        barmode="group",
        template=TEMPLATE,
        title=title,
        hover_data=[low, high],
        **error_bars(frame, value, low, high),
    )


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


def write_page(title: str, sections: Sequence[tuple[str, Sequence[go.Figure | pd.DataFrame | str]]], path) -> None:
    """One offline HTML page (plotly.js embedded once, no CDN): a heading per section, then its parts in order:
    figures, tables (rendered without their index) and paragraphs of text (escaped)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, parts in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for part in parts:
            if isinstance(part, go.Figure):
                body.append(part.to_html(full_html=False, include_plotlyjs=False))
            elif isinstance(part, pd.DataFrame):
                body.append(part.to_html(index=False, border=0, classes="table", float_format=lambda x: f"{x:.4g}"))
            else:
                body.append(f"<p>{html.escape(str(part))}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #ddd}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style><script>{get_plotlyjs()}</script></head><body>{''.join(body)}</body></html>"
    )
    Path(path).write_text(page, encoding="utf-8")
