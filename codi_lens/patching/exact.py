"""Exact activation patching inside the real latent loop.

The clean run's activation at a site is written into the corrupted run, and the corrupted run's own loop
goes on from there: a patched thought changes what the model computes and feeds back afterwards. Positions
are matched by name (thought k to thought k, EOT to EOT), never by raw index, so clean and corrupted
questions of different lengths patch the same thought. The changed number's own question tokens are
matched by their index in each question.

Speed: the corrupted run is computed once per batch of pairs; every site branches off it at the first step
it changes (a site at thought 4 reuses the corrupted run's KV cache over the question, BOT and thoughts
1..3), sites with the same start run as blocks of one forward, and the unembedding runs only at the answer
row (:mod:`codi_lens.core.branching`). ``python -m benchmarks.patch_sweep`` measures this against one full
run per site.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.branching import QUESTION, Branch, BranchOutput, run_branches
from codi_lens.core.hooks import Hooks, PositionalHook
from codi_lens.core.model import CODIModel
from codi_lens.core.positions import gather_at
from codi_lens.core.sites import Site
from codi_lens.interventions.positions import replace_at
from codi_lens.interventions.thoughts import replace_thoughts
from codi_lens.patching.kinds import CHANGED, SPAN_STARTS, span_positions
from codi_lens.patching.prepare import PairBatch, Reading, batch_readings, metric_value


def replace_question_tokens(
    model: CODIModel,
    hook_name: str,
    token_index: Sequence[Sequence[int]],
    values: Sequence[Float[Tensor, " n *rest"]],
    *,
    head: int | None = None,
) -> Hooks:
    """Write ``values[i]`` (``[n_i, *rest]``) at question tokens ``token_index[i]`` of example i
    (indices counted from each question's first token, as ``question:j``), in the question's chunk;
    with ``head``, only that head's slice of ``[..., head, d_head]`` activations."""

    def hook(acts: Tensor, hook) -> Tensor:
        context = model.chunk_scope.current
        if context.start != 0:  # the question is computed in the first chunk only
            return acts
        out = acts.clone()
        for i, (index, value) in enumerate(zip(token_index, values)):
            if len(index):
                where = torch.tensor(index, device=acts.device) + context.positions.n_pad[i]
                value = value.to(device=acts.device, dtype=acts.dtype)
                if head is None:
                    out[i, where] = value
                else:
                    out[i, where, head] = value[:, head]
        return out

    return [(hook_name, hook)]


def patch_hooks(model: CODIModel, site: Site, batch: PairBatch, rows: Sequence[int] | None = None) -> Hooks:
    """The ``fwd_hooks`` writing the clean activation of ``site`` into the corrupted run (of pairs ``rows``)."""
    rows = list(range(len(batch.clean_numbers))) if rows is None else list(rows)
    if site.kind == "thought_input":
        return replace_thoughts({site.thought: batch.clean_thoughts[rows, site.thought - 1]})
    acts = batch.clean_cache[site.hook][rows]
    if site.position == CHANGED:
        index = [batch.changed_tokens[r] for r in rows]
        clean_index = [x[0] if x else [] for x in index]
        values = [
            acts[i, torch.tensor(ci, dtype=torch.long) + batch.clean_positions.n_pad[r]]
            for i, (ci, r) in enumerate(zip(clean_index, rows))
        ]
        corrupted_index = [x[1] if x else [] for x in index]
        return replace_question_tokens(model, site.hook, corrupted_index, values, head=site.head)
    names = span_positions(site, batch.clean_positions.n_latents)
    values = gather_at(acts, batch.clean_positions.resolve(names)[rows])  # [batch, n, ...] in the clean run
    if site.head is None:
        return replace_at(model, site.hook, names, values)
    head = site.head

    def transform(current: Tensor, hook, which: Tensor) -> Tensor:
        out = current.clone()
        out[:, :, head] = values[:, which.to(values.device), head].to(device=current.device, dtype=current.dtype)
        return out

    return [(site.hook, PositionalHook(model, names, transform))]


def patch_start(site: Site, n_latents: int) -> int:
    """The first step of the run a patch at ``site`` changes (see :mod:`codi_lens.core.branching`): the
    question for question-token sites, 0 for BOT, k for thought k, the first step of a span, n + 1 for EOT."""
    if site.position in SPAN_STARTS:
        return SPAN_STARTS[site.position]
    if site.position == "eot":
        return n_latents + 1
    if site.thought is not None:
        return site.thought
    return QUESTION


def patch_branches(model: CODIModel, batch: PairBatch, sites: Sequence[Site], n_latents: int) -> list[Branch]:
    """One branch of the corrupted run per site."""
    return [Branch(patch_hooks(model, site, batch), patch_start(site, n_latents)) for site in sites]


def run_patches(
    model: CODIModel,
    batch: PairBatch,
    questions: Sequence[str],
    sites: Sequence[Site],
    *,
    n_latents: int = 6,
    max_rows: int = 256,
    max_new_tokens: int = 0,
    reading: Reading | None = None,
) -> list[BranchOutput]:
    """Every site patched into the corrupted run of ``questions``, as branches of it: teacher-forced as
    ``reading`` says (default: the batch metric's first reading, see
    :func:`~codi_lens.patching.prepare.readings`), and generating up to ``max_new_tokens``. The corrupted run
    is computed once; each site branches off it at the first step it changes, sites with the same start
    batched as blocks of one forward (at most ``max_rows`` rows), and the unembedding runs only at the
    rows read (see :mod:`codi_lens.core.branching`)."""
    branches = patch_branches(model, batch, sites, n_latents)
    return run_reading(model, batch, questions, branches, n_latents, max_rows, max_new_tokens, reading)


def run_reading(
    model: CODIModel,
    batch: PairBatch,
    questions: Sequence[str],
    branches: Sequence[Branch],
    n_latents: int,
    max_rows: int,
    max_new_tokens: int,
    reading: Reading | None,
) -> list[BranchOutput]:
    """``branches`` of the corrupted run of ``questions``, teacher-forced as ``reading`` says (default: the
    batch metric's first reading)."""
    reading = batch_readings(batch)[0] if reading is None else reading
    trunk = batch.trunk_of(model, questions, n_latents)
    return run_branches(
        model,
        trunk,
        branches,
        reading.answers,
        answer_index=reading.rows,
        max_new_tokens=max_new_tokens,
        max_rows=max_rows,
    )


def branch_metric(
    model: CODIModel,
    batch: PairBatch,
    questions: Sequence[str],
    branches: Sequence[Branch],
    *,
    n_latents: int = 6,
    max_rows: int = 256,
    max_new_tokens: int = 0,
) -> tuple[list[Float[Tensor, " batch"]], list[Float[Tensor, "batch d_vocab"]], list[BranchOutput]]:
    """Each branch's metric ``[batch]`` (float64), its logits at the compared row ``[batch, d_vocab]`` (where KL
    is read) and its output (generated answers with ``max_new_tokens``), for any branches of the batch's
    corrupted run (patches, routes): one pass of them per reading of the batch's metric (two for
    ``answer_logprob``)."""
    reads = batch_readings(batch)
    passes = [
        run_reading(model, batch, questions, branches, n_latents, max_rows, max_new_tokens if r == 0 else 0, reading)
        for r, reading in enumerate(reads)
    ]
    values = [metric_value(batch, [p[b].logits for p in passes]).cpu() for b in range(len(branches))]
    logits = [out.logits[:, 0].float() for out in passes[0]]
    return values, logits, passes[0]


def patched_metric(
    model: CODIModel,
    batch: PairBatch,
    questions: Sequence[str],
    sites: Sequence[Site],
    *,
    n_latents: int = 6,
    max_rows: int = 256,
    max_new_tokens: int = 0,
) -> tuple[list[Float[Tensor, " batch"]], list[Float[Tensor, "batch d_vocab"]], list[BranchOutput]]:
    """Each site's patched metric ``[batch]`` (float64), its logits at the compared row ``[batch, d_vocab]``
    (where KL is read) and its branch output (generated answers with ``max_new_tokens``): see
    :func:`branch_metric`."""
    branches = patch_branches(model, batch, sites, n_latents)
    return branch_metric(
        model, batch, questions, branches, n_latents=n_latents, max_rows=max_rows, max_new_tokens=max_new_tokens
    )


def patched_logits(
    model: CODIModel,
    batch: PairBatch,
    questions: Sequence[str],
    sites: Sequence[Site],
    *,
    n_latents: int = 6,
    max_rows: int = 256,
) -> list[Float[Tensor, "batch d_vocab"]]:
    """The corrupted run's logits at the compared row under each site's patch, ``[batch, d_vocab]`` per site
    (float32; see :func:`run_patches`)."""
    outputs = run_patches(model, batch, questions, sites, n_latents=n_latents, max_rows=max_rows)
    return [out.logits[:, 0].float() for out in outputs]
