"""Activation datasets of the continuous thoughts: one vector per (problem, site), on disk, resumable.

A dataset's sites (:class:`~codi_lens.core.sites.Site`) are places at BOT or a thought: a thought hook
(``thought.k.hook_hidden``, ``thought.k.hook_input``, ``thought.k.hook_projection``), or a hook with a
position axis (``blocks.1.hook_resid_post``, ``blocks.0.hook_mlp_out``) read at thought ``k``'s position
(0 = BOT, 1..n = the positions fed thoughts 1..n, see :mod:`codi_lens.core.positions`). Rows are never
pooled across sites: every reader takes one site.

:func:`collect_activations` runs the CODI loop on problems (batch by batch, through the shared
:class:`~codi_lens.run.store.ResultStore`, so a killed run resumes and memory stays bounded by one
batch) and writes one Parquet row per (problem, site): ``unit_id`` (the problem id), ``problem_id``,
``hook``, ``thought`` and ``activation`` (float32, ``d`` values). :class:`ActivationDataset` reads one
site back as a ``[n_problems, d]`` tensor in problem order, reading only that site's rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.errors import CodiLensError
from codi_lens.core.model import CODIModel
from codi_lens.core.names import position_axis
from codi_lens.core.positions import gather_at
from codi_lens.core.sites import Site
from codi_lens.data.problems import Problem, problems_fingerprint
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore, read_parts


class ActivationError(CodiLensError, ValueError):
    """A site that the model or the dataset does not have."""


def check_sites(model: CODIModel, sites: Sequence[Site], n_latents: int) -> None:
    """Refuse, naming it, a site whose hook the model lacks or whose thought the run does not reach."""
    model.ensure_thought_hooks(n_latents)
    for site in sites:
        if site.hook not in model.hook_dict:
            raise ActivationError(f"site {site.id}: no hook point named {site.hook!r} (see model.hook_dict)")
        if not site.is_thought_hook and position_axis(site.hook) != 1:
            raise ActivationError(f"site {site.id}: {site.hook} has no [batch, pos, ...] axis to read a thought from")
        if site.thought is None:
            raise ActivationError(f"site {site.id}: a dataset reads BOT or a thought, not {site.position!r}")
        if not site.first_thought <= site.thought <= n_latents:
            raise ActivationError(f"site {site.id}: thought {site.thought} is outside 0..{n_latents} of this run")


def thought_activations(
    model: CODIModel, questions: Sequence[str], sites: Sequence[Site], *, n_latents: int = 6
) -> dict[Site, Float[Tensor, "batch d"]]:
    """The activation of every site for a batch of questions (one run of the latent loop, only the hooks
    needed cached: thought activations do not depend on the answer)."""
    run = model.run_latents(list(questions), names_filter=sorted({s.hook for s in sites}), n_latents=n_latents)
    out = {}
    for site in sites:
        acts = run.cache[site.hook]
        if not site.is_thought_hook:
            acts = gather_at(acts, run.positions.resolve([site.position]))[:, 0]
        out[site] = acts.reshape(len(questions), -1).float().cpu()
    return out


def activation_rows(
    model: CODIModel, problems: list[Problem], sites: Sequence[Site], *, n_latents: int = 6
) -> pd.DataFrame:
    """One row per (problem, site) for one batch: ``unit_id, problem_id, hook, thought, activation``."""
    acts = thought_activations(model, [p.question for p in problems], sites, n_latents=n_latents)
    frames = [
        pd.DataFrame(
            {
                UNIT_COLUMN: [p.id for p in problems],
                "problem_id": [p.id for p in problems],
                "hook": site.hook,
                "thought": site.thought,
                "activation": list(acts[site].numpy()),
            }
        )
        for site in sites
    ]
    return pd.concat(frames, ignore_index=True)


def collect_activations(
    model: CODIModel,
    problems: list[Problem],
    sites: Sequence[Site],
    out: str | Path,
    *,
    n_latents: int = 6,
    batch_size: int = 64,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> ActivationDataset:
    """Write the activations of ``sites`` on ``problems`` into ``out`` (resumable; see the module
    docstring) and return the dataset. ``settings`` are recorded in ``run.json`` with the checkpoint's
    hash, the problems' fingerprint and the sites."""
    sites = sorted(set(sites))
    check_sites(model, sites, n_latents)
    store = ResultStore(
        out,
        {
            **(settings or {}),
            "checkpoint_sha256": model.checkpoint_sha256,
            "data": problems_fingerprint(problems),
            "n_problems": len(problems),
            "sites": [s.id for s in sites],
            "n_latents": n_latents,
        },
        overwrite=overwrite,
    )
    store.run(
        problems,
        lambda batch: activation_rows(model, batch, sites, n_latents=n_latents),
        unit_id=lambda p: p.id,
        batch_size=batch_size,
        desc="thought activations",
        progress=progress,
        executor=executor,
        collect=False,
        unit="problem",
        model=model,
    )
    index = {"problem_ids": [p.id for p in problems], "sites": [s.id for s in sites]}
    (Path(out) / "index.json").write_text(json.dumps(index))
    return ActivationDataset(out)


class ActivationDataset:
    """A folder written by :func:`collect_activations`; reads one site at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "index.json"
        if not index.exists():
            raise ActivationError(f"{self.directory} holds no finished activation dataset (no index.json)")
        meta = json.loads(index.read_text())
        self.problem_ids: list[str] = meta["problem_ids"]
        self.sites: list[Site] = [Site.parse(s) for s in meta["sites"]]

    def load(self, site: Site, problem_ids: Sequence[str] | None = None) -> tuple[Float[Tensor, "n d"], list[str]]:
        """The activations of ``site`` as ``[n, d]`` float32 and their problem ids, in the dataset's
        problem order (or in the order of ``problem_ids``, which must all be present)."""
        if site not in self.sites:
            raise ActivationError(f"site {site.id} is not in {self.directory}; it has {[s.id for s in self.sites]}")
        ids: list[str] = []
        chunks: list[np.ndarray] = []
        where = (pc.field("hook") == site.hook) & (pc.field("thought") == site.thought)
        for table in read_parts(self.directory / "parts", columns=["problem_id", "activation"], where=where):
            ids += table["problem_id"].to_pylist()
            values = table["activation"].combine_chunks()
            chunks.append(values.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1))
        found = dict(zip(ids, range(len(ids))))
        wanted = list(self.problem_ids if problem_ids is None else problem_ids)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise ActivationError(f"site {site.id}: {len(missing)} problems have no row, e.g. {missing[:3]}")
        matrix = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
        order = [found[i] for i in wanted]
        return torch.from_numpy(np.ascontiguousarray(matrix[order], dtype=np.float32)), wanted
