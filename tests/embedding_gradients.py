"""The gradient the attention and block path tests compare: of the last position's logits (their logsumexp,
summed over the batch) with respect to the questions' token embeddings, under given hooks."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor


def embedding_gradient(model, questions: Sequence[str], hooks: list) -> Float[Tensor, "batch pos d_model"]:
    """``d logsumexp(logits at the last position).sum() / d embeds`` for ``questions``, with ``hooks`` in place
    (float32 logits; left padding included)."""
    tokens, mask = model.tokenize_questions(list(questions))
    embeds = model.token_embeds(tokens).detach().requires_grad_(True)
    with model.hooks(fwd_hooks=hooks):
        _, logits = model.forward_embeds(embeds, mask, positions=None, logits_at="last")
    logits.float().logsumexp(-1).sum().backward()
    return embeds.grad
