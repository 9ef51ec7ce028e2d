"""The CODI latent loop, step by step: the public steps every run is made of.

A run is a chain of chunks under one TransformerLens KV cache, each computed by the model's
``forward_embeds`` with its positions published to hooks (:mod:`codi_lens.core.positions`):

1. :func:`prepare` tokenizes and left-pads the questions; :func:`run_positions` lays out the run's
   positions (question, BOT, thoughts 1..n, EOT, answer).
2. :func:`run_prompt` feeds question + BOT in one chunk and returns ``z_1 = prj(h_0)``.
3. :func:`run_thoughts` feeds thoughts ``first..last`` one chunk each (``z_{k+1} = prj(h_k)``, through the
   thought hooks).
4. The answer: :func:`greedy_decode` feeds EOT (and the method's answer prompt, :func:`answer_opening`), then
   each chosen token, until EOS or the budget; or teacher forcing feeds :func:`teacher_forced_input`
   (``[EOT] + prompt + answer[:-1]``) in one chunk.

A loop with the Jacobi schedule (PCCoT) replaces step 3 by :func:`run_sweeps`: every thought at once,
sweep after sweep, over the question's keys and values.

:func:`run_latents` is steps 1-3 alone. :class:`LoopState` carries what a run accumulates (the KV cache,
``h_k``, the fed thoughts, kept logits); :func:`hooks_for_run` checks hooks against the run and attaches
them for its duration. :mod:`codi_lens.core.model` composes :meth:`~CODIModel.run_codi` and its siblings
from these steps; :mod:`codi_lens.core.branching` and :mod:`codi_lens.core.gradients` start them from other
points.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from codi_lens.core.components import CODITokens, ProjectionHead
from codi_lens.core.errors import HookNameError, LoopScheduleError, PositionError
from codi_lens.core.hooks import HookFn, PositionalHook
from codi_lens.core.latent_loop import LatentLoop
from codi_lens.core.names import parse_sweep_hook, parse_thought_hook
from codi_lens.core.positions import ChunkScope, CODIPositions

#: What a chunk computes at the unembedding: the last position's logits, every position's, none, or (a
#: ``[batch]`` / ``[batch, k]`` tensor of indices into the chunk) each row's own.
LogitsAt = Literal["last", "all", "none"] | Int[Tensor, "batch *k"]


class LoopModel(Protocol):
    """What the loop needs of a model (:class:`~codi_lens.core.model.CODIModel` is one)."""

    cfg: HookedTransformerConfig
    tokenizer: object
    codi_tokens: CODITokens
    latent_loop: LatentLoop
    prj: ProjectionHead | None
    thought: nn.ModuleList
    hook_dict: dict
    chunk_scope: ChunkScope

    def forward_embeds(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        kv_cache: TransformerLensKeyValueCache | None = None,
        *,
        positions: CODIPositions,
        logits_at: LogitsAt = "last",
        sweep: int | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch n d_vocab"] | None]: ...

    def token_embeds(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]: ...

    def tokenize_questions(
        self, questions: Sequence[str]
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]: ...

    def ensure_thought_hooks(self, n_latents: int) -> None: ...

    def logits_hooked(self) -> bool: ...

    def hooks(self, fwd_hooks: list, reset_hooks_end: bool = True): ...


@dataclass
class LoopState:
    """What a run accumulates as its chunks are computed.

    Attributes:
        kv_cache: keys and values of every position fed so far.
        positions: the run's position map.
        latent_states: ``h_0, h_1, ...`` as computed, each ``[batch, d_model]``.
        thought_embeds: the embeddings fed at thoughts 1, 2, ..., each ``[batch, d_model]``.
        step_logits: the logits kept at each step (``keep_logits``), each ``[batch, d_vocab]``.
    """

    kv_cache: TransformerLensKeyValueCache
    positions: CODIPositions
    latent_states: list[Float[Tensor, "batch d_model"]] = field(default_factory=list)
    thought_embeds: list[Float[Tensor, "batch d_model"]] = field(default_factory=list)
    step_logits: list[Float[Tensor, "batch d_vocab"]] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return len(self.positions.n_pad)


def stack_steps(
    steps: list[Float[Tensor, "batch d_model"]], batch: int, d_model: int, like: Float[Tensor, "*shape"]
) -> Float[Tensor, "batch n_steps d_model"]:
    """``[batch, n_steps, d_model]`` from per-step tensors (an empty ``[batch, 0, d_model]`` for none)."""
    if not steps:
        return like.new_zeros((batch, 0, d_model))
    return torch.stack(steps, dim=1)


def prepare(
    model: LoopModel, questions: Sequence[str], n_latents: int
) -> tuple[Int[Tensor, "batch width"], Int[Tensor, "batch width"]]:
    """The questions tokenized and left-padded (``[batch, width]`` tokens and mask), with hook points for
    ``n_latents`` thoughts in place."""
    if n_latents < 0:
        raise ValueError(f"n_latents must be >= 0, got {n_latents}")
    model.ensure_thought_hooks(n_latents)
    return model.tokenize_questions(questions)


def answer_opening(model: LoopModel) -> list[int]:
    """What is fed after the thoughts before the answer: EOT, then the loop's answer prompt's tokens (none for
    CODI and Coconut; PCCoT's ``"The answer is:"``)."""
    prompt = model.latent_loop.answer_prompt
    prompt_ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return [model.codi_tokens.eot, *prompt_ids]


def run_positions(
    model: LoopModel, mask: Int[Tensor, "batch width"], n_latents: int, answer_lengths: list[int]
) -> CODIPositions:
    """The position map of a run of ``model``'s loop on questions padded as ``mask`` is, with ``n_latents``
    thoughts and the given answer lengths (the budget, before the answers exist)."""
    width = mask.shape[1]
    eot = width + n_latents + 1
    return CODIPositions(
        n_pad=(width - mask.sum(1)).tolist(),
        bot=width,
        thoughts=[width + k for k in range(1, n_latents + 1)],
        eot=eot,
        answer_start=eot + len(answer_opening(model)),
        answer_lengths=answer_lengths,
        n_sweeps=model.latent_loop.n_sweeps,
    )


def new_state(model: LoopModel, batch: int, positions: CODIPositions) -> LoopState:
    """A run with an empty KV cache."""
    return LoopState(TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch), positions)


def step_logits(model: LoopModel, keep_logits: bool) -> Literal["last", "none"]:
    """What a latent step computes at the unembedding: nothing unless kept or hooked."""
    return "last" if keep_logits or model.logits_hooked() else "none"


def project(
    model: LoopModel, k: int, h: Float[Tensor, "batch d_model"], state: LoopState
) -> Float[Tensor, "batch d_model"]:
    """Record ``h_k`` (through ``thought.k.hook_hidden``) and return the input of thought k + 1: ``prj(h_k)``
    (through ``thought.k.hook_projection``) for a loop with a projection head, ``h_k`` itself for one
    that feeds hidden states back unchanged (Coconut)."""
    h = model.thought[k].hook_hidden(h)
    state.latent_states.append(h)
    if model.prj is None:
        return h
    return model.thought[k].hook_projection(model.prj(h))


def run_prompt(
    model: LoopModel,
    tokens: Int[Tensor, "batch width"],
    mask: Int[Tensor, "batch width"],
    positions: CODIPositions,
    *,
    keep_logits: bool,
    prompt_logits: Literal["last", "all"] = "last",
) -> tuple[LoopState, Float[Tensor, "batch d_model"]]:
    """Question + BOT in one chunk; returns the state and ``prj(h_0)``, the input of thought 1."""
    batch = tokens.shape[0]
    state = new_state(model, batch, positions)
    bot = torch.full((batch, 1), model.codi_tokens.bot, dtype=torch.long, device=tokens.device)
    prompt = torch.cat([tokens, bot], dim=1)
    prompt_mask = torch.cat([mask, torch.ones_like(bot)], dim=1)
    logits_at = step_logits(model, keep_logits) if prompt_logits == "last" else prompt_logits
    final, logits = model.forward_embeds(
        model.token_embeds(prompt), prompt_mask, state.kv_cache, positions=positions, logits_at=logits_at
    )
    if keep_logits:
        state.step_logits.append(logits[:, -1])
    return state, project(model, 0, final[:, -1], state)


def run_thoughts(
    model: LoopModel,
    state: LoopState,
    z: Float[Tensor, "batch d_model"],
    *,
    keep_logits: bool,
    first: int = 1,
    last: int | None = None,
) -> Float[Tensor, "batch d_model"]:
    """Feed thoughts ``first``..``last`` (default: n; ``z`` is the input of thought ``first``) under the
    state's KV cache; returns ``prj(h_last)``, the input of the thought after ``last``."""
    ones = torch.ones((z.shape[0], 1), dtype=torch.long, device=z.device)
    logits_at = step_logits(model, keep_logits)
    last = state.positions.n_latents if last is None else last
    for k in range(first, last + 1):
        fed = model.thought[k].hook_input(z)
        state.thought_embeds.append(fed)
        final, logits = model.forward_embeds(
            fed[:, None], ones, state.kv_cache, positions=state.positions, logits_at=logits_at
        )
        if keep_logits:
            state.step_logits.append(logits[:, -1])
        z = project(model, k, final[:, -1], state)
    return z


@contextmanager
def cache_kept(kv_cache: TransformerLensKeyValueCache, keep: bool = True) -> Iterator[None]:
    """With ``keep``, the chunks computed in the ``with`` block attend to the cache and to themselves but are
    not appended to it (TransformerLens' frozen cache), so it holds what it held before; always unfrozen after."""
    if not keep:
        yield
        return
    kv_cache.freeze()
    try:
        yield
    finally:
        kv_cache.unfreeze()


def run_sweeps(
    model: LoopModel, state: LoopState, z_first: Float[Tensor, "batch d_model"], *, keep_logits: bool
) -> Float[Tensor, "batch d_model"]:
    """The thoughts of a Jacobi loop (PCCoT), after question + BOT: sweeps ``0..S`` each feed all ``n``
    thoughts in one chunk over the question's keys and values (the KV cache is frozen for sweeps before the
    last, so each sees only the question, as upstream's copy of the question's cache does).

    Sweep 0 feeds the latent token's embedding at every thought; sweep ``s + 1`` feeds ``z_first``
    (``prj(h_0)``) at thought 1 and ``prj`` of sweep s's ``h_k`` at thought ``k + 1``. At each sweep the hooks
    ``thought.k.sweep.s.hook_input`` / ``hook_hidden`` / ``hook_projection`` fire for every thought; at the last,
    ``thought.k.hook_*`` fire after them and the state records its inputs and hidden states (its keys and
    values stay in the cache for the answer). Returns the last sweep's projection of ``h_n``."""
    positions, batch = state.positions, z_first.shape[0]
    n, last = positions.n_latents, positions.n_sweeps
    if n == 0:
        return z_first
    latent_id = model.codi_tokens.latent
    if latent_id is None:
        raise ValueError(
            f"a Jacobi loop needs the latent token's id (codi_tokens.latent) for {model.latent_loop.method}"
        )
    inputs = model.token_embeds(torch.full((batch, n), latent_id, dtype=torch.long, device=z_first.device))
    ones = torch.ones((batch, n), dtype=torch.long, device=z_first.device)
    logits_at: LogitsAt = "all" if keep_logits or model.logits_hooked() else "none"
    for sweep in range(last + 1):
        steps = [model.thought[k].sweep[sweep] for k in range(1, n + 1)]
        columns = [step.hook_input(inputs[:, i]) for i, step in enumerate(steps)]
        if sweep == last:  # the tensors recorded are the ones fed, so gradients reach them
            columns = [model.thought[k].hook_input(column) for k, column in enumerate(columns, start=1)]
            state.thought_embeds.extend(columns)
        fed = torch.stack(columns, dim=1)
        with cache_kept(state.kv_cache, sweep < last):
            final, logits = model.forward_embeds(
                fed, ones, state.kv_cache, positions=positions, logits_at=logits_at, sweep=sweep
            )
        hidden = [step.hook_hidden(final[:, i]) for i, step in enumerate(steps)]
        projected = [h if model.prj is None else step.hook_projection(model.prj(h)) for h, step in zip(hidden, steps)]
        inputs = torch.stack([z_first, *projected[:-1]], dim=1)
    if keep_logits:
        state.step_logits.extend(logits.unbind(1))
    for k, h in enumerate(hidden, start=1):
        z = project(model, k, h, state)
    return z


def run_latents(
    model: LoopModel,
    tokens: Int[Tensor, "batch width"],
    mask: Int[Tensor, "batch width"],
    positions: CODIPositions,
    *,
    keep_logits: bool = False,
    prompt_logits: Literal["last", "all"] = "last",
    through: int | None = None,
) -> tuple[LoopState, Float[Tensor, "batch d_model"]]:
    """Question + BOT, then thoughts 1..``through`` (default: every thought), under one KV cache. Returns
    the state and ``prj(h_through)``, the input of the next thought. A Jacobi loop computes every thought
    (:func:`run_sweeps`): it cannot stop before the last."""
    if model.latent_loop.is_jacobi and through is not None and through < positions.n_latents:
        require_sequential(model.latent_loop, f"stopping the loop after thought {through}")
    state, z = run_prompt(model, tokens, mask, positions, keep_logits=keep_logits, prompt_logits=prompt_logits)
    if model.latent_loop.is_jacobi:
        return state, run_sweeps(model, state, z, keep_logits=keep_logits)
    if through is None or through >= 1:
        z = run_thoughts(model, state, z, keep_logits=keep_logits, last=through)
    return state, z


def require_sequential(latent_loop: LatentLoop, what: str) -> None:
    """Refuse, naming the method, what needs thought k + 1 to be computed after thought k (branching at a
    thought, gradients through one step), for a loop that computes its thoughts together in sweeps."""
    if latent_loop.is_jacobi:
        raise LoopScheduleError(
            f"{what} needs a sequential loop, but {latent_loop.method}'s computes all thoughts together in "
            f"{latent_loop.n_sweeps + 1} sweeps; intervene on one sweep with thought.k.sweep.s.hook_* or a "
            "positional hook at 'thought:k@sweep:s' instead"
        )


def keep_rows(kv_cache: TransformerLensKeyValueCache, rows: Int[Tensor, " n_kept"]) -> None:
    """Keep only ``rows`` of a KV cache (keys, values and attention mask), in that order."""
    for entry in kv_cache.entries:
        entry.past_keys = entry.past_keys[rows]
        entry.past_values = entry.past_values[rows]
    kv_cache.previous_attention_mask = kv_cache.previous_attention_mask[
        rows.to(kv_cache.previous_attention_mask.device)
    ]


def greedy_decode(
    model: LoopModel,
    state: LoopState,
    max_new_tokens: int,
    *,
    keep_logits: bool = False,
    first_logits: Float[Tensor, "batch d_vocab"] | None = None,
    compact: bool = False,
) -> list[list[int]]:
    """Feed EOT (and the loop's answer prompt: :func:`answer_opening`), then greedy tokens (argmax over the rows
    the loop allows: CODI's excludes only EOT) until EOS or the budget.

    Rows stop at their own EOS (later tokens are not recorded); the batch stops when all have.
    With ``first_logits`` (``[batch, d_vocab]``), nothing is fed first: the first token is chosen
    from those logits (plain decoding after a prompt). With ``compact=True`` finished rows leave
    the batch (their KV-cache rows are dropped), so later steps compute only the rows still
    writing; use it only when no hook that indexes rows is live during decoding. ``compact``
    does not keep logits.
    """
    if compact and keep_logits:
        raise ValueError("compact decoding does not keep logits")
    device, batch = model.cfg.device, state.batch
    eos, n_allowed = model.codi_tokens.eos, model.latent_loop.argmax_width(model.cfg.d_vocab)
    next_input = torch.tensor([answer_opening(model)], dtype=torch.long, device=device).expand(batch, -1)
    answers: list[list[int]] = [[] for _ in range(batch)]
    active = torch.arange(batch)  # the original row of each row still in the batch
    finished = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        if step == 0 and first_logits is not None:
            logits = first_logits[:, None]
        else:
            ones = torch.ones(next_input.shape, dtype=torch.long, device=device)
            _, logits = model.forward_embeds(
                model.token_embeds(next_input), ones, state.kv_cache, positions=state.positions
            )
        if keep_logits:
            state.step_logits.append(logits[:, -1])
        chosen = logits[:, -1, :n_allowed].argmax(-1).cpu()
        for row, original in enumerate(active.tolist()):
            if not finished[original]:
                answers[original].append(int(chosen[row]))
        finished[active] |= chosen == eos
        if bool(finished.all()):
            break
        still = ~finished[active]
        if compact and not bool(still.all()):
            keep_rows(state.kv_cache, torch.nonzero(still).flatten().to(device))
            active, chosen = active[still], chosen[still]
        next_input = chosen[:, None].to(device)
    return answers


def teacher_forced_input(
    opening: list[int], answer_tokens: Int[Tensor, "batch answer_pos"], answer_mask: Int[Tensor, "batch answer_pos"]
) -> tuple[Int[Tensor, "batch fed_pos"], Int[Tensor, "batch fed_pos"]]:
    """``opening + answer tokens[:-1]`` and its mask: what teacher forcing feeds after the thoughts (``opening``
    is :func:`answer_opening`: ``[EOT]``, then the answer prompt's tokens). The logits at fed position
    ``len(opening) - 1 + j`` predict answer token ``j``."""
    batch = answer_tokens.shape[0]
    columns = torch.tensor([opening], dtype=torch.long, device=answer_tokens.device).expand(batch, -1)
    fed = torch.cat([columns, answer_tokens[:, :-1]], dim=1)
    return fed, torch.cat([torch.ones_like(columns), answer_mask[:, :-1]], dim=1)


def answer_rows(
    opening: list[int], answer_length: int, batch: int, answer_index: Sequence | None = None
) -> Int[Tensor, "batch k"]:
    """Where, in the chunk :func:`teacher_forced_input` feeds, the logits predicting answer tokens are: every
    answer token's (``[batch, answer_length]``), or those at ``answer_index`` (per example, one index or k)."""
    offset = len(opening) - 1
    if answer_index is None:
        return torch.arange(answer_length).expand(batch, -1) + offset
    index = torch.tensor([list(i) if isinstance(i, Sequence) else i for i in answer_index])
    return (index if index.dim() == 2 else index[:, None]) + offset


def check_hooks(model: LoopModel, fwd_hooks: Sequence[tuple[str, HookFn]], positions: CODIPositions) -> None:
    """Refuse, before anything runs, hooks aimed at thoughts, sweeps or positions this run does not reach (the
    rule is :func:`unreached_hook`'s), and hook names the model does not have."""
    for name, fn in fwd_hooks:
        if isinstance(name, str):
            problem = unreached_hook(model.latent_loop, name, positions.n_latents, positions.n_sweeps)
            if problem is not None:
                raise problem
            step_hook = parse_thought_hook(name) is not None or parse_sweep_hook(name) is not None
            if not step_hook and name not in model.hook_dict:
                raise HookNameError(f"no hook point named {name!r} (see model.hook_dict)")
        if isinstance(fn, PositionalHook):
            if fn.scope is not model.chunk_scope:
                raise ValueError(f"the positional hook on {name} was built for another model")
            fn.resolve(positions)


def unreached_hook(
    latent_loop: LatentLoop, name: str, n_latents: int, n_sweeps: int
) -> HookNameError | PositionError | None:
    """Why a hook on ``name`` would not fire in a run of ``latent_loop`` with ``n_latents`` thoughts and sweeps
    ``0..n_sweeps`` (the error to raise), or None when it fires. The one rule for step hooks, used to refuse
    hooks (:func:`check_hooks`) and to list a run's hook points (``CODIModel.hook_names_of_run``):

    - the projection head's hooks (``prj.*``, ``thought.k.hook_projection``, ``thought.k.sweep.s.hook_projection``)
      exist only in a loop with a head;
    - ``thought.k.hook_input`` for k = 1..n, ``thought.k.hook_hidden`` / ``hook_projection`` for k = 0..n;
    - ``thought.k.sweep.s.hook_*`` only in a Jacobi loop, for k = 1..n and s = 0..S.

    Any other name is not a step hook, and fires."""
    thought, sweep = parse_thought_hook(name), parse_sweep_hook(name)
    projection = name.startswith("prj.") or any(
        parsed is not None and parsed[-1] == "projection" for parsed in (thought, sweep)
    )
    if projection and not latent_loop.has_projection:
        return HookNameError(
            f"{name} does not exist for a {latent_loop.method} model: its loop feeds h_k back unchanged, with no "
            "projection head (hook thought.k.hook_hidden or thought.k.hook_input instead)"
        )
    if sweep is not None:
        k, s, _ = sweep
        if not n_sweeps:
            return HookNameError(f"{name} names a sweep, but this run's loop computes its thoughts one after another")
        if not (1 <= k <= n_latents and 0 <= s <= n_sweeps):
            return PositionError(f"{name} is outside this run: it has thoughts 1..{n_latents} and sweeps 0..{n_sweeps}")
    elif thought is not None:
        k, kind = thought
        if not (1 if kind == "input" else 0) <= k <= n_latents:
            return PositionError(
                f"{name} is outside this run: it has {n_latents} thoughts (thought.k.hook_input for k = "
                f"1..{n_latents}, hook_hidden / hook_projection for k = 0..{n_latents})"
            )
    return None


@contextmanager
def hooks_for_run(
    model: LoopModel, fwd_hooks: Sequence[tuple[str, HookFn]], positions: CODIPositions
) -> Iterator[None]:
    """Check ``fwd_hooks`` against the run (:func:`check_hooks`), attach them for the ``with`` block and
    always remove them."""
    check_hooks(model, fwd_hooks, positions)
    with model.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
        yield
