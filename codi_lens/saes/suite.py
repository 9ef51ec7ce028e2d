"""A suite of SAEs on a model's thoughts: one per site x architecture, trained on one problem set, evaluated on
another (held-out reconstruction, and the answer with each reconstruction spliced into the loop with and
without its error term), every stage resumable in one output folder (what
``python -m experiments.train_saes`` runs).

Folder: ``activations/train`` and ``activations/heldout`` (the sites' activations), ``work/<sae id>``
(training checkpoints), ``saes/<sae id>`` (the trained SAELens folders), ``splice/`` (the splice test, one
unit per SAE), and the store itself (one row per SAE).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from codi_lens.activations import ActivationDataset, collect_activations
from codi_lens.core.model import CODIModel
from codi_lens.core.sites import Site
from codi_lens.data.problems import DataError, Problem
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore
from codi_lens.saes.io import load_sae, save_sae
from codi_lens.saes.quality import PlainRun, reconstruction_metrics, splice_effect
from codi_lens.saes.train import SAERecipe, train_sae

#: The splice conditions: the reconstruction alone, and with the error term (which restores the activation).
SPLICE_CONDITIONS = (("spliced", False), ("spliced_error", True))


def sae_id(site: Site, architecture: str) -> str:
    """A folder-safe id of one SAE: ``thought.3.hook_hidden-topk``, ``blocks.1.hook_resid_post@3-topk``."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", f"{site.id}-{architecture}")


def trained_sae(
    out: Path, site: Site, recipe: SAERecipe, rows: Float[Tensor, "n d"], *, model_name: str | None, device: str
) -> SAE:
    """The SAE of one site and recipe: loaded if it was saved, else trained (resuming) and saved."""
    folder = out / "saes" / sae_id(site, recipe.architecture)
    if (folder / "cfg.json").exists():
        return load_sae(folder, device=device)
    work = out / "work" / sae_id(site, recipe.architecture)
    sae = train_sae(rows, recipe, site, workdir=work, device=device, model_name=model_name)
    save_sae(sae, folder)
    return load_sae(folder, device=device)


def _evaluation_row(
    sae: SAE, site: Site, recipe: SAERecipe, heldout: ActivationDataset, splice: pd.DataFrame, n_train: int
) -> dict[str, Any]:
    x, _ = heldout.load(site)
    row = {
        "sae_id": sae_id(site, recipe.architecture),
        "hook": site.hook,
        "thought": site.thought,
        "site": site.id,
        "architecture": recipe.architecture,
        "d_sae": sae.cfg.d_sae,
        "k": recipe.k if recipe.architecture != "standard" else None,
        "n_train": n_train,
        "n_heldout": len(x),
        **reconstruction_metrics(sae, x),
    }
    mine = splice[splice["sae_id"] == row["sae_id"]]
    row["accuracy_plain"] = float(mine[mine["condition"] == "spliced"]["baseline_correct"].mean())
    for condition, group in mine.groupby("condition"):
        row[f"accuracy_{condition}"] = float(group["correct"].mean())
        row[f"kl_{condition}"] = float(group["kl"].mean())
        row[f"changed_{condition}"] = float(group["changed"].mean())
    return row


def train_sae_suite(
    model: CODIModel,
    train: list[Problem],
    heldout: list[Problem],
    sites: Sequence[Site],
    recipe: SAERecipe,
    architectures: Sequence[str],
    out: str | Path,
    *,
    splice_limit: int = 200,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    batch_size: int = 100,
    model_name: str | None = None,
    device: str = "cpu",
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, ResultStore]:
    """Train and evaluate one SAE per site x architecture (``recipe`` with each architecture), see the module
    docstring. Returns one row per SAE (``sae_id, hook, thought, site, architecture, d_sae, k`` and the
    held-out metrics of :func:`~codi_lens.saes.quality.reconstruction_metrics`, and per splice condition
    ``accuracy_*``, ``kl_*``, ``changed_*``), the splice rows (one per SAE x condition x problem) and the store.
    Training and held-out problems must not overlap (a ``DataError`` names one they share)."""
    shared = {p.id for p in train} & {p.id for p in heldout}
    if shared:
        raise DataError(f"the training and held-out problems share {len(shared)}, e.g. {sorted(shared)[0]}")
    out = Path(out)
    store = ResultStore(out, settings or {}, overwrite=overwrite)
    common = dict(n_latents=n_latents, batch_size=batch_size, executor=executor, overwrite=overwrite)
    train_acts = collect_activations(model, train, sites, out / "activations" / "train", **common)
    heldout_acts = collect_activations(model, heldout, sites, out / "activations" / "heldout", **common)
    recipes = {a: replace(recipe, architecture=a) for a in architectures}
    units = [(site, a) for site in sites for a in architectures]
    splice_problems = heldout[:splice_limit]
    plain: list[PlainRun] = []  # the plain run of the splice problems, computed once, on first use

    def splice_work(batch: list[tuple[Site, str]]) -> pd.DataFrame:
        if not plain:
            plain.append(PlainRun.of(model, splice_problems, n_latents=n_latents, max_new_tokens=max_new_tokens))
        frames = []
        for site, architecture in batch:
            rows = train_acts.load(site)[0]
            sae = trained_sae(out, site, recipes[architecture], rows, model_name=model_name, device=device)
            for condition, error in SPLICE_CONDITIONS:
                frame = splice_effect(
                    model,
                    splice_problems,
                    [sae],
                    use_error_term=error,
                    n_latents=n_latents,
                    max_new_tokens=max_new_tokens,
                    plain=plain[0],
                )
                frames.append(frame.assign(**{UNIT_COLUMN: sae_id(site, architecture)}, condition=condition))
        return pd.concat(frames, ignore_index=True)

    # Training happens in the first stage (each SAE is saved when trained, so it resumes SAE by SAE).
    splice_store = ResultStore(out / "splice", settings or {}, overwrite=overwrite)
    splice = splice_store.run(
        units, splice_work, unit_id=lambda u: sae_id(*u), batch_size=1, desc="SAEs", unit="SAE", model=model
    )
    splice = splice.rename(columns={UNIT_COLUMN: "sae_id"})

    def evaluate(batch: list[tuple[Site, str]]) -> pd.DataFrame:
        rows = []
        for site, architecture in batch:
            sae = load_sae(out / "saes" / sae_id(site, architecture), device=device)
            row = _evaluation_row(sae, site, recipes[architecture], heldout_acts, splice, len(train))
            rows.append({UNIT_COLUMN: row["sae_id"], **row})
        return pd.DataFrame(rows)

    results = store.run(units, evaluate, unit_id=lambda u: sae_id(*u), batch_size=len(units), desc="evaluation")
    return results, splice, store
