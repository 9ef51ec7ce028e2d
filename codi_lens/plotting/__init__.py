"""Plotly figures for codi_lens results, one module per family; every figure shares ``base.TEMPLATE``."""

from __future__ import annotations

from codi_lens.plotting.accuracy import accuracy_bars
from codi_lens.plotting.base import TEMPLATE, ci_bars, error_bars, mean_heatmap, write_html, write_page
from codi_lens.plotting.circuits import attribution_bars, head_heatmap, path_bars, source_heatmap
from codi_lens.plotting.importance import (
    attention_by_head,
    attention_by_layer,
    attention_vs_importance,
    importance_by_difficulty,
    importance_by_thought,
    pair_interaction_heatmap,
    problems_by_thought_heatmap,
    step_attention_heatmaps,
)
from codi_lens.plotting.patching import (
    patching_bars,
    patching_heatmap,
    recovery_slider,
    route_bars,
    route_layer_heatmap,
    trajectory_lines,
)
from codi_lens.plotting.reading import (
    answer_readout_lines,
    early_answer_curves,
    latent_readout_heatmap,
    probe_accuracy_lines,
    readout_heatmaps,
    thought_decode_grid,
    value_patching_bars,
)
from codi_lens.plotting.saes import (
    feature_dashboard,
    pathway_effects,
    pathway_scatter,
    sae_quality_bars,
    sae_splice_bars,
    screen_counts,
    screen_volcano,
)

__all__ = [
    "TEMPLATE",
    "accuracy_bars",
    "answer_readout_lines",
    "attribution_bars",
    "attention_by_head",
    "attention_by_layer",
    "attention_vs_importance",
    "early_answer_curves",
    "ci_bars",
    "error_bars",
    "feature_dashboard",
    "head_heatmap",
    "importance_by_difficulty",
    "importance_by_thought",
    "latent_readout_heatmap",
    "mean_heatmap",
    "pair_interaction_heatmap",
    "path_bars",
    "patching_bars",
    "patching_heatmap",
    "pathway_effects",
    "pathway_scatter",
    "probe_accuracy_lines",
    "problems_by_thought_heatmap",
    "readout_heatmaps",
    "recovery_slider",
    "route_bars",
    "route_layer_heatmap",
    "sae_quality_bars",
    "sae_splice_bars",
    "screen_counts",
    "screen_volcano",
    "source_heatmap",
    "step_attention_heatmaps",
    "thought_decode_grid",
    "trajectory_lines",
    "value_patching_bars",
    "write_html",
    "write_page",
]
