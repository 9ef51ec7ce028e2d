"""Activation datasets of the continuous thoughts: one vector per (problem, site), on disk, resumable.

A :class:`Site` is one place in the latent loop: a hook and a thought. For a thought hook
(``thought.k.hook_hidden``, ``thought.k.hook_input``, ``thought.k.hook_projection``) the thought is
``k`` itself; for a hook with a position axis (``blocks.1.hook_resid_post``, ``blocks.0.hook_mlp_out``)
the activation is read at thought ``k``'s position (0 = BOT, 1..n = the positions fed thoughts 1..n,
see :mod:`codi_lens.hooks`). Rows are never pooled across sites: every reader takes one site.

:func:`collect_activations` runs the CODI loop on problems (batch by batch, through the shared
:class:`~codi_lens.runner.ResultStore`, so a killed run resumes and memory stays bounded by one
batch) and writes one Parquet row per (problem, site): ``unit_id`` (the problem id), ``problem_id``,
``hook``, ``thought`` and ``activation`` (float32, ``d`` values). :class:`ActivationDataset` reads one
site back as a ``[n_problems, d]`` tensor in problem order, reading only that site's rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.data import Problem, problems_fingerprint
from codi_lens.distributed import Executor
from codi_lens.hooks import parse_thought_hook, position_axis
from codi_lens.model import CODIModel
from codi_lens.runner import UNIT_COLUMN, ResultStore, read_parts


class ActivationError(ValueError):
    """A site that the model or the dataset does not have."""


@dataclass(frozen=True, order=True)
class Site:
    """One (hook, thought) place of the latent loop (see the module docstring)."""

    hook: str
    thought: int

    @classmethod
    def of_thought_hook(cls, name: str) -> Site:
        parsed = parse_thought_hook(name)
        if parsed is None:
            raise ActivationError(f"{name!r} is not a thought hook (thought.k.hook_hidden|input|projection)")
        return cls(name, parsed[0])

    @property
    def is_thought_hook(self) -> bool:
        return parse_thought_hook(self.hook) is not None

    @property
    def first_thought(self) -> int:
        """The first thought the site exists at: 1 for a thought's input (nothing is fed at BOT), else 0."""
        return 1 if self.hook.endswith("hook_input") else 0

    def at(self, thought: int) -> Site:
        """The same place at another thought (``thought.3.hook_hidden`` -> ``thought.5.hook_hidden``)."""
        if self.is_thought_hook:
            return Site(f"thought.{thought}.{self.hook.split('.', 2)[2]}", thought)
        return Site(self.hook, thought)

    def across_thoughts(self, n_latents: int) -> list[Site]:
        """The same place at every thought of a run with ``n_latents`` thoughts."""
        return [self.at(k) for k in range(self.first_thought, n_latents + 1)]

    @property
    def position(self) -> str | None:
        """The named position the site reads (``"bot"``, ``"thought:k"``); None for a thought hook."""
        if self.is_thought_hook:
            return None
        return "bot" if self.thought == 0 else f"thought:{self.thought}"

    @property
    def id(self) -> str:
        """A file-name-safe id: ``thought.3.hook_hidden`` or ``blocks.1.hook_resid_post@3``."""
        return self.hook if self.is_thought_hook else f"{self.hook}@{self.thought}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """The inverse of :attr:`id` (also accepts ``hook@thought`` for thought hooks if they agree)."""
        hook, _, thought = text.partition("@")
        if parse_thought_hook(hook) is not None:
            site = cls.of_thought_hook(hook)
            if thought and int(thought) != site.thought:
                raise ActivationError(f"{text!r}: {hook} belongs to thought {site.thought}, not {thought}")
            return site
        if not thought:
            raise ActivationError(f"{text!r}: a hook with a position axis needs a thought, e.g. {hook}@3")
        return cls(hook, int(thought))


def check_sites(model: CODIModel, sites: Sequence[Site], n_latents: int) -> None:
    """Refuse, naming it, a site whose hook the model lacks or whose thought the run does not reach."""
    model.ensure_thought_hooks(n_latents)
    for site in sites:
        if site.hook not in model.hook_dict:
            raise ActivationError(f"site {site.id}: no hook point named {site.hook!r} (see model.hook_dict)")
        if not site.is_thought_hook and position_axis(site.hook) != 1:
            raise ActivationError(f"site {site.id}: {site.hook} has no [batch, pos, ...] axis to read a thought from")
        if not site.first_thought <= site.thought <= n_latents:
            raise ActivationError(f"site {site.id}: thought {site.thought} is outside 0..{n_latents} of this run")


def thought_activations(
    model: CODIModel, questions: Sequence[str], sites: Sequence[Site], *, n_latents: int = 6
) -> dict[Site, Float[Tensor, "batch d"]]:
    """The activation of every site for a batch of questions (one CODI run, only the hooks needed
    cached; the answer is cut to one token: thought activations do not depend on it)."""
    hooks = sorted({s.hook for s in sites})
    result, cache = model.run_codi_with_cache(
        list(questions), names_filter=hooks, n_latents=n_latents, max_new_tokens=1
    )
    where = [result.positions.bot, *result.positions.thoughts]
    out = {}
    for site in sites:
        acts = cache[site.hook]
        out[site] = acts if site.is_thought_hook else acts[:, where[site.thought]]
        out[site] = out[site].reshape(len(questions), -1).float().cpu()
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
