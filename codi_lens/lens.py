"""Logit lens on continuous thoughts: which tokens each latent state decodes to.

``h_k`` (``CODIResult.latent_states``) is already the post-final-norm hidden state, so its logits are
``h_k @ W_U + b_U``, exactly what the model would predict at that position.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.model import CODIModel


def top_tokens(
    model: CODIModel, latent_states: Float[Tensor, "batch steps d_model"], k: int = 5
) -> Int[Tensor, "batch steps k"]:
    """Top-k token ids of the logit lens at every latent step (index 0 = BOT, k = thought k)."""
    with torch.no_grad():
        logits = model.unembed(latent_states.to(model.cfg.dtype))
    return logits.topk(k, dim=-1).indices


def number_token(model: CODIModel, value: float) -> int | None:
    """The single token id that spells ``value`` (integers as ``"12"``), or None if it takes several."""
    text = str(int(value)) if float(value).is_integer() else str(value)
    for candidate in (text, " " + text):
        ids = model.tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return None


def intermediate_readout(
    model: CODIModel,
    latent_states: Float[Tensor, "batch steps d_model"],
    intermediates: Sequence[Sequence[float]],
    k: int = 5,
) -> pd.DataFrame:
    """Where each intermediate value shows up in the logit lens of the thoughts.

    One row per (example, intermediate value): its position in the chain (``step``, 1-based), its
    token, and ``top1_at`` / ``topk_at``: the latent steps (0 = BOT, k = thought k) where the value's
    token is the top-1 / in the top-k. Values that are not a single token get ``token = None``.
    """
    top = top_tokens(model, latent_states, k).cpu()
    rows = []
    for example, values in enumerate(intermediates):
        for step, value in enumerate(values, start=1):
            token = number_token(model, value)
            hits_top1 = [] if token is None else [s for s in range(top.shape[1]) if top[example, s, 0] == token]
            hits_topk = [] if token is None else [s for s in range(top.shape[1]) if token in top[example, s]]
            rows.append(
                {
                    "example": example,
                    "step": step,
                    "n_steps": len(values),
                    "value": value,
                    "token": token,
                    "top1_at": hits_top1,
                    "topk_at": hits_topk,
                    "top1_any": bool(hits_top1),
                    "topk_any": bool(hits_topk),
                }
            )
    return pd.DataFrame(rows)
