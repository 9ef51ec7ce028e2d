"""Summarise a CODI or Coconut checkpoint without a base model (``python -m experiments.inspect_checkpoint``).

The summary gives the method (CODI or Coconut), the architecture family, layer count, vocabulary (and the
implied base vocabulary), LoRA use and rank, projection-head dims and LayerNorm, dtypes with tensor counts,
and the key count.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from codi_lens.loading.architectures import N_CODI_TOKENS
from codi_lens.loading.checkpoint import (
    METHOD_NAMES,
    CheckpointError,
    describe_contents,
    detect_layout,
    read_tensor_info,
    resolve_checkpoint_file,
)


def summarize_checkpoint(path: str | Path) -> dict:
    """A JSON-able summary of a checkpoint's layout, shapes and dtypes."""
    file = resolve_checkpoint_file(path)
    info = read_tensor_info(file)
    summary: dict = {
        "file": str(file),
        "bytes": file.stat().st_size,
        "n_keys": len(info),
        "dtypes": dict(Counter(t.dtype for t in info.values())),
        "contents": describe_contents(info),
    }
    try:
        layout = detect_layout(info)
    except CheckpointError as exc:
        summary["error"] = str(exc)
        return summary
    summary.update(
        {
            "method": layout.method,
            "trained_with": layout.trained_with,
            "auxiliary_keys": layout.auxiliary_keys,
            "family": layout.family,
            "n_layers": layout.n_layers,
            "vocab": layout.vocab,
            "base_vocab": layout.vocab - N_CODI_TOKENS,
            "d_model": info[layout.embed_key].shape[1],
            "lora": layout.uses_lora,
            "lora_rank": layout.lora_rank,
            "prj_dims": None
            if layout.prj_dim is None
            else list(info["prj.1.weight"].shape[::-1]) + [info["prj.3.weight"].shape[0]],
            "prj_layernorm": layout.prj_layernorm,
        }
    )
    return summary


def format_summary(summary: dict) -> str:
    """The summary as the text ``experiments.inspect_checkpoint`` prints."""
    lines = [f"{summary['file']} ({summary['bytes']:,} bytes)", f"  contents      {summary['contents']}"]
    if "error" in summary:
        lines.append(f"  error         {summary['error']}")
    else:
        coconut = summary["method"] == "coconut"
        added = "start-latent/end-latent/latent" if coconut else "pad/bot/eot"
        prj = (
            "none (Coconut feeds hidden states back unchanged)"
            if summary["prj_dims"] is None
            else f"{' -> '.join(map(str, summary['prj_dims']))}, layernorm {summary['prj_layernorm']}"
        )
        lines += [
            f"  method        {METHOD_NAMES[summary['method']]} loop, trained with {summary['trained_with']}"
            + (
                f" (auxiliary decoder: {summary['auxiliary_keys']} tensors, not read)"
                if summary["auxiliary_keys"]
                else ""
            ),
            f"  architecture  {summary['family']}, {summary['n_layers']} layers, d_model {summary['d_model']}",
            f"  vocab         {summary['vocab']} (base {summary['base_vocab']} + {added})",
            f"  lora          {'rank ' + str(summary['lora_rank']) if summary['lora'] else 'none'}",
            f"  prj           {prj}",
        ]
    dtypes = ", ".join(f"{k}: {v}" for k, v in sorted(summary["dtypes"].items()))
    lines += [f"  dtypes        {dtypes}", f"  keys          {summary['n_keys']}"]
    return "\n".join(lines)
