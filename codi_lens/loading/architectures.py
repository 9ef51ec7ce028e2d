"""Base-model architectures codi_lens understands, and their TransformerLens configs.

A CODI checkpoint stores no config, so the architecture comes from the *base* model: either a local
Hugging Face directory (``config.json``) or one of the built-in names below, whose configs codi_lens
knows without a model hub.

Two families are supported:

- ``"llama"``: LLaMA-style (RMSNorm, rotary with optional llama3 scaling, GQA, gated SiLU MLP).
- ``"gpt2"``: GPT-2 (LayerNorm, learned absolute positions, Conv1D weights, gelu_new MLP).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformer_lens import HookedTransformerConfig

from codi_lens.core.errors import CodiLensError, MissingFileError

Family = Literal["llama", "gpt2"]

#: Extra rows CODI appends to the base vocabulary: ``pad = V``, ``bot = V + 1``, ``eot = V + 2``.
N_CODI_TOKENS = 3

#: Context length given to TransformerLens when the base allows more: CODI sequences are a question,
#: 8 thought/marker positions and at most a few hundred answer tokens.
MAX_N_CTX = 4096

BUILTIN_BASES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b-instruct": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": 128009,
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "n_ctx": 1024,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
}


class BaseModelError(CodiLensError, ValueError):
    """A base model (directory or name) codi_lens cannot describe."""


@dataclass(frozen=True)
class BaseArchitecture:
    """What codi_lens needs to know about the base model, read from its HF config.

    Attributes:
        family: ``"llama"`` or ``"gpt2"``.
        base_vocab: V, the base vocabulary size (the CODI checkpoint has V + 3 rows).
        d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp: shapes.
        hf_config: the raw config dict (``config.json`` or a built-in).
        source: where it came from (a path or a built-in name), for error messages.
        added_tokens: rows the latent method grows the vocabulary by (CODI's and Coconut's 3; a PCCoT
            checkpoint's own count, its ``[PAD]`` included).
    """

    family: Family
    base_vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    hf_config: dict[str, Any]
    source: str
    added_tokens: int = N_CODI_TOKENS

    @property
    def codi_vocab(self) -> int:
        """V + 3: the vocabulary of the CODI checkpoint (pad, bot, eot appended); V + ``added_tokens`` in general."""
        return self.base_vocab + self.added_tokens

    @property
    def pad_id(self) -> int:
        return self.base_vocab

    @property
    def bot_id(self) -> int:
        return self.base_vocab + 1

    @property
    def eot_id(self) -> int:
        return self.base_vocab + 2

    @property
    def eos_id(self) -> int | None:
        """EOS id from the config (an int, or the first of a list); the tokenizer's wins when set."""
        eos = self.hf_config.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos


def read_base_config(base: str | Path) -> dict[str, Any]:
    """Return the HF config dict of ``base``: a built-in name or a directory holding ``config.json``."""
    key = str(base).lower()
    if key in BUILTIN_BASES:
        return dict(BUILTIN_BASES[key])
    path = Path(base)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise MissingFileError(
            f"base {str(base)!r} is neither a built-in base ({', '.join(BUILTIN_BASES)}) "
            f"nor a directory with a config.json"
        )
    return json.loads(config_file.read_text())


def describe_base(base: str | Path) -> BaseArchitecture:
    """Read the base config and summarise the architecture (family, vocabulary, shapes)."""
    return architecture_from_config(read_base_config(base), str(base))


def architecture_from_config(cfg: dict[str, Any], source: str = "<config>") -> BaseArchitecture:
    """Summarise an HF config dict (``config.to_dict()`` or ``config.json``) as a BaseArchitecture."""
    base = source
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
        d_model, n_heads = cfg.get("n_embd", 768), cfg.get("n_head", 12)
        return BaseArchitecture(
            family="gpt2",
            base_vocab=cfg["vocab_size"],
            d_model=d_model,
            n_layers=cfg.get("n_layer", 12),
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_head=d_model // n_heads,
            d_mlp=cfg.get("n_inner") or 4 * d_model,
            hf_config=cfg,
            source=str(base),
        )
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        d_model, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return BaseArchitecture(
            family="llama",
            base_vocab=cfg["vocab_size"],
            d_model=d_model,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            d_head=cfg.get("head_dim") or d_model // n_heads,
            d_mlp=cfg["intermediate_size"],
            hf_config=cfg,
            source=str(base),
        )
    raise BaseModelError(
        f"base {str(base)!r}: unsupported architecture model_type={model_type!r} "
        f"architectures={archs!r}; codi_lens supports LLaMA-family and GPT-2 bases"
    )


def _llama_rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """TransformerLens rotary fields from an HF LLaMA config (transformers 4 or 5 spelling)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (params if "rope_type" in params else {})
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    fields: dict[str, Any] = {"rotary_base": theta}
    rope_type = (scaling.get("rope_type") or scaling.get("type") or "default").lower()
    if rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(scaling["factor"]),
            NTK_by_parts_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            NTK_by_parts_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            NTK_original_ctx_len=int(scaling["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise BaseModelError(f"unsupported rope scaling {rope_type!r}; codi_lens knows 'llama3' and none")
    return fields


def to_hooked_config(
    arch: BaseArchitecture, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    """TransformerLens config for the CODI model: the base architecture with vocabulary V + 3.

    No weight processing is implied (no LayerNorm folding, no centring): codi_lens keeps the raw
    weights so the final-norm output equals HF's ``hidden_states[-1]``, which the projection consumes.
    """
    cfg = arch.hf_config
    common: dict[str, Any] = dict(
        d_model=arch.d_model,
        d_head=arch.d_head,
        n_heads=arch.n_heads,
        d_mlp=arch.d_mlp,
        n_layers=arch.n_layers,
        d_vocab=arch.codi_vocab,
        d_vocab_out=arch.codi_vocab,
        device=str(device),
        dtype=dtype,
        init_weights=False,
        default_prepend_bos=False,
    )
    if arch.family == "gpt2":
        return HookedTransformerConfig(
            **common,
            n_ctx=min(cfg.get("n_positions", 1024), MAX_N_CTX),
            eps=cfg.get("layer_norm_epsilon", 1e-5),
            act_fn=cfg.get("activation_function", "gelu_new"),
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
    return HookedTransformerConfig(
        **common,
        n_ctx=min(cfg.get("max_position_embeddings", 2048), MAX_N_CTX),
        eps=cfg.get("rms_norm_eps", 1e-5),
        act_fn=cfg.get("hidden_act", "silu"),
        n_key_value_heads=arch.n_kv_heads if arch.n_kv_heads != arch.n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=arch.d_head,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        **_llama_rope_fields(cfg),
    )
