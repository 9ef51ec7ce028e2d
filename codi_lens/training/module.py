"""The model being trained, in upstream's module layout: the LM (vocabulary grown by pad/BOT/EOT) and the
projection head, built from scratch for the shipped toy models (:func:`build_llama_lm`), with the optional
Fourier start of the number tokens' embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from codi_lens.loading.architectures import N_CODI_TOKENS


class CODIModule(nn.Module):
    """Upstream's training module: ``codi`` (the LM, vocab V + 3) and ``prj`` (projection head).

    Its ``state_dict()`` is exactly upstream's checkpoint layout.
    """

    def __init__(self, lm: nn.Module, prj_dim: int, prj_layernorm: bool = True, gain_matches_embeddings: bool = False):
        super().__init__()
        d = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.codi = lm
        self.prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d, prj_dim), nn.GELU(), nn.Linear(prj_dim, d))
        if prj_layernorm:
            self.prj.add_module("ln", nn.LayerNorm(d))
            if gain_matches_embeddings:
                with torch.no_grad():
                    self.prj.ln.weight.fill_(lm.get_input_embeddings().weight.std().item())

    @property
    def base_lm(self) -> nn.Module:
        return self.codi.get_base_model() if hasattr(self.codi, "get_base_model") else self.codi


#: Periods (in units of the number) of the Fourier code of ``fourier_number_embeddings``: parity, the
#: decimal digits' periods and slower ones that tell every value 0..63 apart.
NUMBER_PERIODS = (2.0, 5.0, 10.0, 16.0, 32.0, 64.0)


def fourier_number_embeddings(
    lm: nn.Module, token_ids: list[int], values: list[int], scale: float, periods: tuple[float, ...] = NUMBER_PERIODS
) -> None:
    """Add a Fourier code of each number's value to its token embedding, in place.

    Token ``token_ids[i]`` (the number ``values[i]``) gets ``scale * [cos(2 pi v / T), sin(2 pi v / T)]``
    for every period ``T`` in ``periods``, on the first ``2 * len(periods)`` embedding dimensions,
    on top of its random initialisation. With tied embeddings the unembedding gets the same code, so
    ``v + x`` is a rotation of the code of ``v`` (which a gated MLP can compute) and the logit of the
    result peaks where every period agrees. Pretrained LLMs read numbers this way; here it is only a
    starting point and trains freely.
    """
    weight = lm.get_input_embeddings().weight
    if 2 * len(periods) > weight.shape[1]:
        raise ValueError(f"{len(periods)} periods need {2 * len(periods)} dimensions; d_model is {weight.shape[1]}")
    angles = 2 * math.pi * torch.tensor(values, dtype=torch.float64)[:, None] / torch.tensor(periods)[None, :]
    code = torch.cat([angles.cos(), angles.sin()], dim=1).to(weight.dtype)
    with torch.no_grad():
        weight[torch.tensor(token_ids), : code.shape[1]] += scale * code


def add_codi_tokens(lm: nn.Module) -> int:
    """Grow the vocabulary by pad/bot/eot (rows V, V+1, V+2); returns the base vocabulary size V."""
    base_vocab = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(base_vocab + N_CODI_TOKENS, mean_resizing=False)
    return base_vocab


def build_llama_lm(
    vocab_size: int,
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 512,
    max_positions: int = 512,
    seed: int = 0,
) -> nn.Module:
    """A small LLaMA-architecture causal LM (RMSNorm, rope, GQA, tied embeddings) from scratch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)
