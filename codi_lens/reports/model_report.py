"""A shipped model's report: does it answer through its thoughts, and can we read intermediate values from them?

1. Accuracy with the continuous thoughts, with all fed-back thoughts zero-ablated, in the teacher's explicit
   mode and (optionally) for a no-CoT model of the same size, per number of steps (:func:`model_conditions`).
2. The logit lens on every latent state, against another problem's values
   (:func:`codi_lens.lens.latent_value_readout`).
3. Minimal-pair patching of BOT and the thoughts, from the pair's own clean run and, the control, from
   another pair's (:func:`patching_with_both_donors`).

:func:`write_model_report` writes the tables and figures and returns the summary that the card
(:mod:`codi_lens.reports.model_card`) is written from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.accuracy import Condition
from codi_lens.core.model import CODIModel
from codi_lens.core.sites import Site
from codi_lens.data.pairs import make_pairs
from codi_lens.data.problems import Problem
from codi_lens.data.synthetic import value_limit
from codi_lens.interventions import zero_thoughts
from codi_lens.lens import top_k_share_by_step
from codi_lens.patching import DONORS, SPAN_STARTS, patch_sweep
from codi_lens.plotting import accuracy_bars, latent_readout_heatmap, patching_bars, write_html
from codi_lens.reports.model_card import CHAIN_CONDITION_NAMES, PATCHING_PROBLEMS, SHORT_BUDGET, TEACHER_CONDITION
from codi_lens.run.executors import Executor
from codi_lens.stats import mean_ci_table


def model_conditions(
    model: CODIModel, *, n_latents: int, budget: int, short_budget: bool = False, baseline: CODIModel | None = None
) -> list[Condition]:
    """The report's conditions: the loop, every thought zeroed (also at :data:`SHORT_BUDGET` tokens with
    ``short_budget``), the chain written out (:func:`chain_condition`), and a no-CoT ``baseline`` model when
    given."""
    zeroed = dict(fwd_hooks=zero_thoughts(range(1, n_latents + 1)), intervention=f"zero_thoughts(1..{n_latents})")
    conditions = [
        Condition("latents", model, n_latents=n_latents, max_new_tokens=budget),
        Condition("zero_all_thoughts", model, n_latents=n_latents, max_new_tokens=budget, **zeroed),
        chain_condition(model, budget),
    ]
    if short_budget:  # the card says how the answer budget changes the ablation figure
        name = f"zero_all_thoughts_{SHORT_BUDGET}_tokens"
        conditions.append(Condition(name, model, n_latents=n_latents, max_new_tokens=SHORT_BUDGET, **zeroed))
    if baseline is not None:
        conditions.append(Condition("no_cot_baseline", baseline, n_latents=0, max_new_tokens=budget))
    return conditions


def chain_condition(model: CODIModel, budget: int) -> Condition:
    """The model writing its chain out: CODI's and PCCoT's teacher mode (plain decoding after the question); for a
    loop without a teacher (Coconut), the latent span opened and closed at once (0 latents), as at its
    curriculum's stage 0."""
    name = CHAIN_CONDITION_NAMES[model.latent_loop.method]
    if name == TEACHER_CONDITION:
        return Condition(name, model, mode="explicit", max_new_tokens=budget)
    return Condition(name, model, n_latents=0, max_new_tokens=budget)


def patching_sites(n_layers: int, n_latents: int) -> list[Site]:
    """The report's sites: ``resid_post`` of each layer at BOT + every thought (``latents``), every thought,
    and each position alone; and each fed thought (``thought.k.hook_input``)."""
    positions = [*SPAN_STARTS, "bot", *[f"thought:{k}" for k in range(1, n_latents + 1)]]
    sites = [Site.of("resid_post", layer, position) for layer in range(n_layers) for position in positions]
    return sites + [Site.of("thought_input", None, f"thought:{k}") for k in range(1, n_latents + 1)]


def patching_with_both_donors(
    model: CODIModel,
    problems: list[Problem],
    out: str | Path,
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Recovery of the clean answer on minimal pairs of the first :data:`PATCHING_PROBLEMS` problems (one
    number changed, answer recomputed), for every site of :func:`patching_sites`, patched from the pair's own
    clean run (``donor="clean"``) and, the control, from another pair's (``donor="other"``). Resumable in
    ``out/patching_<donor>``."""
    patched = problems[:PATCHING_PROBLEMS]
    pairs, _ = make_pairs(patched, max_value=value_limit(patched))
    frames = []
    for donor in DONORS:
        rows, store = patch_sweep(
            model,
            pairs,
            Path(out) / f"patching_{donor}",
            sites=patching_sites(model.cfg.n_layers, n_latents),
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            donor=donor,
            settings=settings,
            overwrite=overwrite,
            executor=executor,
        )
        store.finish(rows, {"donor": donor})
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def patching_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery and its 95% bootstrap CI over pairs, per donor and site (used pairs only)."""
    used = rows[rows["reason"].fillna("") == ""]
    if used.empty:  # e.g. a model that answers no clean question right
        return pd.DataFrame(columns=["donor", "kind", "layer", "position", "n", "mean", "low", "high"])
    return mean_ci_table(used.fillna({"layer": -1}), ["donor", "kind", "layer", "position"], "recovery")


def _patching_figure(rows: pd.DataFrame, out: Path) -> None:
    used = rows[rows["reason"].fillna("") == ""]
    if used.empty:
        return
    label = np.where(
        used["kind"] == "thought_input",
        "fed " + used["position"],
        "L" + used["layer"].fillna(-1).astype(int).astype(str) + " " + used["position"],
    )
    write_html(
        patching_bars(
            used.assign(cell=label),
            "cell",
            color="donor",
            title="Recovery of the clean answer on minimal pairs, patched from the pair's own clean run "
            "or (control) another problem's (95% CI over pairs)",
        ),
        out / "patching.html",
    )


def _lens_summary(lens: pd.DataFrame) -> dict[str, Any]:
    real, control = lens[~lens["control"]], lens[lens["control"]]
    return {
        "top1_any": round(float(real["top1_any"].mean()), 4),
        "top5_any": round(float(real["topk_any"].mean()), 4),
        "top1_any_control": round(float(control["top1_any"].mean()), 4) if len(control) else None,
        "top5_any_control": round(float(control["topk_any"].mean()), 4) if len(control) else None,
        "single_token_values": round(float(real["token"].notna().mean()), 4),
    }


def _patching_summary(rows: pd.DataFrame, table: pd.DataFrame) -> dict[str, Any]:
    used = rows[rows["reason"].fillna("") == ""]
    return {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used[used["donor"] == "clean"]["pair_id"].nunique()),
        "recovery": [
            {
                "donor": r.donor,
                "hook": "thought.k.hook_input"
                if r.kind == "thought_input"
                else f"blocks.{int(r.layer)}.hook_resid_post",
                "position": r.position,
                "n": int(r.n),
                "mean": round(float(r.mean), 4),
                "ci95": [round(float(r.low), 4), round(float(r.high), 4)],
            }
            for r in table.itertuples()
        ],
    }


def write_model_report(
    accuracy: pd.DataFrame,
    lens: pd.DataFrame,
    patch_rows: pd.DataFrame,
    out: str | Path,
    *,
    title: str,
    n_latents: int,
) -> dict[str, Any]:
    """``accuracy.parquet``, ``logit_lens.parquet``, ``patching.parquet`` and the figures ``accuracy.html``,
    ``logit_lens.html`` and ``patching.html``. Returns the summary's accuracy, ablation, logit-lens and
    patching numbers."""
    out = Path(out)
    accuracy.to_parquet(out / "accuracy.parquet")
    lens.to_parquet(out / "logit_lens.parquet")
    accuracy_bars(accuracy, title=f"{title}: accuracy with and without its thoughts").write_html(out / "accuracy.html")
    heatmap = latent_readout_heatmap(top_k_share_by_step(lens[~lens["control"]], n_latents + 1))
    heatmap.write_html(out / "logit_lens.html")
    patching = patching_table(patch_rows)
    patching.to_parquet(out / "patching.parquet")
    _patching_figure(patch_rows, out)
    overall = accuracy[accuracy["group"] == "all"].set_index("condition")["accuracy"]
    return {
        "accuracy": overall.to_dict(),
        "ablation_drop_points": round(100 * (overall["latents"] - overall["zero_all_thoughts"]), 1),
        "accuracy_by_steps": {
            f"{r.condition}/{r.group}": round(r.accuracy, 4) for r in accuracy.itertuples() if r.group != "all"
        },
        "logit_lens": _lens_summary(lens),
        "patching": _patching_summary(patch_rows, patching),
    }
