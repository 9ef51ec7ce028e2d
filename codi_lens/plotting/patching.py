"""Figures of activation patching: recovery by site, by position, and along a trajectory of thoughts."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from codi_lens.plotting.base import TEMPLATE, error_bars
from codi_lens.stats import mean_ci_table


def patching_heatmap(
    rows: pd.DataFrame,
    positions: list[str],
    value: str = "recovery",
    title: str | None = None,
    significant: pd.DataFrame | None = None,
) -> go.Figure:
    """Layer x position heatmap of the mean ``value`` over pairs, with the 95% bootstrap CI and the
    number of pairs in each cell's hover (rows of one hook kind). ``significant``: a table with ``layer``,
    ``position`` and ``significant`` (e.g. Benjamini-Hochberg across the cells); those cells are starred."""
    table = mean_ci_table(rows, ["layer", "position"], value)
    layers = sorted(table["layer"].unique())
    grid = table.pivot(index="layer", columns="position", values="mean").reindex(index=layers, columns=positions)
    text = table.assign(
        t=[f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]" for r in table.itertuples()]
    )
    hover = text.pivot(index="layer", columns="position", values="t").reindex(index=layers, columns=positions)
    stars = pd.DataFrame("", index=grid.index, columns=grid.columns)
    if significant is not None:
        for r in significant[significant["significant"].astype(bool)].itertuples():
            if r.layer in stars.index and r.position in stars.columns:
                stars.loc[r.layer, r.position] = "*"
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=positions,
            y=[f"layer {int(layer)}" for layer in layers],
            text=stars.to_numpy(),
            texttemplate="%{text}",
            customdata=hover.to_numpy(),
            hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>",
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


def route_bars(cells: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Mean recovery per step (or span) through the recurrence, the attention route (every layer) and both, with
    95% bootstrap CI bars over pairs, one panel per donor (the pair's own clean run, and the other-problem
    control). ``cells``: one row per (donor, target, route) with ``mean``, ``low``, ``high``, ``n`` and
    ``significant`` (survives the Benjamini-Hochberg correction; starred in the hover)."""
    table = cells.assign(star=cells["significant"].map({True: "yes", False: "no"}))
    fig = px.bar(
        table,
        x="target",
        y="mean",
        color="route",
        barmode="group",
        facet_row="donor" if table["donor"].nunique() > 1 else None,
        category_orders={"route": ["recurrence", "attention", "both"], "donor": ["clean", "other"]},
        **error_bars(table, "mean", low="low", high="high"),
        hover_data={"n": True, "low": ":.3f", "high": ":.3f", "star": True},
        template=TEMPLATE,
        title=title
        or "Which route carries each step's content: recovery through the recurrence (fed z_k+1), attention<br>"
        "(its keys and values at every layer) or both (95% CI over pairs; donor other = another problem's run)",
        labels={"mean": "mean recovery", "target": "step patched (bot = 0)", "star": "BH-significant"},
    )
    fig.update_layout(margin={"t": 110})
    return fig


def route_layer_heatmap(cells: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Step x layer heatmap of the attention route's mean recovery at one layer at a time (the rest pinned at the
    corrupted run), hover: n, mean and 95% CI; cells that survive the Benjamini-Hochberg correction across the
    grid are marked with a star."""
    targets = list(dict.fromkeys(cells["target"]))
    layers = sorted(cells["layer"].unique())
    grid = cells.pivot(index="layer", columns="target", values="mean").reindex(index=layers, columns=targets)
    marks = cells.assign(mark=[f"{r.mean:.2f}{'*' if r.significant else ''}" for r in cells.itertuples()])
    text = marks.pivot(index="layer", columns="target", values="mark").reindex(index=layers, columns=targets)
    hover = cells.assign(
        h=[
            f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]<br>BH q {r.q:.3g}"
            for r in cells.itertuples()
        ]
    ).pivot(index="layer", columns="target", values="h")
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=targets,
            y=[f"layer {int(layer)}" for layer in layers],
            text=text.to_numpy(),
            texttemplate="%{text}",
            customdata=hover.reindex(index=layers, columns=targets).to_numpy(),
            hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>",
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": "recovery"},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title
        or "Attention route by layer: recovery when only this layer's keys and values of the step are clean<br>"
        "(* = survives Benjamini-Hochberg at 5% across the grid; hover: n, mean, 95% CI)",
        xaxis_title="step patched (bot = 0)",
        margin={"t": 110},
    )
    return fig
