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
