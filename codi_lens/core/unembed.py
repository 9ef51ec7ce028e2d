"""The unembedding as one matrix product on ``W_U`` as stored, without TransformerLens' per-call copy.

TransformerLens computes ``F.linear(x, W_U.T.contiguous(), b_U)``: with ``W_U`` stored ``[d_model, d_vocab]`` that
copies the whole matrix (1 GB at LLaMA-1B's shape in float32) on every call, and with it stored ``[d_vocab,
d_model]`` (the copy then free) the product reads the matrix across its rows, which on a CPU decoding a few rows
at a time ran at about half the speed of reading it along them (29.5 against 16.8 ms per row at the
benchmark shape, ``benchmarks.hooked_loop``). :class:`DirectUnembed` keeps ``W_U`` in its logical order and
multiplies by it directly: the same product, ``hook_in`` and ``hook_out`` where they were, the values equal to
float32 rounding (the summation order differs).
"""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.components import Unembed


class DirectUnembed(Unembed):
    """TransformerLens' ``Unembed`` multiplying by ``W_U`` as stored (see the module docstring)."""

    def forward(self, residual: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab_out"]:
        residual = self.hook_in(residual)
        return self.hook_out(F.linear(residual, self.W_U.t(), self.b_U))


def unembed_directly(unembed: Unembed) -> None:
    """Give a TransformerLens ``Unembed`` the direct ``forward`` (same parameters and hook points)."""
    if type(unembed) is Unembed:
        unembed.__class__ = DirectUnembed
