"""SAEs on disk: SAELens folders that name their site (the plain encoder/decoder files of earlier CODI work are
read by :mod:`codi_lens.saes.legacy`).

One SAE belongs to one :class:`~codi_lens.core.sites.Site` (a hook and a thought) and records it in its
SAELens metadata: ``hook_name`` (the hook it attaches to), ``codi_thoughts`` (the thought positions it
belongs to) and ``codi_site``. Saved SAEs are plain SAELens folders (``cfg.json`` +
``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE

from codi_lens.core.errors import CodiLensError
from codi_lens.core.sites import Site


class SAEError(CodiLensError, ValueError):
    """An SAE file, key, shape or setting that codi_lens cannot use; the message names it."""


def site_metadata(site: Site, model_name: str | None = None) -> dict[str, Any]:
    """What an SAE records about where it belongs (SAELens metadata fields)."""
    return {"hook_name": site.hook, "codi_thoughts": [site.thought], "codi_site": site.id, "model_name": model_name}


def sae_site(sae: SAE) -> Site:
    """The site an SAE belongs to, from its metadata (``SAEError`` naming what is missing)."""
    meta = sae.cfg.metadata
    if not meta.hook_name:
        raise SAEError("the SAE's metadata has no hook_name: codi_lens cannot tell where it attaches")
    thoughts = meta.get("codi_thoughts")
    if not thoughts:
        site = Site(meta.hook_name) if meta.hook_name.startswith("thought.") else None
        if site is None:
            raise SAEError(f"the SAE at {meta.hook_name} has no codi_thoughts in its metadata: which thought?")
        return site
    return Site.at_thought(meta.hook_name, int(thoughts[0]))


def save_sae(sae: SAE | TrainingSAE, directory: str | Path) -> Path:
    """Save in SAELens format (a training SAE as its inference version); returns the folder."""
    directory = Path(directory)
    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(directory)
    else:
        sae.save_model(directory)
    return directory


def load_sae(directory: str | Path, *, device: str = "cpu") -> SAE:
    """An SAE saved in SAELens format, checked to carry the site metadata codi_lens needs."""
    directory = Path(directory)
    for name in ("cfg.json", "sae_weights.safetensors"):
        if not (directory / name).exists():
            raise SAEError(f"{directory} is not an SAELens folder: {name} is missing")
    sae = SAE.load_from_disk(directory, device=device)
    sae_site(sae)
    return sae


def load_saes(directory: str | Path, ids: Sequence[str] | None = None, *, device: str = "cpu") -> dict[str, SAE]:
    """The SAEs of a folder of SAELens folders (``experiments.train_saes`` writes ``DIR/saes/<sae_id>/``;
    either ``DIR`` or ``DIR/saes`` may be given), by id, in id order; ``ids`` picks some (named if absent)."""
    directory = Path(directory)
    if (directory / "saes").is_dir():
        directory = directory / "saes"
    found = sorted(p.name for p in directory.iterdir() if (p / "cfg.json").exists()) if directory.is_dir() else []
    if not found:
        raise SAEError(f"{directory} holds no SAELens folders (run python -m experiments.train_saes first)")
    missing = [i for i in ids or [] if i not in found]
    if missing:
        raise SAEError(f"no SAE {missing[0]!r} in {directory}; it has {found}")
    return {i: load_sae(directory / i, device=device) for i in (ids or found)}
