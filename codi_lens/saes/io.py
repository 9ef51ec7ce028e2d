"""SAEs on disk: SAELens folders that name their site, and the plain encoder/decoder files of earlier CODI work.

One SAE belongs to one :class:`~codi_lens.core.sites.Site` (a hook and a thought) and records it in its
SAELens metadata: ``hook_name`` (the hook it attaches to), ``codi_thoughts`` (the thought positions it
belongs to) and ``codi_site``. Saved SAEs are plain SAELens folders (``cfg.json`` +
``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
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


LEGACY_KEYS = {
    "encoder.weight": ("d_sae", "d_in"),
    "encoder.bias": ("d_sae",),
    "decoder.weight": ("d_in", "d_sae"),
    "decoder.bias": ("d_in",),
}


def convert_legacy_sae(
    path: str | Path, *, hook_name: str | None = None, thought: int | None = None, k: int | None = None
) -> SAE:
    """An SAELens SAE from a plain PyTorch file of an encoder/decoder pair, as earlier CODI work saved
    them: a state dict with ``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``decoder.weight
    [d_in, d_sae]``, ``decoder.bias [d_in]``, or ``{"model_state_dict": ..., "config": {...}}``. Those
    SAEs compute ``relu(encoder(x))`` (or its top-``k``) and ``decoder(f)``, with no decoder bias
    subtracted first; the converted SAE computes the same. ``hook_name`` / ``thought`` (or ``k``) may
    come from the config; a file named ``pos_{p}_...`` gives thought ``p`` when none is given. Loaded
    with ``weights_only=True``. Raises :class:`SAEError` naming the missing or misshapen key."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix, named
        raise SAEError(f"{path}: not a readable PyTorch file ({exc})") from None
    config: dict[str, Any] = {}
    if isinstance(blob, dict) and "model_state_dict" in blob:
        config = dict(blob.get("config") or {})
        blob = blob["model_state_dict"]
    if not isinstance(blob, dict):
        raise SAEError(f"{path}: expected a state dict, found {type(blob).__name__}")
    missing = [key for key in LEGACY_KEYS if key not in blob]
    if missing:
        raise SAEError(f"{path}: missing key {missing[0]!r} (found {sorted(blob)[:8]})")
    d_sae, d_in = blob["encoder.weight"].shape if blob["encoder.weight"].dim() == 2 else (None, None)
    sizes = {"d_sae": d_sae, "d_in": d_in}
    for key, dims in LEGACY_KEYS.items():
        expected = tuple(sizes[d] for d in dims)
        if tuple(blob[key].shape) != expected:
            raise SAEError(f"{path}: key {key!r} has shape {tuple(blob[key].shape)}, expected {expected} ({dims})")
    hook_name = hook_name or config.get("hook_name")
    if thought is None:
        thought = config.get("thought", config.get("position"))
    if thought is None and path.name.startswith("pos_"):
        thought = int(path.name.split("_")[1])
    if hook_name is None or thought is None:
        raise SAEError(f"{path}: say which hook and thought the SAE belongs to (hook_name=, thought=)")
    k = k if k is not None else config.get("k", config.get("topk"))
    common = {"d_in": int(d_in), "d_sae": int(d_sae), "apply_b_dec_to_input": False}
    cfg = TopKSAEConfig(k=int(k), **common) if k else StandardSAEConfig(**common)
    for key, value in site_metadata(Site.at_thought(hook_name, int(thought))).items():
        cfg.metadata[key] = value
    cfg.metadata["converted_from"] = str(path)
    sae = (TopKSAE if k else StandardSAE)(cfg)
    state = {
        "W_enc": blob["encoder.weight"].T.float().contiguous(),
        "b_enc": blob["encoder.bias"].float(),
        "W_dec": blob["decoder.weight"].T.float().contiguous(),
        "b_dec": blob["decoder.bias"].float(),
    }
    sae.load_state_dict(state)
    return sae


#: A legacy file named ``pos_{p}_...`` belongs to thought ``p`` (earlier CODI work numbered the latent positions
#: it trained on by the thought they hold); ``position_offset`` shifts that when a folder counted from another base.
LEGACY_POSITION = re.compile(r"^pos_(\d+)_")


def legacy_files(directory: str | Path) -> list[Path]:
    """The PyTorch files (``*.pt``, ``*.pth``) of a folder of legacy SAEs, in name order (``SAEError`` if none)."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*") if p.suffix in (".pt", ".pth")) if directory.is_dir() else []
    if not files:
        raise SAEError(f"{directory} holds no .pt or .pth files of legacy SAEs")
    return files


def legacy_thought(
    path: Path, given: dict[str, int], *, position_offset: int = 0, ask: Callable[[str], str] | None = None
) -> int:
    """Which thought a legacy SAE file belongs to: ``given[file name]``, else its config's ``thought`` /
    ``position``, else the ``pos_{p}_`` naming convention (thought ``p + position_offset``), else ``ask`` (a
    prompt, e.g. ``input`` when a person is at the terminal); ``SAEError`` naming the file when none says."""
    if path.name in given:
        return given[path.name]
    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = blob.get("config") or {} if isinstance(blob, dict) else {}
    if config.get("thought", config.get("position")) is not None:
        return int(config.get("thought", config.get("position")))
    match = LEGACY_POSITION.match(path.name)
    if match:
        return int(match.group(1)) + position_offset
    if ask is not None:
        answer = ask(f"which thought (0 = BOT) does {path.name} belong to? ").strip()
        if answer.isdigit():
            return int(answer)
    raise SAEError(f"{path.name}: which thought is it? name it pos_<thought>_..., or give --thought {path.name}=K")
