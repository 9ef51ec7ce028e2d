"""Plotly figures for codi_lens results (one place for every figure's look)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

TEMPLATE = "plotly_white"


def accuracy_bars(table: pd.DataFrame, title: str = "Accuracy by number of steps") -> go.Figure:
    """Grouped bars from :func:`codi_lens.metrics.accuracy_table`: one colour per condition."""
    fig = px.bar(
        table,
        x="group",
        y="accuracy",
        color="condition",
        barmode="group",
        text="accuracy",
        hover_data=["n", "n_correct"],
        template=TEMPLATE,
        title=title,
        labels={"group": "steps", "accuracy": "accuracy"},
    )
    fig.update_traces(texttemplate="%{text:.0%}", textposition="outside")
    fig.update_yaxes(range=[0, 1.08], tickformat=".0%")
    return fig


def latent_readout_heatmap(rate: pd.DataFrame, title: str = "Intermediate values in the logit lens") -> go.Figure:
    """Heatmap of a (row label x latent step) rate table, e.g. how often value i is top-5 at thought k."""
    fig = px.imshow(
        rate,
        text_auto=".0%",
        aspect="auto",
        color_continuous_scale="Blues",
        zmin=0,
        zmax=1,
        template=TEMPLATE,
        title=title,
        labels={"x": "latent step (0 = BOT, k = thought k)", "y": "intermediate", "color": "rate"},
    )
    return fig


def write_html(fig: go.Figure, path) -> None:
    """Write a figure that opens offline (plotly.js embedded, no CDN)."""
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def _error_bars(table: pd.DataFrame, metric: str) -> dict:
    return {
        "error_y": table[f"{metric}_high"] - table[metric],
        "error_y_minus": table[metric] - table[f"{metric}_low"],
    }


def importance_by_thought(table: pd.DataFrame, metric: str = "importance", title: str | None = None) -> go.Figure:
    """Lines with 95% CI bars from :func:`codi_lens.metrics.importance_table`: ``metric`` by thought,
    one colour per intervention, one panel per scope (``thought`` 0 = every thought at once)."""
    table = table.copy()
    fig = px.line(
        table,
        x="thought",
        y=metric,
        color="intervention",
        facet_col="scope",
        markers=True,
        hover_data=["n", f"{metric}_low", f"{metric}_high"],
        template=TEMPLATE,
        title=title or f"Step importance ({metric}) by thought, 95% bootstrap CI over problems",
        labels={"thought": "thought k (0 = all thoughts)", metric: metric},
        **_error_bars(table, metric),
    )
    fig.update_xaxes(dtick=1)
    return fig


def problems_by_thought_heatmap(
    results: pd.DataFrame, value: str = "kl", title: str = "KL(baseline || ablated) per problem and thought"
) -> go.Figure:
    """Problems x thoughts heatmap of ``value`` (rows of one intervention and scope)."""
    grid = results.pivot_table(index="problem_id", columns="thought", values=value, aggfunc="mean", sort=False)
    fig = px.imshow(
        grid,
        aspect="auto",
        color_continuous_scale="Viridis",
        template=TEMPLATE,
        title=title,
        labels={"x": "thought k", "y": "problem", "color": value},
    )
    return fig


def importance_by_difficulty(table: pd.DataFrame, metric: str = "importance", title: str | None = None) -> go.Figure:
    """``metric`` by thought with 95% CI bars, one line per difficulty bucket (``difficulty`` column)."""
    fig = px.line(
        table,
        x="thought",
        y=metric,
        color="difficulty",
        markers=True,
        hover_data=["n"],
        template=TEMPLATE,
        title=title or f"{metric} by thought and number of steps, 95% bootstrap CI",
        labels={"thought": "thought k", "difficulty": "steps"},
        **_error_bars(table, metric),
    )
    fig.update_xaxes(dtick=1)
    return fig


def attention_by_layer(attention: pd.DataFrame, title: str = "Attention to BOT and each thought") -> go.Figure:
    """Layer x thought heatmap of the mean attention weight (over problems, heads and sources), with
    a dropdown-free facet per source kind (``eot`` / ``answer``)."""
    frame = attention.assign(source_kind=attention["source"].str.split(":").str[0])
    grid = frame.groupby(["source_kind", "layer", "thought"])["weight"].mean().reset_index()
    fig = px.density_heatmap(
        grid,
        x="thought",
        y="layer",
        z="weight",
        facet_col="source_kind",
        histfunc="avg",
        color_continuous_scale="Blues",
        template=TEMPLATE,
        title=title,
        labels={"thought": "thought k (0 = BOT)", "layer": "layer", "weight": "attention"},
        nbinsx=int(grid["thought"].max()) + 1,
        nbinsy=int(grid["layer"].max()) + 1,
    )
    return fig


def attention_vs_importance(
    frame: pd.DataFrame, correlations: pd.DataFrame, x: str = "attention", y: str = "kl"
) -> go.Figure:
    """Scatter of attention against importance per layer, titled with each layer's Spearman
    correlation and its 95% CI (from :func:`codi_lens.attention.correlation_by_layer`)."""
    labels = {
        int(r.layer): f"layer {int(r.layer)}: Spearman {r.spearman:.2f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}]"
        for r in correlations.itertuples()
    }
    frame = frame.assign(panel=frame["layer"].map(labels))
    fig = px.scatter(
        frame,
        x=x,
        y=y,
        color="thought",
        facet_col="panel",
        hover_data=["problem_id", "thought"],
        opacity=0.6,
        template=TEMPLATE,
        title="Attention to a thought vs its importance (zero ablation), Spearman with 95% CI",
        labels={x: "attention (mean over heads, from EOT and answer)", y: "KL(baseline || ablated)"},
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return fig


def attention_by_head(
    attention: pd.DataFrame, title: str = "Attention from EOT and the answer to each thought, by head"
) -> go.Figure:
    """Head x thought heatmaps of the mean attention weight (over problems and sources), one panel per layer."""
    grid = attention.groupby(["layer", "head", "thought"])["weight"].mean().reset_index()
    fig = px.density_heatmap(
        grid,
        x="thought",
        y="head",
        z="weight",
        facet_col="layer",
        facet_col_wrap=4,
        histfunc="avg",
        color_continuous_scale="Blues",
        template=TEMPLATE,
        title=title,
        labels={"thought": "thought k (0 = BOT)", "head": "query head", "weight": "attention"},
        nbinsx=int(grid["thought"].max()) + 1,
        nbinsy=int(grid["head"].max()) + 1,
    )
    return fig
