"""Figures of SAE quality, splicing, feature dashboards and feature pathways."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from codi_lens.plotting.base import TEMPLATE, error_bars


def sae_quality_bars(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Held-out explained variance of each SAE with its 95% CI, by site and architecture, with L0, dead
    and dense fractions in the hover (from ``experiments.train_saes``' results table)."""
    fig = px.bar(
        table,
        x="site",
        y="explained_variance",
        color="architecture",
        barmode="group",
        **error_bars(table, "explained_variance"),
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
        **error_bars(table, "accuracy", low="low", high="high"),
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


def screen_volcano(summary: pd.DataFrame, title: str | None = None) -> go.Figure:
    """The causal screen: every (feature, edit) as a point at its effect size (Cohen's d_z of the per-problem
    change in the gold answer's log-probability; a clamp's net of its random-direction control) against
    ``-log10 q`` (Benjamini-Hochberg across every cell), one panel per edit, coloured by site; the dotted line
    is q = 0.05."""
    tested = summary[summary["q_value"].notna()]  # cells with too few problems to test are not drawn
    table = tested.assign(minus_log10_q=-np.log10(tested["q_value"].clip(lower=1e-300)))
    fig = px.scatter(
        table,
        x="cohens_d",
        y="minus_log10_q",
        color="site",
        facet_col="op",
        symbol="significant",
        hover_data=["feature_id", "effect", "low", "high", "n", "frequency", "control_mean"],
        template=TEMPLATE,
        title=title or "Causal screen: effect size against BH-corrected significance, per feature and edit",
        labels={"cohens_d": "Cohen's d (per-problem change)", "minus_log10_q": "-log10 q"},
    )
    fig.add_hline(y=-np.log10(0.05), line_dash="dot", annotation_text="q = 0.05")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return fig


def screen_counts(counts: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Per site: features live on the screened problems, screened, and passing the screen (``counts`` with
    ``site, live, screened, causal``)."""
    long = counts.melt(id_vars="site", value_vars=["live", "screened", "causal"], var_name="features", value_name="n")
    return px.bar(
        long,
        x="site",
        y="n",
        color="features",
        barmode="group",
        template=TEMPLATE,
        title=title or "Features per site: live, screened, and causal (passing the screen)",
    )


def pathway_effects(pathways: pd.DataFrame, title: str | None = None) -> go.Figure:
    """One point per (target, source) pathway: the predicted (gradient attribution) against the replayed mean
    change of the target, with the replayed 95% CI over problems as error bars; filled points are validated."""
    table = pathways.assign(
        error_plus=pathways["high"] - pathways["replayed"], error_minus=pathways["replayed"] - pathways["low"]
    )
    fig = px.scatter(
        table,
        x="predicted",
        y="replayed",
        color="validated",
        error_y="error_plus",
        error_y_minus="error_minus",
        hover_data=["target_id", "source_id", "agreement"],
        template=TEMPLATE,
        title=title or "Feature pathways: predicted against replayed mean change of each target (95% CI)",
        labels={"predicted": "predicted mean change (attribution)", "replayed": "replayed mean change (ablation)"},
    )
    low = float(min(table["predicted"].min(), table["low"].min()))
    high = float(max(table["predicted"].max(), table["high"].max()))
    fig.add_shape(type="line", x0=low, y0=low, x1=high, y1=high, line={"dash": "dot", "color": "grey"})
    return fig
