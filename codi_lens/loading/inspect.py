"""Summarise a CODI, Coconut or PCCoT checkpoint without a base model (``python -m experiments.inspect_checkpoint``).

The summary gives the method (CODI, Coconut or PCCoT: for PCCoT also its thoughts, sweeps and answer prompt),
the architecture family, layer count, vocabulary (and the
implied base vocabulary), LoRA use and rank, projection-head dims and LayerNorm, dtypes with tensor counts,
and the key count.
"""

from __future__ import annotations

import re
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
from codi_lens.loading.pccot import PEFT_PREFIX, is_pccot_checkpoint, read_pccot


def summarize_checkpoint(path: str | Path) -> dict:
    """A JSON-able summary of a checkpoint's layout, shapes and dtypes."""
    if is_pccot_checkpoint(path):
        return summarize_pccot(path)
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


def summarize_pccot(path: str | Path) -> dict:
    """The summary of a PCCoT directory: its adapter file and settings (the base weights live elsewhere)."""
    pccot = read_pccot(path)
    info = read_tensor_info(pccot.adapter_file)
    lora_a = sorted(k for k in info if ".lora_A." in k)
    layers = {int(m.group(1)) for k in lora_a if (m := re.search(r"\.(?:h|layers)\.(\d+)\.", k))}
    head = info.get(f"{PEFT_PREFIX}prj.0.weight")
    return {
        "file": str(pccot.adapter_file),
        "bytes": pccot.adapter_file.stat().st_size,
        "n_keys": len(info),
        "dtypes": dict(Counter(t.dtype for t in info.values())),
        "contents": f"a PCCoT {pccot.family} LoRA adapter (the base's weights are read from the base directory)",
        "method": "pccot",
        "trained_with": "PCCoT",
        "auxiliary_keys": 0,
        "family": pccot.family,
        "n_layers": max(layers) + 1 if layers else 0,
        "vocab": pccot.vocab,
        "base_vocab": None,
        "d_model": None if not lora_a else info[lora_a[0]].shape[1],
        "lora": True,
        "lora_rank": pccot.lora_rank,
        "prj_dims": None if head is None else [head.shape[1], head.shape[0], head.shape[0]],
        "prj_layernorm": head is not None,
        "n_latents": pccot.n_latents,
        "n_sweeps": pccot.n_sweeps,
        "answer_prompt": pccot.answer_prompt,
        "trainable_rows": list(pccot.trainable_rows),
    }


def format_summary(summary: dict) -> str:
    """The summary as the text ``experiments.inspect_checkpoint`` prints."""
    lines = [f"{summary['file']} ({summary['bytes']:,} bytes)", f"  contents      {summary['contents']}"]
    if "error" in summary:
        lines.append(f"  error         {summary['error']}")
    else:
        added = {"coconut": "start-latent/end-latent/latent", "pccot": "pcot.bot/pcot.eot/pcot.latent, pad"}.get(
            summary["method"], "pad/bot/eot"
        )
        prj = (
            f"none ({METHOD_NAMES[summary['method']]} feeds hidden states back unchanged)"
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
            f"  vocab         {summary['vocab']} ("
            + (f"base {summary['base_vocab']} + " if summary["base_vocab"] is not None else "with ")
            + f"{added})",
            f"  lora          {'rank ' + str(summary['lora_rank']) if summary['lora'] else 'none'}",
            f"  prj           {prj}",
        ]
        if summary["method"] == "pccot":
            lines.append(
                f"  loop          {summary['n_latents']} thoughts, sweep 0 then {summary['n_sweeps']} sweeps "
                f"(Jacobi), answer prompt {summary['answer_prompt']!r}, trained rows {summary['trainable_rows']}"
            )
    dtypes = ", ".join(f"{k}: {v}" for k, v in sorted(summary["dtypes"].items()))
    lines += [f"  dtypes        {dtypes}", f"  keys          {summary['n_keys']}"]
    return "\n".join(lines)
