"""Small CODI checkpoints in the exact upstream on-disk layout, built with real transformers + peft.

Upstream's checkpoint is ``CODI.state_dict()``: ``codi`` is the HF causal LM with its vocabulary grown
by 3 and (optionally) wrapped by ``peft.get_peft_model``; ``prj`` is ``Sequential(Dropout, Linear,
GELU, Linear)`` plus ``add_module("ln", LayerNorm)``. We build that very module structure so the keys
are genuinely upstream's rather than typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from codi_lens.data import shipped_dataset_text

Family = Literal["llama", "gpt2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def save_tiny_tokenizer(path: str | Path, family: Family, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on GSM8K questions and answers, saved with ``save_pretrained``.

    "llama" prepends ``<s>`` (like LLaMA's BOS) and stops at ``</s>``; "gpt2" adds nothing and stops at
    ``<|endoftext|>``. Neither holds ``[PAD]`` (upstream adds it later as id V).
    """
    lines = [json.loads(line) for line in shipped_dataset_text("gsm8k:train").splitlines()[:400]]
    corpus = [r["question"] for r in lines] + [r["answer"] for r in lines] + ["The answer is: 0123456789"] * 20
    specials = ["<s>", "</s>"] if family == "llama" else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.padding_side = "left"
    fast.save_pretrained(str(path))
    return fast


def llama_1b_config(**overrides) -> LlamaConfig:
    """LLaMA-3.2-1B's config (vocabulary 128256, 16 layers, GQA 32/8, llama3 RoPE), with ``overrides``."""
    values = dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_parameters=dict(LLAMA3_ROPE),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128009,
    )
    return LlamaConfig(**{**values, **overrides})


def make_base_dir(path: str | Path, family: Family, *, size: str = "tiny") -> Path:
    """An HF base-model directory: ``config.json`` and a tokenizer (no weights needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = save_tiny_tokenizer(path, family)
    if family == "gpt2" and size == "gpt2":
        config = GPT2Config()  # the released GPT-2 small: vocab 50257, 12 layers, d_model 768
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    elif size == "llama-1b-layout-512":  # the benchmarks' model: 1B's layers, heads and vocabulary, d_model 512
        config = llama_1b_config(
            hidden_size=512,
            intermediate_size=2048,
            head_dim=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    elif size == "llama-3.2-1b":
        config = llama_1b_config()
    else:
        config = llama_1b_config(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    config.save_pretrained(str(path))
    return path


class UpstreamCODI(nn.Module):
    """The module whose ``state_dict()`` upstream saves: ``codi`` (LM, maybe LoRA-wrapped) and ``prj``."""

    def __init__(self, codi: nn.Module, d_model: int, prj_dim: int, prj_ln: bool):
        super().__init__()
        self.codi = codi
        self.prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d_model, prj_dim), nn.GELU(), nn.Linear(prj_dim, d_model))
        if prj_ln:
            self.prj.add_module("ln", nn.LayerNorm(d_model))


@torch.no_grad()
def randomise(lm: nn.Module, init_std: float) -> None:
    """Every weight of ``lm`` drawn afresh (matrices N(0, init_std), norm gains U(0.8, 1.2), biases N(0, 0.02)),
    so that no row, BOT/EOT or Coconut's tokens included, equals another."""
    for name, p in lm.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, init_std)
        elif "norm" in name or "ln_" in name:
            p.uniform_(0.8, 1.2)
        else:
            p.normal_(0.0, 0.02)


def build_codi_module(
    base_dir: str | Path,
    *,
    lora_r: int = 8,
    lora_alpha: float = 32,
    use_lora: bool = True,
    prj_dim: int = 96,
    prj_ln: bool = True,
    seed: int = 0,
    device: str = "cpu",
    init_std: float = 0.05,
    attn_implementation: str = "eager",
    base_dtype: torch.dtype = torch.bfloat16,
) -> UpstreamCODI:
    """Random CODI module: bf16 base (vocab V + 3, distinct BOT/EOT rows; ``base_dtype`` for a checkpoint
    saved otherwise, as the shipped toy models are, in float32), fp32 non-zero LoRA and prj."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        lm.resize_token_embeddings(config.vocab_size + 3, mean_resizing=False)
        if device != "meta":
            randomise(lm, init_std)
        for p in lm.parameters():  # bf16 weights as released; buffers (rotary inv_freq) stay fp32
            p.data = p.data.to(base_dtype)
        if use_lora:
            gpt2 = config.model_type == "gpt2"
            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=lora_r,
                    lora_alpha=lora_alpha,
                    lora_dropout=0.0,
                    target_modules=GPT2_TARGETS if gpt2 else LLAMA_TARGETS,
                    fan_in_fan_out=gpt2,
                ),
            )
            if device != "meta":
                with torch.no_grad():
                    for name, p in lm.named_parameters():
                        if "lora_" in name:
                            p.copy_(torch.randn(p.shape) * 0.05)
        module = UpstreamCODI(
            lm, config.hidden_size if hasattr(config, "hidden_size") else config.n_embd, prj_dim, prj_ln
        )
    return module.eval()


def save_codi_checkpoint(module: nn.Module, path: str | Path, fmt: Literal["bin", "safetensors"]) -> Path:
    """Write ``module.state_dict()`` as upstream does (both tied keys kept), into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    if fmt == "safetensors":
        file = path / "model.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(file))
    else:
        file = path / "pytorch_model.bin"
        torch.save(state, file)
    return file


def make_tiny_codi(
    root: str | Path,
    family: Family,
    *,
    fmt: str = "safetensors",
    use_lora: bool = True,
    prj_ln: bool = True,
    seed: int = 0,
    lora_r: int = 8,
    prj_dim: int = 96,
) -> tuple[Path, Path]:
    """Build a tiny base dir and a CODI checkpoint beside it; returns ``(checkpoint_dir, base_dir)``."""
    root = Path(root)
    base_dir = make_base_dir(root / "base", family)
    module = build_codi_module(base_dir, lora_r=lora_r, use_lora=use_lora, prj_dim=prj_dim, prj_ln=prj_ln, seed=seed)
    save_codi_checkpoint(module, root / "checkpoint", fmt)
    return root / "checkpoint", base_dir


#: The tokens upstream Coconut's ``run.py`` adds to the base tokenizer, in its order.
COCONUT_ADDED = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


class UpstreamCoconut(nn.Module):
    """The module whose ``state_dict()`` upstream Coconut saves: ``base_causallm`` (the whole HF LM) and
    ``embedding``, the LM's own input-embedding module registered a second time (as ``coconut.py`` does)."""

    def __init__(self, base_causallm: nn.Module):
        super().__init__()
        self.base_causallm = base_causallm
        gpt2 = base_causallm.config.model_type == "gpt2"
        self.embedding = (base_causallm.transformer if gpt2 else base_causallm).get_input_embeddings()


def build_coconut_module(base_dir: str | Path, *, seed: int = 0, init_std: float = 0.05) -> UpstreamCoconut:
    """A random Coconut module in float32 (fully fine-tuned upstream: no LoRA, no projection head), its
    vocabulary grown by Coconut's three tokens; every row distinct."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(base_dir))
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    lm.resize_token_embeddings(config.vocab_size + len(COCONUT_ADDED), mean_resizing=False)
    randomise(lm, init_std)
    return UpstreamCoconut(lm).eval()


def make_tiny_coconut(root: str | Path, family: Family, *, seed: int = 0) -> tuple[Path, Path]:
    """A tiny base dir and a Coconut checkpoint beside it, saved as upstream saves one (``torch.save`` of the
    state dict to ``checkpoint_<epoch>``, a file without extension); returns ``(checkpoint_file, base_dir)``."""
    root = Path(root)
    base_dir = make_base_dir(root / "base", family)
    module = build_coconut_module(base_dir, seed=seed)
    file = root / "checkpoint_15"
    torch.save(module.state_dict(), file)
    return file, base_dir


def with_sim_cot_decoder(module: nn.Module, base_dir: str | Path, *, seed: int = 1) -> nn.Module:
    """``module`` (an upstream CODI or Coconut module) with SIM-CoT's auxiliary decoder registered as SIM-CoT
    registers it: a whole HF causal LM of the base's config, under ``decoder`` (CODI) or ``expainable_llm``
    (Coconut, upstream's spelling). Same widths, so CODI's ``pj_in`` / ``pj_out`` are identities without keys."""
    torch.manual_seed(seed)
    decoder = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)), attn_implementation="eager")
    module.add_module("expainable_llm" if isinstance(module, UpstreamCoconut) else "decoder", decoder.eval())
    return module
