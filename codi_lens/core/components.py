"""The modules CODI adds to a base transformer: the projection head and one set of hook points per thought
step, and the token ids it adds to the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class ProjectionHead(nn.Module):
    """CODI's ``prj``: ``Linear(d, prj_dim) -> GELU (exact) -> Linear(prj_dim, d) [-> LayerNorm(d)]``.

    Upstream's leading ``Dropout`` is the identity at inference and is omitted. Hook points:
    ``hook_in`` (h), ``hook_mid`` (after GELU, ``[..., prj_dim]``) and ``hook_out`` (the latent).
    """

    def __init__(self, d_model: int, prj_dim: int, *, layernorm: bool, eps: float = 1e-5):
        super().__init__()
        self.hook_in = HookPoint()
        self.fc_in = nn.Linear(d_model, prj_dim)
        self.hook_mid = HookPoint()
        self.fc_out = nn.Linear(prj_dim, d_model)
        self.ln = nn.LayerNorm(d_model, eps=eps) if layernorm else None
        self.hook_out = HookPoint()

    def forward(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_model"]:
        x = self.hook_mid(F.gelu(self.fc_in(self.hook_in(h))))
        x = self.fc_out(x)
        if self.ln is not None:
            x = self.ln(x)
        return self.hook_out(x)


class StepHooks(nn.Module):
    """The hook points of one computation of a thought: its input, ``h`` and the projection of ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_input = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_projection = HookPoint()


class ThoughtStep(StepHooks):
    """Hook points of one latent step (index 0 is BOT) and, for a Jacobi loop, of each of its sweeps
    (``sweep[s]``); see :mod:`codi_lens.core.names`."""

    def __init__(self) -> None:
        super().__init__()
        self.sweep = nn.ModuleList()


@dataclass(frozen=True)
class CODITokens:
    """Token ids a latent method adds to a base vocabulary of size V, plus the stop token; ``latent`` is the
    placeholder token a Jacobi loop feeds at every thought of its first sweep (PCCoT's ``<pcot.latent>``)."""

    pad: int
    bot: int
    eot: int
    eos: int
    latent: int | None = None
