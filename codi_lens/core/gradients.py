"""Gradients of an answer metric with respect to activations anywhere in the unrolled latent loop.

One teacher-forced run of the real loop (question + BOT, thoughts 1..n, then ``[EOT] + answer``) is
recorded with autograd on; a metric of the logits at one answer row per example is differentiated
once, and the gradient reaches every recorded activation through every path the run has: attention
to later positions through the KV cache, and the feedback loop (the last layer's state at thought k
goes through the projection and is fed at thought k + 1), so a gradient at thought k counts what a
change there would do to thoughts k + 1..n. This is what attribution patching needs
(``codi_lens.patching``, ``method="attribution"``).

Only the activations are differentiated (``torch.autograd.grad`` with them as inputs), so no
parameter ``.grad`` is touched. Memory: the run's autograd graph, about one forward's activations
per position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core import loop
from codi_lens.core.branching import QUESTION, Trunk, effective_start, grow_trunk, run_loop_from
from codi_lens.core.loop import stack_steps
from codi_lens.core.model import CODIModel
from codi_lens.core.names import position_axis, thought_hook_name
from codi_lens.core.positions import CODIPositions
from codi_lens.core.recording import ActivationRecorder

Metric = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, " batch"]]


@dataclass
class LoopGradients:
    """Activations and the metric's gradient at them, over the whole sequence.

    Attributes:
        acts, grads: per hook name, ``[batch, pos, ...]`` over question, BOT, thoughts, EOT and the
            fed answer tokens (position axis 1; every hook recorded must have one).
        thought_inputs, thought_grads: the fed thoughts ``[batch, n, d_model]`` and the gradient there.
        metric: the metric per example, ``[batch]`` (detached).
        positions: the run's position map.
    """

    acts: dict[str, Float[Tensor, "batch pos *rest"]]
    grads: dict[str, Float[Tensor, "batch pos *rest"]]
    thought_inputs: Float[Tensor, "batch n_latents d_model"]
    thought_grads: Float[Tensor, "batch n_latents d_model"]
    metric: Float[Tensor, " batch"]
    positions: CODIPositions


def loop_gradients(
    model: CODIModel,
    questions: Sequence[str],
    answers: Sequence[Sequence[int]],
    answer_index: Sequence[int] | Sequence[Sequence[int]],
    metric: Metric,
    hook_names: Sequence[str],
    *,
    n_latents: int = 6,
    hold: Mapping[str, Sequence[str]] | None = None,
    start: int = QUESTION,
    trunk: Trunk | None = None,
) -> LoopGradients:
    """Run the loop teacher-forced on ``answers`` with autograd, and differentiate
    ``metric(logits at answer_index).sum()`` (one row per example: the metric gets ``[batch, d_vocab]``;
    k rows per example: ``[batch, k, d_vocab]``) (each example's metric depends on its own row only, so the
    sum's gradient is every example's own) with respect to ``hook_names`` and the fed thoughts.

    Gradients are total derivatives: the one at thought 2 includes what thought 2 does through
    thoughts 3..n, also through the same hook there. ``hold`` (hook name -> named positions) makes
    them partial at those positions instead: each is a leaf of its own, so paths from one held
    position through another are cut. That is the linear estimate of *replacing* the activation at
    all of them at once (a later replaced value no longer depends on an earlier one).

    ``start`` (a step, as in :mod:`codi_lens.core.branching`): the steps before it run without autograd
    (their keys and values are constants) and their positions hold NaN in ``acts`` and ``grads``:
    when no position before ``start`` is asked about, this saves most of the backward pass (the
    question is most of the sequence). Those steps are taken from ``trunk`` when given (the unpatched run
    of ``questions``, e.g. a patching batch's corrupted run, grown once for many passes), else grown here.

    In a loop with the Jacobi schedule (PCCoT), activations at the thought positions are the last sweep's
    and the gradient there is total through the answer; the fed thoughts are the last sweep's inputs; a
    ``start`` at any thought recomputes every sweep with autograd
    (see :func:`~codi_lens.core.branching.effective_start`)."""
    start = effective_start(model, start, n_latents)
    for name in hook_names:
        if position_axis(name) != 1:
            raise ValueError(f"{name}: gradients are recorded for activations with positions on axis 1")
    if start == QUESTION:
        trunk = None
    elif trunk is None:
        trunk = grow_trunk(model, questions, n_latents=n_latents, through=max(start - 1, 0))
    elif not trunk.serves(questions, n_latents, through=max(start - 1, 0)):
        raise ValueError(
            f"the trunk given is not the run of these {len(questions)} questions with {n_latents} thoughts "
            f"through step {max(start - 1, 0)}"
        )
    tokens, mask = (trunk.tokens, trunk.mask) if trunk is not None else loop.prepare(model, list(questions), n_latents)
    answer_tokens, answer_mask = model.tokenize_answers(list(answers))
    positions = loop.run_positions(model, mask, n_latents, answer_mask.sum(1).tolist())
    opening = loop.answer_opening(model)
    fed, fed_mask = loop.teacher_forced_input(opening, answer_tokens, answer_mask)
    recorder = ActivationRecorder(model.chunk_scope, keep_graph=True)
    held = HeldPositions(model, positions, hold)
    hooks = [
        ("hook_embed", _track),
        *[(thought_hook_name(k, "input"), _track) for k in range(1, n_latents + 1)],
        *[(name, fn) for name in hook_names for fn in (held, recorder)],
    ]
    with torch.enable_grad(), loop.hooks_for_run(model, hooks, positions):
        if trunk is None:
            state, _ = loop.run_latents(model, tokens, mask, positions)
        else:
            state = run_loop_from(model, trunk, start, 1, positions)
        rows_per_example = isinstance(answer_index[0], Sequence)
        index = loop.answer_rows(opening, answer_tokens.shape[1], len(questions), answer_index)
        _, logits = model.forward_embeds(
            model.token_embeds(fed), fed_mask, state.kv_cache, positions=positions, logits_at=index
        )
        values = metric(logits.float() if rows_per_example else logits[:, 0].float())
        chunks = [recorder.chunks(name) for name in hook_names]
        inputs = [t for parts in chunks for t in parts] + state.thought_embeds
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    acts, whole, at = {}, {}, 0
    for name, parts in zip(hook_names, chunks):
        acts[name] = torch.cat([t.detach() for t in parts], dim=1)
        whole[name] = torch.cat(grads[at : at + len(parts)], dim=1)
        at += len(parts)
    thought_grads = grads[at:]
    skipped = 0 if start == QUESTION else positions.bot + start  # positions computed without autograd
    missing = n_latents - len(state.thought_embeds)  # thoughts fed before start
    thought_inputs = [t.detach() for t in state.thought_embeds]
    return LoopGradients(
        acts={name: _pad_front(t, skipped) for name, t in acts.items()},
        grads={name: _pad_front(t, skipped) for name, t in whole.items()},
        thought_inputs=_pad_front(stack_steps(thought_inputs, len(questions), model.cfg.d_model, logits), missing),
        thought_grads=_pad_front(stack_steps(thought_grads, len(questions), model.cfg.d_model, logits), missing),
        metric=values.detach(),
        positions=positions,
    )


class HeldPositions:
    """A hook making the activation at given positions a leaf of its own (``hold``: hook name -> named
    positions), so gradients there are partial: paths from one held position through another are cut."""

    def __init__(self, model: CODIModel, positions: CODIPositions, hold: Mapping[str, Sequence[str]] | None):
        self.scope = model.chunk_scope
        self.held_at = {name: positions.resolve(list(names)) for name, names in (hold or {}).items()}

    def __call__(self, acts: Tensor, hook) -> Tensor:
        if hook.name not in self.held_at or not self.scope.current.is_final:  # a Jacobi loop: the last sweep's
            return acts
        chunk = self.scope.current.span.to(acts.device)
        wanted = self.held_at[hook.name].to(acts.device)
        held = (chunk[None, :, None] == wanted[:, None, :]).any(-1)  # [batch, pos]
        if not bool(held.any()):
            return acts
        leaf = acts.detach().requires_grad_(True)
        return torch.where(held.reshape(*held.shape, *([1] * (acts.dim() - 2))), leaf, acts)


def _track(acts: Tensor, hook) -> Tensor:
    """Start the graph at token embeddings (and at a fed thought taken from a run without autograd);
    fed thoughts computed in the graph are already in it."""
    return acts if acts.requires_grad else acts.detach().requires_grad_(True)


def _pad_front(tensor: Tensor, n: int) -> Tensor:
    """``n`` positions of NaN before ``tensor``'s positions (axis 1): steps computed without autograd."""
    if n == 0:
        return tensor
    pad = tensor.new_full((tensor.shape[0], n, *tensor.shape[2:]), float("nan"))
    return torch.cat([pad, tensor], dim=1)
