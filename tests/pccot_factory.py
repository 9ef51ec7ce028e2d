"""Small PCCoT checkpoints in the exact upstream on-disk layout, built with real transformers + peft.

Upstream's ``run_ccot.py`` adds ``<pcot.bot>``, ``<pcot.eot>`` and ``<pcot.latent>`` to the base tokenizer
as additional special tokens (then ``[PAD]`` when it has no pad token), grows the embeddings to the
tokenizer's length, wraps the LM with ``peft.get_peft_model`` (LoRA on every projection, the rows of those
tokens, pad and EOS trainable through ``trainable_token_indices``, and ``modules_to_save``) and saves with
``save_pretrained``: a directory holding ``adapter_model.safetensors``, ``adapter_config.json``, the
model's ``config.json`` (``model_type`` ``pccot-gpt2`` / ``pccot-llama``, ``use_projection``,
``num_iterations``), the tokenizer and ``pccot_args.json``. The base weights stay in the base's own
directory. We build that with peft itself, so the keys are peft's rather than typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from upstream_factory import GPT2_TARGETS, LLAMA_TARGETS, Family, make_base_dir, randomise

#: The tokens upstream PCCoT adds, in its order.
PCCOT_ADDED = ("<pcot.bot>", "<pcot.eot>", "<pcot.latent>")
ANSWER_PROMPT = "The answer is:"


def _with_projection_head(lm_class: type) -> type:
    """Upstream's ``PCCoTGPT2LMHeadModel`` / ``PCCoTLlamaForCausalLM``: the HF causal LM class, plus, with
    ``config.use_projection``, ``prj = Sequential(Linear, GELU, Linear, LayerNorm)``."""

    class PCCoTLM(lm_class):
        def __init__(self, config):
            super().__init__(config)
            if getattr(config, "use_projection", False):
                d = config.hidden_size
                self.prj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))

        def project(self, h: torch.Tensor) -> torch.Tensor:
            return self.prj(h) if hasattr(self, "prj") else h

    PCCoTLM.__name__ = f"PCCoT{lm_class.__name__}"
    return PCCoTLM


PCCOT_CLASSES = {"gpt2": _with_projection_head(GPT2LMHeadModel), "llama": _with_projection_head(LlamaForCausalLM)}


def pccot_tokenizer(base_dir: str | Path) -> PreTrainedTokenizerBase:
    """The base tokenizer with PCCoT's tokens added as ``run_ccot.py`` adds them, then ``[PAD]``."""
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    for token in PCCOT_ADDED:
        # transformers 5 names upstream's ``additional_special_tokens`` / ``replace_additional_special_tokens``
        # ``extra_special_tokens`` / ``replace_extra_special_tokens``
        tokenizer.add_special_tokens({"extra_special_tokens": (token,)}, replace_extra_special_tokens=False)
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def save_base_weights(base_dir: Path, *, seed: int, init_std: float = 0.05) -> None:
    """Random base weights saved into ``base_dir`` with ``save_pretrained`` (a pretrained base's directory)."""
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)), attn_implementation="eager")
    randomise(lm, init_std)
    lm.save_pretrained(str(base_dir))


def build_pccot_module(base_dir: str | Path, tokenizer: PreTrainedTokenizerBase, *, use_projection: bool) -> nn.Module:
    """The base LM loaded from ``base_dir`` into upstream's class, its vocabulary grown to the tokenizer's length
    (fresh rows random, as ``resize_token_embeddings`` leaves them), with ``prj`` (random) when
    ``use_projection``, in float32 (a bfloat16 base is cast on load, rotary buffers computed in float32); not yet
    wrapped by peft."""
    config = AutoConfig.from_pretrained(str(base_dir))
    config.use_projection = use_projection
    family = "gpt2" if config.model_type == "gpt2" else "llama"
    torch.manual_seed(0)
    lm = PCCOT_CLASSES[family].from_pretrained(
        str(base_dir), config=config, attn_implementation="eager", dtype=torch.float32
    )
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return lm.eval()


def trainable_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The rows ``run_ccot.py`` makes trainable: BOT, EOT, latent, pad and EOS."""
    bot, eot, latent = tokenizer.convert_tokens_to_ids(list(PCCOT_ADDED))
    return [bot, eot, latent, tokenizer.pad_token_id, tokenizer.eos_token_id]


def wrap_with_peft(
    module: nn.Module, tokenizer: PreTrainedTokenizerBase, family: Family, *, seed: int, lora_r: int = 8
):
    """``get_peft_model`` as ``run_ccot.py`` calls it, with every trained value drawn at random (LoRA B non-zero,
    the trainable rows and the head)."""
    gpt2 = family == "gpt2"
    config = LoraConfig(
        r=lora_r,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=GPT2_TARGETS if gpt2 else LLAMA_TARGETS,
        trainable_token_indices={"wte" if gpt2 else "embed_tokens": trainable_ids(tokenizer)},
        modules_to_save=["prj"] if hasattr(module, "prj") else None,
        fan_in_fan_out=gpt2,
    )
    model = get_peft_model(module, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape) * 0.05)
    return model.eval()


def make_tiny_pccot(
    root: str | Path,
    family: Family,
    *,
    use_projection: bool = True,
    n_latents: int = 4,
    n_sweeps: int = 3,
    seed: int = 0,
) -> tuple[Path, Path]:
    """A tiny base directory (config, tokenizer, weights) and a PCCoT checkpoint directory beside it, saved
    as upstream saves one; returns ``(checkpoint_dir, base_dir)``."""
    root = Path(root)
    base_dir = make_base_dir(root / "base", family)
    save_base_weights(base_dir, seed=seed)
    checkpoint = save_pccot_checkpoint(
        root / "checkpoint",
        base_dir,
        family,
        use_projection=use_projection,
        n_latents=n_latents,
        n_sweeps=n_sweeps,
        seed=seed,
    )
    return checkpoint, base_dir


def save_pccot_checkpoint(
    checkpoint: Path,
    base_dir: Path,
    family: Family,
    *,
    use_projection: bool,
    n_latents: int,
    n_sweeps: int,
    seed: int,
    lora_r: int = 8,
) -> Path:
    """A PCCoT checkpoint directory for the base in ``base_dir`` (which holds its weights), as ``run_ccot.py``
    saves one, every trained value random."""
    tokenizer = pccot_tokenizer(base_dir)
    module = build_pccot_module(base_dir, tokenizer, use_projection=use_projection)
    model = wrap_with_peft(module, tokenizer, family, seed=seed, lora_r=lora_r)
    model.save_pretrained(str(checkpoint))
    config = model.base_model.model.config.to_dict()
    config.update(
        model_type=f"pccot-{family}",
        use_projection=use_projection,
        num_iterations=n_sweeps,
        loss_alpha=1.0,
        loss_beta=1.0,
        loss_gamma=1.0,
        use_layerwise_std=True,
    )
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(checkpoint))
    bot, eot, latent = tokenizer.convert_tokens_to_ids(list(PCCOT_ADDED))
    args = {
        "bot_token_id": bot,
        "eot_token_id": eot,
        "latent_token_id": latent,
        "label_pad_token_id": -100,
        "answer_prompt": ANSWER_PROMPT,
        "num_latent_tokens": n_latents,
        "use_peft": True,
        "lora_r": lora_r,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": "-".join(GPT2_TARGETS if family == "gpt2" else LLAMA_TARGETS),
        "lora_modules_to_save": "prj" if use_projection else "",
    }
    (checkpoint / "pccot_args.json").write_text(json.dumps(args, indent=4))
    return checkpoint
