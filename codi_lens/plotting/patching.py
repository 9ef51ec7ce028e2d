"""Figures of activation patching: recovery by site, by position, and along a trajectory of thoughts."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from codi_lens.plotting.base import TEMPLATE, error_bars
from codi_lens.stats import mean_ci_table


def patching_heatmap(
    rows: pd.DataFrame, positions: list[str], value: str = "recovery", title: str | None = None
) -> go.Figure:
    """Layer x position heatmap of the mean ``value`` over pairs, with the 95% bootstrap CI and the
    number of pairs in each cell's hover (rows of one hook kind)."""
    table = mean_ci_table(rows, ["layer", "position"], value)
    layers = sorted(table["layer"].unique())
    grid = table.pivot(index="layer", columns="position", values="mean").reindex(index=layers, columns=positions)
    text = table.assign(
        t=[f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]" for r in table.itertuples()]
    )
    hover = text.pivot(index="layer", columns="position", values="t").reindex(index=layers, columns=positions)
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=positions,
            y=[f"layer {int(layer)}" for layer in layers],
            text=hover.to_numpy(),
            hovertemplate="%{y}, %{x}<br>%{text}<extra></extra>",
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": value},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Mean {value} when the clean activation is patched in (hover: n pairs and 95% CI)",
        xaxis_title="position (changed = the changed number's tokens; thoughts = every thought at once)",
    )
    return fig


def patching_bars(
    rows: pd.DataFrame, x: str, value: str = "recovery", title: str = "", color: str | None = None
) -> go.Figure:
    """Bars of the mean ``value`` per ``x`` (and per ``color``, side by side) with 95% bootstrap CI
    bars over pairs."""
    table = mean_ci_table(rows, [x] if color is None else [x, color], value)
    fig = px.bar(
        table,
        x=x,
        y="mean",
        color=color,
        barmode="group",
        **error_bars(table, "mean", low="low", high="high"),
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title,
        labels={"mean": f"mean {value}"},
    )
    return fig


def trajectory_lines(rows: pd.DataFrame, value: str = "cos_clean", title: str | None = None) -> go.Figure:
    """Mean ``value`` by thought with 95% CI bars: chained against parallel patching, one line per
    (mode, start thought), one panel per layer."""
    table = mean_ci_table(rows, ["layer", "mode", "start_thought", "thought"], value)
    table["run"] = table["mode"] + " from thought " + table["start_thought"].astype(int).astype(str)
    fig = px.line(
        table,
        x="thought",
        y="mean",
        color="run",
        line_dash="mode",
        facet_col="layer",
        markers=True,
        **error_bars(table, "mean", low="low", high="high"),
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title or f"{value} of the patched run at each later thought (95% CI over pairs)",
        labels={"mean": value, "thought": "thought k"},
    )
    fig.update_xaxes(dtick=1)
    return fig


def recovery_slider(rows: pd.DataFrame, positions: list[str], value: str = "recovery", title: str | None = None):
    """Recovery by position with a slider over layers (rows of one patching sweep): move the slider to
    see where in the chain patching the clean activation brings the answer back."""
    table = mean_ci_table(rows, ["layer", "position"], value)
    layers = sorted(table["layer"].dropna().unique())
    fig = go.Figure()
    for i, layer in enumerate(layers):
        part = table[table["layer"] == layer].set_index("position").reindex(positions)
        fig.add_trace(
            go.Bar(
                x=positions,
                y=part["mean"],
                error_y={
                    "type": "data",
                    "array": part["high"] - part["mean"],
                    "arrayminus": part["mean"] - part["low"],
                },
                customdata=part["n"],
                hovertemplate="%{x}<br>" + value + " %{y:.3f}<br>n=%{customdata}<extra></extra>",
                name=f"layer {int(layer)}",
                visible=i == 0,
                marker_color="#4C78A8",
            )
        )
    steps = [
        {"method": "update", "label": f"{int(layer)}", "args": [{"visible": [j == i for j in range(len(layers))]}]}
        for i, layer in enumerate(layers)
    ]
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Mean {value} when the clean activation is patched in (95% CI): slide across layers",
        sliders=[{"active": 0, "currentvalue": {"prefix": "layer "}, "steps": steps}],
        yaxis_title=value,
        xaxis_title="position patched",
    )
    return fig
