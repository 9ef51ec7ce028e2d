"""Figures of circuits at the answer: direct logit attribution by layer, by head, and by the source positions a
head reads."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from codi_lens.plotting.base import TEMPLATE, error_bars


def attribution_bars(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Mean direct logit attribution of each part (embedding, each layer's attention and MLP, bias terms) with
    95% bootstrap CIs over pairs, side by side for the clean and the corrupted run. ``table``: one row per
    (run, component) with ``mean``, ``low``, ``high``, ``n``."""
    fig = px.bar(
        table,
        x="component",
        y="mean",
        color="run",
        barmode="group",
        category_orders={"run": ["clean", "corrupted"]},
        **error_bars(table, "mean", low="low", high="high"),
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title
        or "Direct logit attribution of logit[clean] - logit[corrupted] at the answer number<br>"
        "(final norm's scale frozen; 95% CI over pairs)",
        labels={"mean": "contribution to the logit difference", "component": "part of the residual stream"},
    )
    fig.update_layout(margin={"t": 110})
    return fig


def head_heatmap(table: pd.DataFrame, n_layers: int, n_heads: int, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of each head's mean direct contribution (one run), a star on heads that survive the
    Benjamini-Hochberg correction across all heads; hover: n, mean, 95% CI, q."""
    grid = table.pivot(index="layer", columns="head", values="mean").reindex(
        index=range(n_layers), columns=range(n_heads)
    )
    text = table.assign(
        t=[f"{r.mean:.2f}{'*' if r.significant else ''}" for r in table.itertuples()],
        h=[
            f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]<br>BH q {r.q:.3g}"
            for r in table.itertuples()
        ],
    )
    shape = {"index": range(n_layers), "columns": range(n_heads)}
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[f"head {h}" for h in range(n_heads)],
            y=[f"layer {layer}" for layer in range(n_layers)],
            text=text.pivot(index="layer", columns="head", values="t").reindex(**shape).to_numpy(),
            texttemplate="%{text}",
            customdata=text.pivot(index="layer", columns="head", values="h").reindex(**shape).to_numpy(),
            hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>",
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": "logit diff"},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title
        or "Each head's direct contribution to the logit difference (clean run)<br>"
        "(* = survives Benjamini-Hochberg at 5% across heads; hover: n, mean, 95% CI)",
        margin={"t": 110},
    )
    return fig


def source_heatmap(table: pd.DataFrame, sources: list[str], title: str | None = None) -> go.Figure:
    """Head x source-position heatmap for the top heads (largest first): the mean part of each head's direct
    contribution that comes from each source position (question, changed number, BOT, thought k, EOT, answer so
    far), clean run; hover: n, mean, 95% CI."""
    heads = list(dict.fromkeys(table["component"]))
    grid = table.pivot(index="component", columns="source", values="mean").reindex(index=heads, columns=sources)
    hover = table.assign(
        h=[f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]" for r in table.itertuples()]
    ).pivot(index="component", columns="source", values="h")
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=sources,
            y=[h.replace("blocks.", "L").replace(".attn.head.", " H") for h in heads],
            text=grid.round(2).to_numpy(),
            texttemplate="%{text}",
            customdata=hover.reindex(index=heads, columns=sources).to_numpy(),
            hovertemplate="%{y} from %{x}<br>%{customdata}<extra></extra>",
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": "logit diff"},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title
        or "Where the top heads read what they write: each source position's part of the head's contribution<br>"
        "(logit-difference units, through its OV circuit weighted by attention; clean run, mean over pairs)",
        xaxis_title="source position",
        yaxis={"autorange": "reversed"},
        margin={"t": 110},
    )
    return fig


def path_bars(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Mean recovery per path with 95% bootstrap CI bars over pairs, coloured by the kind of path; hover: n, CI,
    Benjamini-Hochberg q across paths."""
    fig = px.bar(
        table,
        x="path",
        y="mean",
        color="group",
        **error_bars(table, "mean", low="low", high="high"),
        hover_data={"n": True, "low": ":.3f", "high": ":.3f", "q": ":.3g"},
        template=TEMPLATE,
        title=title
        or "Path patching: recovery when the clean sender reaches the answer only through the receivers<br>"
        "(every other head, MLP and fed thought frozen at the corrupted run; 95% CI over pairs)",
        labels={"mean": "mean recovery", "path": "sender -> receivers", "group": "path"},
    )
    fig.update_layout(margin={"t": 110}, xaxis_tickangle=-45)
    return fig
