"""Figures of what the thoughts encode: lens readouts, probes, early answers and value patching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from codi_lens.plotting.base import TEMPLATE, error_bars
from codi_lens.stats import mean_ci_table


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


def readout_heatmaps(rates: pd.DataFrame, lens: str, k: int = 1, title: str | None = None) -> go.Figure:
    """Layer x thought heatmaps of how often a value is top-``k`` under ``lens``, from
    :func:`codi_lens.lens.readout_rates`: one column of panels per target (``step j`` of the chain, then
    the answer), the values' own problems on the top row and the control (another problem's values read
    from the same states) below; hover gives n and the 95% CI over problems."""
    table = rates[rates["lens"] == lens].copy()
    table["panel"] = [
        f"step {int(s)}" if t == "intermediate" else "answer" for t, s in zip(table["target"], table["step"])
    ]
    panels = sorted(table["panel"].unique(), key=lambda p: (p == "answer", int(p.split()[-1]) if p != "answer" else 0))
    rows = [False, True]
    fig = make_subplots(
        rows=2,
        cols=len(panels),
        shared_yaxes=True,
        horizontal_spacing=0.02,
        vertical_spacing=0.12,
        subplot_titles=[f"{p}{' (control)' if c else ''}" for c in rows for p in panels],
    )
    layers = sorted(table["layer"].unique())
    thoughts = sorted(table["thought"].unique())
    for r, control in enumerate(rows, start=1):
        for c, panel in enumerate(panels, start=1):
            part = table[(table["panel"] == panel) & (table["control"] == control)]
            grid = part.pivot(index="layer", columns="thought", values="rate").reindex(index=layers, columns=thoughts)
            hover = (
                part.assign(
                    t=[
                        f"n={r_.n}<br>rate {r_.rate:.2f}<br>95% CI [{r_.low:.2f}, {r_.high:.2f}]"
                        for r_ in part.itertuples()
                    ]
                )
                .pivot(index="layer", columns="thought", values="t")
                .reindex(index=layers, columns=thoughts)
            )
            fig.add_trace(
                go.Heatmap(
                    z=grid.to_numpy(),
                    x=[f"T{t}" if t else "BOT" for t in thoughts],
                    y=[f"L{int(layer)}" for layer in layers],
                    text=hover.to_numpy(),
                    hovertemplate=f"{panel}, %{{y}}, %{{x}}<br>%{{text}}<extra></extra>",
                    zmin=0,
                    zmax=1,
                    colorscale="Blues",
                    showscale=(r == 1 and c == 1),
                    colorbar={"title": f"top-{k} rate", "tickformat": ".0%"},
                ),
                row=r,
                col=c,
            )
    fig.update_layout(
        template=TEMPLATE,
        height=560,
        title=title
        or f"Intermediate values and the answer under the {lens} lens: share top-{k} at each (layer, thought); "
        "L0 = input of block 0",
    )
    return fig


def probe_accuracy_lines(table: pd.DataFrame, layer: int, title: str | None = None) -> go.Figure:
    """Held-out probe accuracy by thought at one ``layer`` with 95% CI bars, probe against its
    shuffled-label control and the majority-class rate (``chance``), one panel per target (from
    :func:`codi_lens.probes.probe_table`)."""
    part = table[table["layer"] == layer]
    chance = part[part["task"] == "probe"]
    part = pd.concat(
        [part, chance.assign(task="chance", accuracy=chance["chance"], low=chance["chance"], high=chance["chance"])]
    )
    fig = px.line(
        part,
        x="thought",
        y="accuracy",
        color="task",
        line_dash="task",
        facet_col="target",
        facet_col_wrap=6,
        markers=True,
        **error_bars(part, "accuracy", low="low", high="high"),
        hover_data=["n_train", "n_test", "C", "chance"],
        template=TEMPLATE,
        title=title or f"Linear probes on layer {layer} (held-out problems, 95% CI; control = shuffled labels)",
        labels={"thought": "thought (0 = BOT)"},
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return fig


def early_answer_curves(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Accuracy after k thoughts (EOT fed after thought k) with 95% CI bars, one line per number of steps
    and one for all problems (``mean_ci_table`` of the early-answer rows by ``group`` and ``k``)."""
    fig = px.line(
        table,
        x="k",
        y="mean",
        color="group",
        markers=True,
        **error_bars(table, "mean", low="low", high="high"),
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title or "Early answers: accuracy when EOT is fed after thought k (95% CI over problems)",
        labels={"k": "thoughts before EOT", "mean": "accuracy", "group": "steps"},
    )
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return fig


def value_patching_bars(rows: pd.DataFrame, value: str = "correct", title: str | None = None) -> go.Figure:
    """Mean ``value`` (``correct`` or ``moved``) per thought, one bar per condition, one panel per
    step whose value was matched, with 95% CI bars over problems."""
    table = mean_ci_table(rows, ["step", "thought", "condition"], value)
    table["step"] = "step " + table["step"].astype(int).astype(str)
    fig = px.bar(
        table,
        x="thought",
        y="mean",
        color="condition",
        facet_col="step",
        barmode="group",
        **error_bars(table, "mean", low="low", high="high"),
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title
        or f"Value-matched patching: {value} when thought k is replaced by the mean thought of problems whose "
        "intermediate at that step is the same value, a different one, or any (95% CI)",
        labels={"mean": value, "thought": "thought k replaced"},
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return fig


def answer_readout_lines(rates: pd.DataFrame, title: str | None = None) -> go.Figure:
    """The final answer's top-k rate by thought under each lens (colour), own values against the control
    (dashed), one panel per layer, with 95% CI bars (the ``answer`` rows of
    :func:`codi_lens.lens.readout_rates`): how early the answer can be read off the thoughts."""
    table = rates[rates["target"] == "answer"].copy()
    table["values"] = np.where(table["control"], "control (another problem's answer)", "own answer")
    table["layer"] = "layer " + table["layer"].astype(int).astype(str)
    fig = px.line(
        table,
        x="thought",
        y="rate",
        color="lens",
        line_dash="values",
        facet_col="layer",
        markers=True,
        **error_bars(table, "rate", low="low", high="high"),
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title or "The final answer read off each thought: top-1 rate by lens and layer (95% CI over problems)",
        labels={"thought": "thought (0 = BOT)", "rate": "answer top-1 rate"},
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return fig


def thought_decode_grid(decodes: pd.DataFrame, values: list[str], title: str | None = None) -> go.Figure:
    """One problem's lens read-out at every layer x thought (rows of :func:`codi_lens.lens.top_decodes`
    for one problem and one lens): colour = the top-1 token's probability, text = the top-1 token, marked
    with a star where it is one of the problem's intermediate ``values``; hover lists the top-k."""
    top1 = decodes[decodes["rank"] == 0]
    layers = sorted(top1["layer"].unique())
    thoughts = sorted(top1["thought"].unique())
    prob = top1.pivot(index="layer", columns="thought", values="prob").reindex(index=layers, columns=thoughts)
    token = top1.pivot(index="layer", columns="thought", values="token").reindex(index=layers, columns=thoughts)
    wanted = {str(v) for v in values}
    label = token.apply(lambda col: col.map(lambda t: f"★ {t}" if str(t).strip("Ġ▁ ") in wanted else str(t)))
    lists = (
        decodes.sort_values("rank")
        .groupby(["layer", "thought"])
        .apply(lambda g: "<br>".join(f"{t!s}: {p:.2f}" for t, p in zip(g["token"], g["prob"])), include_groups=False)
        .unstack()
        .reindex(index=layers, columns=thoughts)
    )
    fig = go.Figure(
        go.Heatmap(
            z=prob.to_numpy(),
            x=["BOT" if k == 0 else f"thought {k}" for k in thoughts],
            y=[f"layer {layer}" for layer in layers],
            text=label.to_numpy(),
            texttemplate="%{text}",
            customdata=lists.to_numpy(),
            hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>",
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "top-1 prob"},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"What each thought decodes to (★ = an intermediate value of this problem: {', '.join(values)})",
        xaxis_title="position (BOT, then the positions fed each thought)",
        yaxis_title="layer (0 = embedding input, last = after the final block)",
    )
    return fig
