"""The plain encoder/decoder files of earlier CODI SAEs: converted to SAELens SAEs that compute the same, placed
at their thought, and measured on the thoughts of a loaded model (what ``experiments.convert_legacy_sae`` runs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from torch import Tensor

from codi_lens.activations import collect_activations
from codi_lens.core.model import CODIModel
from codi_lens.core.sites import Site
from codi_lens.data.problems import Problem
from codi_lens.saes.io import SAEError, save_sae, site_metadata
from codi_lens.saes.quality import reconstruction_metrics
from codi_lens.saes.suite import sae_id

LEGACY_KEYS = {
    "encoder.weight": ("d_sae", "d_in"),
    "encoder.bias": ("d_sae",),
    "decoder.weight": ("d_in", "d_sae"),
    "decoder.bias": ("d_in",),
}


#: A legacy file named ``pos_{p}_...`` belongs to thought ``p`` (earlier CODI work numbered the latent positions
#: it trained on by the thought they hold); ``position_offset`` shifts that when a folder counted from another base.
LEGACY_POSITION = re.compile(r"^pos_(\d+)_")


def read_legacy_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The encoder/decoder state dict and the config (empty if none) of a legacy SAE file: a state dict with
    ``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``decoder.weight [d_in, d_sae]``,
    ``decoder.bias [d_in]``, or ``{"model_state_dict": ..., "config": {...}}``. Loaded with
    ``weights_only=True``. Raises :class:`SAEError` naming an unreadable file or a missing or misshapen key."""
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
    return blob, config


def convention_thought(path: Path, config: dict[str, Any], *, position_offset: int = 0) -> int | None:
    """The thought a legacy file says it belongs to: its config's ``thought`` / ``position``, else the
    ``pos_{p}_`` naming convention (thought ``p + position_offset``); None when neither says."""
    if config.get("thought", config.get("position")) is not None:
        return int(config.get("thought", config.get("position")))
    match = LEGACY_POSITION.match(path.name)
    return None if match is None else int(match.group(1)) + position_offset


def legacy_sae(
    state: dict[str, Tensor], config: dict[str, Any], source: Path, *, hook_name: str, thought: int, k: int | None
) -> SAE:
    """The SAELens SAE of a read legacy file (:func:`read_legacy_file`), placed at ``hook_name`` read at
    ``thought``: top-``k`` (``k`` None: the config's ``k`` / ``topk``; none there: ReLU). It computes
    ``relu(encoder(x))`` (or its top-k) and ``decoder(f)``, as the file did, with no decoder bias subtracted
    first."""
    d_sae, d_in = state["encoder.weight"].shape
    k = k if k is not None else config.get("k", config.get("topk"))
    common = {"d_in": int(d_in), "d_sae": int(d_sae), "apply_b_dec_to_input": False}
    cfg = TopKSAEConfig(k=int(k), **common) if k else StandardSAEConfig(**common)
    for key, value in site_metadata(Site.at_thought(hook_name, int(thought))).items():
        cfg.metadata[key] = value
    cfg.metadata["converted_from"] = str(source)
    sae = (TopKSAE if k else StandardSAE)(cfg)
    sae.load_state_dict(
        {
            "W_enc": state["encoder.weight"].T.float().contiguous(),
            "b_enc": state["encoder.bias"].float(),
            "W_dec": state["decoder.weight"].T.float().contiguous(),
            "b_dec": state["decoder.bias"].float(),
        }
    )
    return sae


def convert_legacy_sae(
    path: str | Path, *, hook_name: str | None = None, thought: int | None = None, k: int | None = None
) -> SAE:
    """An SAELens SAE from a plain PyTorch file of an encoder/decoder pair, as earlier CODI work saved
    them (:func:`read_legacy_file`, :func:`legacy_sae`). ``hook_name`` / ``thought`` (or ``k``) may come from
    the config; a file named ``pos_{p}_...`` gives thought ``p`` when none is given. Raises :class:`SAEError`
    naming the missing or misshapen key, or asking for the hook and thought when nothing says them."""
    path = Path(path)
    state, config = read_legacy_file(path)
    hook_name = hook_name or config.get("hook_name")
    thought = thought if thought is not None else convention_thought(path, config)
    if hook_name is None or thought is None:
        raise SAEError(f"{path}: say which hook and thought the SAE belongs to (hook_name=, thought=)")
    return legacy_sae(state, config, path, hook_name=hook_name, thought=thought, k=k)


def legacy_files(directory: str | Path) -> list[Path]:
    """The PyTorch files (``*.pt``, ``*.pth``) of a folder of legacy SAEs, in name order (``SAEError`` if none)."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*") if p.suffix in (".pt", ".pth")) if directory.is_dir() else []
    if not files:
        raise SAEError(f"{directory} holds no .pt or .pth files of legacy SAEs")
    return files


def legacy_thought(
    path: Path,
    config: dict[str, Any],
    given: Mapping[str, int],
    *,
    position_offset: int = 0,
    ask: Callable[[str], str] | None = None,
) -> int:
    """Which thought a legacy SAE file (with its ``config``) belongs to: ``given[file name]``, else
    :func:`convention_thought`, else ``ask`` (a prompt, e.g. ``input`` when a person is at the terminal);
    ``SAEError`` naming the file when none says."""
    if path.name in given:
        return given[path.name]
    thought = convention_thought(path, config, position_offset=position_offset)
    if thought is not None:
        return thought
    if ask is not None:
        answer = ask(f"which thought (0 = BOT) does {path.name} belong to? ").strip()
        if answer.isdigit():
            return int(answer)
    raise SAEError(f"{path.name}: which thought is it? name it pos_<thought>_..., or give --thought {path.name}=K")


def evaluate_converted(
    model: CODIModel,
    saes: Mapping[Path, SAE],
    sites: Mapping[Path, Site],
    problems: list[Problem],
    out: str | Path,
    *,
    n_latents: int = 6,
    batch_size: int = 64,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Save each converted SAE as ``out/saes/<sae_id>`` and measure it on the thoughts of ``model`` on
    ``problems`` (``out/activations``, resumable): one row per file with ``file, sae_id, site, thought, d_in,
    d_sae, n_heldout`` and :func:`~codi_lens.saes.quality.reconstruction_metrics` (explained variance with its
    95% CI, L0, dead and dense fractions, cosine, MSE)."""
    out = Path(out)
    dataset = collect_activations(
        model,
        problems,
        sorted(set(sites.values())),
        out / "activations",
        n_latents=n_latents,
        batch_size=batch_size,
        overwrite=overwrite,
    )
    rows = []
    for path, sae in saes.items():
        site = sites[path]
        name = sae_id(site, sae.cfg.architecture())
        save_sae(sae, out / "saes" / name)
        x, _ = dataset.load(site)
        rows.append(
            {
                "file": path.name,
                "sae_id": name,
                "site": site.id,
                "thought": site.thought,
                "d_in": sae.cfg.d_in,
                "d_sae": sae.cfg.d_sae,
                "n_heldout": len(x),
                **reconstruction_metrics(sae, x),
            }
        )
    return pd.DataFrame(rows)
