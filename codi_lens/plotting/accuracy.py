"""Accuracy figures."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from codi_lens.plotting.base import TEMPLATE


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
