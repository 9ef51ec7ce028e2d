"""Padding token-id rows into a batch: the one place codi_lens lays out ragged sequences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor


def pad_rows(
    rows: Sequence[Sequence[int]], value: int, *, side: Literal["left", "right"]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack ragged id rows into ``(ids, mask)``, both ``[batch, max_len]``.

    ``side="left"`` right-aligns every row (questions: the last token sits at the same position in
    every row); ``"right"`` left-aligns them (answers, teacher sequences). Padding holds ``value`` and
    mask 0; real tokens have mask 1.
    """
    if len(rows) == 0:
        raise ValueError("cannot pad an empty batch: give at least one row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
