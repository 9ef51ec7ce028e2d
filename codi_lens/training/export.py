"""A trained module written in upstream's on-disk layout, or loaded as a hooked :class:`CODIModel`."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from codi_lens.core.model import CODIModel
from codi_lens.loading.architectures import N_CODI_TOKENS, architecture_from_config
from codi_lens.loading.checkpoint import TensorInfo, validate_checkpoint
from codi_lens.loading.load import model_from_tensors
from codi_lens.training.module import CODIModule


def export_codi(model: CODIModule, tokenizer, out_dir: str | Path) -> Path:
    """Write the upstream layout: ``model.safetensors`` (whole state dict), base ``config.json``
    (vocabulary V, without the 3 CODI rows) and the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    config = model.base_lm.config.to_dict()
    config["vocab_size"] = config["vocab_size"] - N_CODI_TOKENS
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir / "model.safetensors"


def to_codi_model(model: CODIModule, tokenizer) -> CODIModel:
    """A hooked :class:`codi_lens.CODIModel` with the module's current weights (for validation)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    config = model.base_lm.config.to_dict()
    config["vocab_size"] -= N_CODI_TOKENS
    arch = architecture_from_config(config, "training state")
    info = {k: TensorInfo(tuple(v.shape), str(v.dtype)) for k, v in state.items()}
    layout = validate_checkpoint(info, arch, path="training state")
    return model_from_tensors(state, layout, arch, tokenizer)
