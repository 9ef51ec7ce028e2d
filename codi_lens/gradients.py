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

from codi_lens.branching import QUESTION, grow_trunk, run_loop_from
from codi_lens.hooks import CODIPositions, position_axis
from codi_lens.model import CODIModel

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

    acts: dict[str, Tensor]
    grads: dict[str, Tensor]
    thought_inputs: Tensor
    thought_grads: Tensor
    metric: Tensor
    positions: CODIPositions


def loop_gradients(
    model: CODIModel,
    questions: Sequence[str],
    answers: Sequence[Sequence[int]],
    answer_index: Sequence[int],
    metric: Metric,
    hook_names: Sequence[str],
    *,
    n_latents: int = 6,
    hold: Mapping[str, Sequence[str]] | None = None,
    start: int = QUESTION,
) -> LoopGradients:
    """Run the loop teacher-forced on ``answers`` with autograd, and differentiate
    ``metric(logits at answer_index).sum()`` (each example's metric depends on its own row only, so the
    sum's gradient is every example's own) with respect to ``hook_names`` and the fed thoughts.

    Gradients are total derivatives: the one at thought 2 includes what thought 2 does through
    thoughts 3..n, also through the same hook there. ``hold`` (hook name -> named positions) makes
    them partial at those positions instead: each is a leaf of its own, so paths from one held
    position through another are cut. That is the linear estimate of *replacing* the activation at
    all of them at once (a later replaced value no longer depends on an earlier one).

    ``start`` (a step, as in :mod:`codi_lens.branching`): the steps before it run without autograd
    (their keys and values are constants) and their positions hold NaN in ``acts`` and ``grads``:
    when no position before ``start`` is asked about, this saves most of the backward pass (the
    question is most of the sequence)."""
    for name in hook_names:
        if position_axis(name) != 1:
            raise ValueError(f"{name}: gradients are recorded for activations with positions on axis 1")
    tokens, mask = model._prepare(list(questions), n_latents)
    answer_tokens, answer_mask = model.tokenize_answers(list(answers))
    layout = model._layout(mask, n_latents, answer_mask.sum(1).tolist())
    fed, fed_mask = model._teacher_forced_input(answer_tokens, answer_mask)
    trunk = None if start == QUESTION else grow_trunk(model, questions, n_latents=n_latents, through=max(start - 1, 0))
    recorder = _Recorder(model, hook_names, layout, hold)
    with torch.enable_grad(), model._hooks_for_run(recorder.hooks(), layout):
        if trunk is None:
            state, z = model._run_prompt(tokens, mask, layout, keep_logits=False)
            model._run_thoughts(state, z, keep_logits=False)
        else:
            state = run_loop_from(model, trunk, start, 1, layout)
        index = torch.tensor(list(answer_index))
        _, logits = model.forward_embeds(
            model.token_embeds(fed), fed_mask, state.kv_cache, layout=layout, logits_at=index
        )
        values = metric(logits[:, 0].float())
        acts, grads, thought_grads = recorder.differentiate(values.sum(), state.thought_embeds)
    skipped = 0 if start == QUESTION else layout.bot + start  # positions computed without autograd
    missing = n_latents - len(state.thought_embeds)  # thoughts fed before start
    thought_inputs = [t.detach() for t in state.thought_embeds]
    return LoopGradients(
        acts={name: _pad_front(t, skipped) for name, t in acts.items()},
        grads={name: _pad_front(t, skipped) for name, t in grads.items()},
        thought_inputs=_pad_front(_stack(thought_inputs, logits, len(questions), model.cfg.d_model), missing),
        thought_grads=_pad_front(_stack(thought_grads, logits, len(questions), model.cfg.d_model), missing),
        metric=values.detach(),
        positions=layout,
    )


class _Recorder:
    """Records each chunk's activation at the hooks (with autograd), optionally holding positions as leaves."""

    def __init__(self, model: CODIModel, hook_names: Sequence[str], layout: CODIPositions, hold) -> None:
        self.model, self.hook_names, self.n_latents = model, list(hook_names), layout.n_latents
        self.held_at = {name: layout.resolve(list(names)) for name, names in (hold or {}).items()}
        self.chunks: dict[str, list[Tensor]] = {name: [] for name in hook_names}
        self.leaves: dict[str, list[Tensor | None]] = {name: [] for name in hook_names}

    def hooks(self) -> list[tuple]:
        thoughts = [(f"thought.{k}.hook_input", _track) for k in range(1, self.n_latents + 1)]
        return [("hook_embed", _track), *thoughts, *[(name, self._record) for name in self.hook_names]]

    def _record(self, acts: Tensor, hook) -> Tensor:
        self.chunks[hook.name].append(acts)
        leaf = None
        if hook.name in self.held_at:
            chunk = self.model.chunk_context.positions.to(acts.device)
            wanted = self.held_at[hook.name].to(acts.device)
            held = (chunk[None, :, None] == wanted[:, None, :]).any(-1)  # [batch, pos]
            if bool(held.any()):
                leaf = acts.detach().requires_grad_(True)
                acts = torch.where(held.reshape(*held.shape, *([1] * (acts.dim() - 2))), leaf, acts)
        self.leaves[hook.name].append(leaf)
        return acts

    def differentiate(
        self, total: Tensor, thoughts: list[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Tensor]]:
        """Whole-sequence activations and gradients per hook, and the gradients at the fed thoughts."""
        recorded = [t for name in self.hook_names for t in self.chunks[name]]
        held = [leaf for name in self.hook_names for leaf in self.leaves[name] if leaf is not None]
        inputs = recorded + thoughts + held
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
        chunk_grads, thought_grads, leaf_grads = (
            grads[: len(recorded)],
            grads[len(recorded) : len(recorded) + len(thoughts)],
            iter(grads[len(recorded) + len(thoughts) :]),
        )
        acts, whole, at = {}, {}, 0
        for name in self.hook_names:
            parts = chunk_grads[at : at + len(self.chunks[name])]
            # a held position's gradient is its leaf's (the chunk's own is 0 there)
            parts = [g if leaf is None else g + next(leaf_grads) for g, leaf in zip(parts, self.leaves[name])]
            acts[name] = torch.cat([t.detach() for t in self.chunks[name]], dim=1)
            whole[name] = torch.cat(parts, dim=1)
            at += len(self.chunks[name])
        return acts, whole, thought_grads


def _track(acts: Tensor, hook) -> Tensor:
    """Start the graph at token embeddings (and at a fed thought taken from a run without autograd);
    fed thoughts computed in the graph are already in it."""
    return acts if acts.requires_grad else acts.detach().requires_grad_(True)


def _stack(steps: list[Tensor], like: Tensor, batch: int, d_model: int) -> Tensor:
    return torch.stack(steps, dim=1) if steps else like.new_zeros((batch, 0, d_model))


def _pad_front(tensor: Tensor, n: int) -> Tensor:
    """``n`` positions of NaN before ``tensor``'s positions (axis 1): steps computed without autograd."""
    if n == 0:
        return tensor
    pad = tensor.new_full((tensor.shape[0], n, *tensor.shape[2:]), float("nan"))
    return torch.cat([pad, tensor], dim=1)
