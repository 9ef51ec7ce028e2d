"""Plotly figures for codi_lens results (one place for every figure's look)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from codi_lens.stats import mean_ci_table

TEMPLATE = "plotly_white"


def accuracy_bars(table: pd.DataFrame, title: str = "Accuracy by number of steps") -> go.Figure:
    """Grouped bars from :func:`codi_lens.accuracy.accuracy_table`: one colour per condition, with the
    95% bootstrap CI over problems as error bars."""
    table = table.assign(above=table["high"] - table["accuracy"], below=table["accuracy"] - table["low"])
    fig = px.bar(
        table,
        x="group",
        y="accuracy",
        color="condition",
        barmode="group",
        text="accuracy",
        error_y="above",
        error_y_minus="below",
        hover_data=["n", "n_correct", "low", "high"],
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


def _mean_heatmap(grid: pd.DataFrame, y: str, facet: str, title: str, facet_wrap: int = 0) -> go.Figure:
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


def attention_by_layer(attention: pd.DataFrame, title: str = "Attention to BOT and each thought") -> go.Figure:
    """Layer x thought heatmap of the mean attention weight (over problems, heads and sources), one
    panel per source kind (``eot`` / ``answer``)."""
    frame = attention.assign(source_kind=attention["source"].str.split(":").str[0])
    grid = frame.groupby(["source_kind", "layer", "thought"])["weight"].mean().reset_index()
    return _mean_heatmap(grid, "layer", "source_kind", title)


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
    return _mean_heatmap(grid, "head", "layer", title, facet_wrap=4)


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
        error_y=table["high"] - table["mean"],
        error_y_minus=table["mean"] - table["low"],
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
        error_y=table["high"] - table["mean"],
        error_y_minus=table["mean"] - table["low"],
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title or f"{value} of the patched run at each later thought (95% CI over pairs)",
        labels={"mean": value, "thought": "thought k"},
    )
    fig.update_xaxes(dtick=1)
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
        error_y=part["high"] - part["accuracy"],
        error_y_minus=part["accuracy"] - part["low"],
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
        error_y=table["high"] - table["mean"],
        error_y_minus=table["mean"] - table["low"],
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
        error_y=table["high"] - table["mean"],
        error_y_minus=table["mean"] - table["low"],
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
        error_y=table["high"] - table["rate"],
        error_y_minus=table["rate"] - table["low"],
        hover_data=["n", "low", "high"],
        template=TEMPLATE,
        title=title or "The final answer read off each thought: top-1 rate by lens and layer (95% CI over problems)",
        labels={"thought": "thought (0 = BOT)", "rate": "answer top-1 rate"},
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return fig


def sae_quality_bars(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Held-out explained variance of each SAE with its 95% CI, by site and architecture, with L0, dead
    and dense fractions in the hover (from ``experiments.train_saes``' results table)."""
    fig = px.bar(
        table,
        x="site",
        y="explained_variance",
        color="architecture",
        barmode="group",
        error_y=table["explained_variance_high"] - table["explained_variance"],
        error_y_minus=table["explained_variance"] - table["explained_variance_low"],
        hover_data=["sae_id", "d_sae", "l0", "dead_fraction", "dense_fraction", "cosine"],
        template=TEMPLATE,
        title=title or "SAE explained variance on held-out problems (95% CI over problems)",
        labels={"site": "site (hook @ thought)", "explained_variance": "explained variance"},
    )
    fig.add_hline(y=0.9, line_dash="dot", annotation_text="0.9")
    fig.update_yaxes(range=[0, 1.02])
    return fig


def sae_splice_bars(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Accuracy with each SAE's reconstruction spliced into the loop (with and without the error term)
    against the plain run, with 95% CIs over problems (``condition``: plain / spliced / spliced+error)."""
    fig = px.bar(
        table,
        x="site",
        y="accuracy",
        color="condition",
        barmode="group",
        facet_col="architecture",
        error_y=table["high"] - table["accuracy"],
        error_y_minus=table["accuracy"] - table["low"],
        hover_data=["sae_id", "n", "kl_mean"],
        template=TEMPLATE,
        title=title or "Accuracy with the SAE reconstruction in the latent loop (95% CI over problems)",
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    return fig


def feature_dashboard(
    frequency: pd.DataFrame,
    profile: pd.DataFrame,
    examples: pd.DataFrame,
    features: list[int],
    title: str,
) -> go.Figure:
    """An SAE feature browser: every feature's frequency against its mean activation when active (left,
    hover for the numbers), and for the feature picked in the dropdown (among ``features``) its
    frequency at each thought (the SAE applied to its hook at every thought; the SAE's own thought
    marked) and its top-activating problems with their intermediate values."""
    fig = make_subplots(
        rows=2,
        cols=2,
        column_widths=[0.4, 0.6],
        row_heights=[0.4, 0.6],
        specs=[[{"rowspan": 2}, {"type": "xy"}], [None, {"type": "table"}]],
        subplot_titles=("All features", "Frequency by thought (picked feature)", ""),
    )
    fig.add_trace(
        go.Scatter(
            x=frequency["frequency"],
            y=frequency["mean_when_active"],
            mode="markers",
            marker={"size": 5, "color": "#4C78A8"},
            customdata=frequency[["feature", "max_activation"]].to_numpy(),
            hovertemplate="feature %{customdata[0]}<br>frequency %{x:.3f}<br>mean when active %{y:.3f}"
            "<br>max %{customdata[1]:.3f}<extra></extra>",
            name="features",
        ),
        row=1,
        col=1,
    )
    per_feature = 2
    for i, feature in enumerate(features):
        mine = profile[profile["feature"] == feature].sort_values("thought")
        fig.add_trace(
            go.Bar(
                x=mine["thought"],
                y=mine["frequency"],
                marker_color=["#E45756" if own else "#72B7B2" for own in mine["own"]],
                customdata=mine["mean_activation"],
                hovertemplate="thought %{x}<br>frequency %{y:.3f}<br>mean activation %{customdata:.3f}<extra></extra>",
                name=f"feature {feature}",
                visible=i == 0,
            ),
            row=1,
            col=2,
        )
        top = examples[examples["feature"] == feature]
        fig.add_trace(
            go.Table(
                header={"values": ["rank", "activation", "question", "intermediates", "gold"], "align": "left"},
                cells={
                    "values": [
                        top["rank"],
                        top["activation"].round(3),
                        top["question"],
                        top["intermediates"],
                        top["gold"],
                    ],
                    "align": "left",
                },
                columnwidth=[0.5, 0.8, 5, 1.5, 0.6],
                visible=i == 0,
            ),
            row=2,
            col=2,
        )
    buttons = []
    for i, feature in enumerate(features):
        visible = [True] + [j // per_feature == i for j in range(per_feature * len(features))]
        buttons.append({"label": f"feature {feature}", "method": "update", "args": [{"visible": visible}]})
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        height=800,
        showlegend=False,
        updatemenus=[{"buttons": buttons, "x": 0.42, "y": 1.08, "xanchor": "left", "showactive": True}],
    )
    fig.update_xaxes(title_text="frequency (share of problems)", row=1, col=1)
    fig.update_yaxes(title_text="mean activation when active", row=1, col=1)
    fig.update_xaxes(title_text="thought (0 = BOT)", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="frequency", row=1, col=2)
    return fig


def pathway_scatter(joined: pd.DataFrame, summary: dict, title: str | None = None) -> go.Figure:
    """Predicted (gradient attribution) against actual (replayed ablation) change of the target feature,
    one point per (candidate source feature, problem), with the Pearson correlation and its CI."""
    label = joined["source_site"] + " f" + joined["source_feature"].astype(str)
    fig = px.scatter(
        joined.assign(candidate=label),
        x="predicted",
        y="actual",
        color="candidate",
        hover_data=["problem", "source_site", "source_feature"],
        template=TEMPLATE,
        title=title
        or f"Feature pathways: predicted vs replayed change of the target (Pearson {summary['pearson']:.2f}, "
        f"95% CI [{summary['low']:.2f}, {summary['high']:.2f}], {summary['n_problems']} problems)",
        labels={"predicted": "predicted change (attribution)", "actual": "actual change (ablation replayed)"},
    )
    low = float(min(joined["predicted"].min(), joined["actual"].min()))
    high = float(max(joined["predicted"].max(), joined["actual"].max()))
    fig.add_shape(type="line", x0=low, y0=low, x1=high, y1=high, line={"dash": "dot", "color": "grey"})
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
