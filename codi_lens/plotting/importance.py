"""Figures of step importance and of attention to the thoughts."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from codi_lens.plotting.base import TEMPLATE, error_bars, mean_heatmap


def importance_by_thought(table: pd.DataFrame, metric: str = "importance", title: str | None = None) -> go.Figure:
    """Lines with 95% CI bars from :func:`codi_lens.importance.importance_table`: ``metric`` by thought,
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
        **error_bars(table, metric),
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
        **error_bars(table, metric),
    )
    fig.update_xaxes(dtick=1)
    return fig


def attention_by_layer(attention: pd.DataFrame, title: str = "Attention to BOT and each thought") -> go.Figure:
    """Layer x thought heatmap of the mean attention weight (over problems, heads and sources), one
    panel per source kind (``eot`` / ``answer``)."""
    frame = attention.assign(source_kind=attention["source"].str.split(":").str[0])
    grid = frame.groupby(["source_kind", "layer", "thought"])["weight"].mean().reset_index()
    return mean_heatmap(grid, "layer", "source_kind", title)


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
    return mean_heatmap(grid, "head", "layer", title, facet_wrap=4)


def pair_interaction_heatmap(table: pd.DataFrame, n_latents: int, title: str | None = None) -> go.Figure:
    """Thought i x thought j heatmap of the mean interaction of ablating the pair together (one intervention):
    the pair's change in the answer number's log-probability minus the sum of the two single ablations' (nats);
    a star where it survives the Benjamini-Hochberg correction across pairs; hover: n, mean, 95% CI, q."""
    grid = pd.DataFrame(index=range(1, n_latents + 1), columns=range(1, n_latents + 1), dtype=float)
    text = pd.DataFrame("", index=grid.index, columns=grid.columns)
    hover = pd.DataFrame("", index=grid.index, columns=grid.columns)
    for r in table.itertuples():
        i, j = (int(k) for k in r.thoughts.split(","))
        for a, b in ((i, j), (j, i)):
            grid.loc[a, b] = r.mean
            text.loc[a, b] = f"{r.mean:.2f}{'*' if r.significant else ''}"
            hover.loc[a, b] = f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]<br>BH q {r.q:.3g}"
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float),
            x=[f"thought {k}" for k in grid.columns],
            y=[f"thought {k}" for k in grid.index],
            text=text.to_numpy(),
            texttemplate="%{text}",
            customdata=hover.to_numpy(),
            hovertemplate="%{y} with %{x}<br>%{customdata}<extra></extra>",
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": "nats"},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title
        or "Ablating two thoughts together against apart: change in log p(answer number), pair minus the sum of<br>"
        "singles (nats; < 0 synergy, > 0 redundancy; * = BH 5% across pairs; hover: n, 95% CI)",
        yaxis={"autorange": "reversed"},
        margin={"t": 110},
    )
    return fig


def step_attention_heatmaps(
    table: pd.DataFrame, x: str, y: str, x_order: list, y_order: list, title: str, x_title: str
) -> go.Figure:
    """One heatmap per layer of the mean attention ``table`` (``layer``, ``x``, ``y``, ``mean``, ``low``,
    ``high``, ``n``), the value written in each cell, hover: n and the 95% CI over problems."""
    layers = sorted(table["layer"].unique())
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {int(layer)}" for layer in layers])
    for c, layer in enumerate(layers, start=1):
        part = table[table["layer"] == layer]
        grid = part.pivot(index=y, columns=x, values="mean").reindex(index=y_order, columns=x_order)
        hover = part.assign(
            h=[f"n={r.n}<br>mean {r.mean:.3f}<br>95% CI [{r.low:.3f}, {r.high:.3f}]" for r in part.itertuples()]
        ).pivot(index=y, columns=x, values="h")
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(dtype=float),
                x=[str(v) for v in x_order],
                y=[str(v) for v in y_order],
                text=grid.round(2).to_numpy(),
                texttemplate="%{text}",
                customdata=hover.reindex(index=y_order, columns=x_order).to_numpy(),
                hovertemplate="%{y} -> %{x}<br>%{customdata}<extra></extra>",
                coloraxis="coloraxis",
            ),
            row=1,
            col=c,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=c)
        fig.update_xaxes(title_text=x_title, row=1, col=c)
    fig.update_layout(template=TEMPLATE, title=title, coloraxis={"colorscale": "Blues"}, margin={"t": 110})
    return fig
