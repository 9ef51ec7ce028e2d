"""The hooked CODI model: a TransformerLens model plus the projection head and the latent loop.

:class:`CODIModel` subclasses SAELens' ``HookedSAETransformer`` (hence ``HookedTransformer``), so
every TransformerLens hook, ``run_with_hooks``, ``ActivationCache`` and SAE splicing works as usual.
On top it adds the projection head (``prj``), one set of hook points per continuous-thought step
(see :mod:`codi_lens.core.names` for names and :mod:`codi_lens.core.positions` for the position
convention), one chunk computed under a KV cache (:meth:`CODIModel.forward_embeds`), and the runs of
the CODI loop composed from the steps of :mod:`codi_lens.core.loop`: :meth:`~CODIModel.run_codi`,
:meth:`~CODIModel.run_codi_with_cache`, :meth:`~CODIModel.score_answers`,
:meth:`~CODIModel.run_latents` and :meth:`~CODIModel.generate_explicit`. They run with left padding,
attention masks and per-example position ids, so a batch gives the same result as one question.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from codi_lens.core import loop
from codi_lens.core.components import CODITokens, ProjectionHead, StepHooks, ThoughtStep
from codi_lens.core.fused_attention import fuse_attention
from codi_lens.core.hashing import file_sha256
from codi_lens.core.hooks import HookFn
from codi_lens.core.latent_loop import CODI_LOOP, LatentLoop
from codi_lens.core.loop import LogitsAt, LoopState, stack_steps
from codi_lens.core.padding import pad_rows
from codi_lens.core.positions import ChunkContext, ChunkScope, CODIPositions
from codi_lens.core.recording import ActivationRecorder
from codi_lens.core.results import AnswerScores, CODIResult, LatentRun
from codi_lens.core.shared_norm import share_attention_norm
from codi_lens.core.unembed import unembed_directly

DEFAULT_N_LATENTS = 6
#: ``names_filter`` of a cached run: None (every hook), a name, a list of names or a predicate on names.
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


class ModelSource(Protocol):
    """How a model was made, enough for another process to make the same one (a Ray worker loads its own
    copy from it): :class:`codi_lens.loading.LoadSpec` records how :func:`codi_lens.load_codi` loaded it."""

    checkpoint_sha256: str

    def load(self) -> CODIModel: ...


class CODIModel(HookedSAETransformer):
    """A CODI model as a TransformerLens ``HookedTransformer`` with thought hooks and the CODI loop.

    Build it with :func:`codi_lens.load_codi`; the constructor only creates the (empty) modules.

    Attributes:
        tokenizer, codi_tokens: the base tokenizer and the ids CODI adds (pad, BOT, EOT) with the stop token.
        latent_loop: the method's loop (:class:`~codi_lens.core.latent_loop.LatentLoop`: CODI's by default).
        prj: the projection head (None for a loop that feeds hidden states back unchanged, as Coconut's);
            ``thought``: the hook points of steps 0..n.
        chunk_scope: where a run publishes the chunk being computed to hooks (see :class:`ChunkScope`).
        forward_listeners: callables told ``(rows, block)`` as each transformer block of every forward pass
            finishes (see :meth:`listening`); progress bars count work with them. They see no activation and
            change nothing.
        checkpoint_file: the weights file (None for a model built in memory, e.g. during training).
        source: how :func:`codi_lens.load_codi` loaded this model (None when built otherwise).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        tokenizer,
        *,
        tokens: CODITokens,
        prj_dim: int | None,
        prj_layernorm: bool = False,
        n_thought_hooks: int = DEFAULT_N_LATENTS,
        checkpoint_file: str | Path | None = None,
        latent_loop: LatentLoop = CODI_LOOP,
    ):
        super().__init__(cfg)
        fuse_attention(self.blocks)  # TransformerLens' explicit attention only where a hook needs the pattern
        share_attention_norm(self.blocks)  # one ln1 call for the query, key and value inputs when ln1 is unhooked
        unembed_directly(self.unembed)  # no copy of W_U per call
        self.tokenizer = tokenizer
        self.codi_tokens = tokens
        self.checkpoint_file = None if checkpoint_file is None else Path(checkpoint_file)
        self.latent_loop = latent_loop
        if latent_loop.has_projection != (prj_dim is not None):
            raise ValueError(f"{latent_loop.method} {'needs' if latent_loop.has_projection else 'has no'} prj_dim")
        self.prj = None if prj_dim is None else ProjectionHead(cfg.d_model, prj_dim, layernorm=prj_layernorm)
        self.thought = nn.ModuleList()
        self._grow_thought_hooks(n_thought_hooks)
        if self.prj is not None:
            self.prj.to(device=cfg.device, dtype=cfg.dtype)
        self.chunk_scope = ChunkScope()
        self.forward_listeners: list[Callable[[int, int], None]] = []
        self.source: ModelSource | None = None
        self.setup()

    @contextmanager
    def listening(self, listener: Callable[[int, int], None]) -> Iterator[None]:
        """Within the ``with`` block, ``listener(rows, block)`` is called as each transformer block of every
        forward pass (a loop step, a decoding step, a teacher-forced answer) finishes (``block`` 0 starts a new
        pass), so a progress bar moves while one long batch runs, even when one pass takes minutes."""
        self.forward_listeners.append(listener)
        try:
            yield
        finally:
            self.forward_listeners.remove(listener)

    @cached_property
    def checkpoint_sha256(self) -> str | None:
        """Content hash of the weights file (what ``run.json`` records), or None without a file."""
        return None if self.checkpoint_file is None else file_sha256(self.checkpoint_file)

    # ------------------------------------------------------------------ set-up helpers
    def store_weights_for_linear(self, keep_values: bool = True) -> None:
        """Lay out weights so TransformerLens' per-call weight copies become views.

        TransformerLens runs its gated MLP and attention output through ``F.linear``
        on ``W.T.contiguous()`` (HF's memory layout, for identical bf16 accumulation), and its query,
        key and value projections on ``rearrange(W, "head d_model d_head -> (head d_head) d_model")``.
        With the weights stored in their logical order each of those copies the whole weight on every
        call: on a CPU decoding one token at a time the MLP's copies, not the matmuls, dominated (41 of
        51 s for LLaMA-1B), and the query/key/value copies moved 24 MB per block per pass at that shape.
        Storing the same values in the memory order those calls read keeps every shape and value and
        makes the copies free.

        ``keep_values=False`` (a model about to be filled, as loading does): each such parameter gets new,
        uninitialised storage in that order, its old storage freed first, so no weight is ever held twice.
        The unembedding keeps its logical order: :class:`~codi_lens.core.unembed.DirectUnembed` reads it so.
        """
        with torch.no_grad():
            for name, param in self.named_parameters():
                order = self.linear_memory_order(name)
                if order is None:
                    continue
                if keep_values:
                    param.data = param.data.permute(order).contiguous().permute(_inverse(order))
                else:
                    shape, dtype, device = param.shape, param.dtype, param.device
                    param.data = torch.empty(0, dtype=dtype, device=device)  # the old storage goes first
                    stored = torch.empty([shape[i] for i in order], dtype=dtype, device=device)
                    param.data = stored.permute(_inverse(order))

    def linear_memory_order(self, name: str) -> tuple[int, ...] | None:
        """The order of axes in which parameter ``name`` is stored for the calls that read it (None: its own)."""
        if self.cfg.gated_mlp and name.endswith(("mlp.W_gate", "mlp.W_in", "mlp.W_out")):
            return (1, 0)
        if name.endswith("attn.W_O"):
            return (2, 0, 1)
        if name.endswith(("attn.W_Q", "attn.W_K", "attn.W_V", "attn._W_K", "attn._W_V")):
            return (0, 2, 1)
        return None

    def latents_or_default(self, n_latents: int | None) -> int:
        """``n_latents``, or the number of thoughts the loop's method was trained with when None."""
        return self.latent_loop.n_latents if n_latents is None else n_latents

    def ensure_thought_hooks(self, n_latents: int) -> None:
        """Make sure hook points exist for thought steps ``0..n_latents`` and, for a Jacobi loop, for each of
        their sweeps ``0..n_sweeps``."""
        if self._grow_thought_hooks(n_latents):
            self.setup()

    def _grow_thought_hooks(self, n_latents: int) -> bool:
        """Add the missing thought (and sweep) hook points; whether any was added."""
        grown = len(self.thought) < n_latents + 1
        self.thought.extend(ThoughtStep() for _ in range(n_latents + 1 - len(self.thought)))
        n_sweeps = self.latent_loop.n_sweeps + 1 if self.latent_loop.is_jacobi else 0
        for step in list(self.thought)[1:]:
            if len(step.sweep) < n_sweeps:
                step.sweep.extend(StepHooks() for _ in range(n_sweeps - len(step.sweep)))
                grown = True
        return grown

    def tokenize_questions(self, questions: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Write each question as the loop's method does (CODI: upstream's cleaning), tokenize (BOS as the
        tokenizer adds it) and left-pad.

        Returns ``(tokens, attention_mask)``, both ``[batch, max_len]``, padded with the pad id.
        """
        _check_questions(questions)
        ids = [self.tokenizer(self.latent_loop.question_text(q))["input_ids"] for q in questions]
        tokens, mask = pad_rows(ids, self.codi_tokens.pad, side="left")
        return tokens.to(self.cfg.device), mask.to(self.cfg.device)

    def tokenize_answers(
        self, answers: Sequence[str | Sequence[int]], append_eos: bool = False
    ) -> tuple[Int[Tensor, "batch answer_pos"], Int[Tensor, "batch answer_pos"]]:
        """Tokenize answers (strings without special tokens, or token-id lists as given); right-pad.

        Returns ``(tokens, mask)``, both ``[batch, max_answer_len]``.
        """
        ids = [
            (self.tokenizer(a, add_special_tokens=False)["input_ids"] if isinstance(a, str) else list(a))
            + ([self.codi_tokens.eos] if append_eos else [])
            for a in answers
        ]
        if any(len(x) == 0 for x in ids):
            raise ValueError("an answer is empty: give at least one answer token (or append_eos=True)")
        tokens, mask = pad_rows(ids, self.codi_tokens.pad, side="right")
        return tokens.to(self.cfg.device), mask.to(self.cfg.device)

    def token_embeds(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Input embeddings of token ids (rows of ``W_E``, including the BOT/EOT rows)."""
        return self.embed(tokens.to(self.cfg.device))

    def decode_answers(self, answers: Sequence[Sequence[int]]) -> tuple[list[str], list[float | None]]:
        """Generated answer tokens as text (special tokens skipped) and the number each predicts, by the
        loop's method's rule (CODI: the last number in the text; None if there is none)."""
        texts = [self.tokenizer.decode(list(a), skip_special_tokens=True) for a in answers]
        return texts, [self.latent_loop.prediction(t) for t in texts]

    # ------------------------------------------------------------------ the position context
    @property
    def chunk_context(self) -> ChunkContext:
        """The chunk being computed (its positions and the run's position map), as positional hooks read it.

        Raises :class:`~codi_lens.core.errors.PositionContextError` outside a CODI run (a plain
        ``run_with_hooks`` does not track positions).
        """
        return self.chunk_scope.current

    # ------------------------------------------------------------------ one chunk under a KV cache
    def forward_embeds(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        kv_cache: TransformerLensKeyValueCache | None = None,
        *,
        positions: CODIPositions,
        logits_at: LogitsAt = "last",
        sweep: int | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch n d_vocab"] | None]:
        """Run the transformer on input embeddings, appending to ``kv_cache`` if given.

        Every input goes through ``hook_embed`` (and ``hook_pos_embed`` for GPT-2) exactly as token
        embeddings do, so caches cover thought positions too. Positions and padding come from the
        attention mask (left padding is ignored by attention and does not shift positions). Hooks see
        this chunk's positions through ``model.chunk_scope`` (``positions`` is the run's position map).

        Returns ``(final, logits)``: ``final`` is the post-final-norm residual (with the gain)
        ``[batch, pos, d_model]``; ``logits`` is ``[batch, 1, d_vocab]`` for ``logits_at="last"``,
        ``[batch, pos, d_vocab]`` for ``"all"``, or None for ``"none"``; a ``[batch]`` (or
        ``[batch, k]``) tensor of indices into this chunk gives ``[batch, 1 (or k), d_vocab]`` at each
        row's own indices (the unembedding, the largest matmul of a small model with a large
        vocabulary, then runs only there). Every listener of :meth:`listening` is told each block as it ends.
        ``sweep``: the sweep of a Jacobi loop this chunk computes (published to hooks with its positions).
        """
        n_past = 0 if kv_cache is None else kv_cache.previous_attention_mask.shape[1]
        span = torch.arange(n_past, n_past + embeds.shape[1])
        attention_mask = attention_mask.to(self.cfg.device)
        full_mask = attention_mask if kv_cache is None else kv_cache.append_attention_mask(attention_mask)
        with self.chunk_scope.scoped(ChunkContext(span, positions, sweep)):
            residual = self.hook_embed(embeds.to(self.cfg.dtype))
            if self.cfg.positional_embedding_type == "standard":
                residual = residual + self.hook_pos_embed(self.pos_embed(attention_mask, n_past, full_mask))
            for i, block in enumerate(self.blocks):
                residual = block(
                    residual,
                    past_kv_cache_entry=None if kv_cache is None else kv_cache[i],
                    attention_mask=full_mask,
                )
                for listener in self.forward_listeners:
                    listener(embeds.shape[0], i)
            final = self.ln_final(residual)
            if isinstance(logits_at, Tensor):
                index = logits_at.to(final.device)
                index = index[:, None] if index.dim() == 1 else index
                rows = torch.arange(final.shape[0], device=final.device)[:, None]
                return final, self.unembed(final[rows, index])
            if logits_at == "none":
                return final, None
            if logits_at == "all":
                return final, self.unembed(final)
        with self.chunk_scope.scoped(ChunkContext(span[-1:], positions, sweep)):  # the unembedding: the last position
            return final, self.unembed(final[:, -1:])

    def logits_hooked(self) -> bool:
        """Whether a hook watches the unembedding (then every step's logits are computed, as it expects)."""
        return any(point.fwd_hooks for point in (self.unembed.hook_in, self.unembed.hook_out))

    # ------------------------------------------------------------------ runs of the loop
    @torch.no_grad()
    def run_codi(
        self,
        questions: Sequence[str],
        *,
        n_latents: int | None = None,
        max_new_tokens: int = 256,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        return_logits: bool = False,
    ) -> CODIResult:
        """Run CODI inference exactly as upstream ``test.py`` does, batch-invariantly.

        Sequence: ``[question..., BOT, z_1..z_n, EOT, answer...]`` with ``z_1 = prj(h_0)``,
        ``z_{k+1} = prj(h_k)``, greedy decoding excluding only the EOT id, stopping at EOS.

        Args:
            questions: raw question strings (cleaned with upstream's rule), at least one.
            n_latents: number of fed-back continuous thoughts (default: the loop's, 6 for CODI and Coconut;
                0 runs BOT, EOT, answer).
            max_new_tokens: answer-token budget (upstream: 256).
            fwd_hooks: ``(name, fn)`` pairs (TransformerLens names at any layer, or thought hooks;
                names may also be predicates) applied throughout the loop and removed afterwards.
                Activations a hook sees cover the current chunk; ``model.chunk_context`` gives their
                positions (see :class:`codi_lens.core.hooks.PositionalHook`). A hook on a thought or
                position this run does not reach raises :class:`~codi_lens.core.errors.PositionError`.
            return_logits: also return every step's logits (memory: steps x d_vocab per example).
        """
        n_latents = self.latents_or_default(n_latents)
        return self._generate(questions, n_latents, max_new_tokens, fwd_hooks, return_logits, prompt_logits="last")

    def _generate(
        self,
        questions: Sequence[str],
        n_latents: int,
        max_new_tokens: int,
        fwd_hooks: Sequence[tuple[str, HookFn]],
        return_logits: bool,
        prompt_logits: Literal["last", "all"],
    ) -> CODIResult:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, mask = loop.prepare(self, questions, n_latents)
        positions = loop.run_positions(self, mask, n_latents, [max_new_tokens] * len(questions))
        with loop.hooks_for_run(self, fwd_hooks, positions):
            state, _ = loop.run_latents(
                self, tokens, mask, positions, keep_logits=return_logits, prompt_logits=prompt_logits
            )
            answers = loop.greedy_decode(self, state, max_new_tokens, keep_logits=return_logits)
        return self._result(state, answers, return_logits)

    def _result(self, state: LoopState, answers: list[list[int]], keep_logits: bool) -> CODIResult:
        """The one place a :class:`CODIResult` is assembled from a finished run."""
        batch, like = len(answers), state.kv_cache[0].past_keys
        texts, predictions = self.decode_answers(answers)
        return CODIResult(
            latent_states=stack_steps(state.latent_states, batch, self.cfg.d_model, like),
            thought_embeds=stack_steps(state.thought_embeds, batch, self.cfg.d_model, like),
            answer_tokens=answers,
            answer_text=texts,
            prediction=predictions,
            positions=replace(state.positions, answer_lengths=[len(a) for a in answers]),
            step_logits=torch.stack(state.step_logits, dim=1) if keep_logits else None,
        )

    @torch.no_grad()
    def generate_explicit(self, questions: Sequence[str], *, max_new_tokens: int = 256) -> CODIResult:
        """Plain greedy decoding after the question, with no BOT and no thoughts.

        This is CODI's *teacher* mode: a model trained with the CODI objective also learned to write
        the explicit chain of thought (``<<a*b=c>> ... The answer is: N``). ``latent_states`` and
        ``thought_embeds`` of the result are empty; in its ``positions`` BOT, EOT and the answer start
        all name the first generated position (no BOT or EOT is fed in this mode).
        """
        tokens, mask = self.tokenize_questions(questions)
        width = mask.shape[1]
        positions = CODIPositions(
            (width - mask.sum(1)).tolist(), width, [], width, width, [max_new_tokens] * len(questions)
        )
        state = loop.new_state(self, len(questions), positions)
        _, logits = self.forward_embeds(self.token_embeds(tokens), mask, state.kv_cache, positions=positions)
        answers = loop.greedy_decode(self, state, max_new_tokens, first_logits=logits[:, -1])
        return self._result(state, answers, False)

    @torch.no_grad()
    def run_codi_with_cache(
        self,
        questions: Sequence[str],
        *,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        n_latents: int | None = None,
        max_new_tokens: int = 256,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        return_logits: bool = False,
    ) -> tuple[CODIResult, ActivationCache]:
        """:meth:`run_codi` plus an ``ActivationCache`` stitched across the KV-cache steps.

        Standard activations cover the whole fed sequence (question, BOT, thoughts, EOT, answer
        tokens that were fed back) along their usual position axis; attention patterns are
        ``[batch, head, query_pos, key_pos]`` over that sequence (zero where a key was not yet
        visible). Thought hooks hold ``[batch, d_model]``; ``prj.*`` hooks are stacked per step to
        ``[batch, n_latents + 1, ...]``. Logits are computed at every prompt position (the cache of
        ``unembed.hook_out`` covers the whole sequence).

        Memory: each chunk's activations are written into one whole-sequence buffer per hook
        (rotated keys, which cover every cached position, cut to the chunk's own), so the cache
        grows linearly with length (attention patterns quadratically) and is a few large tensors
        (see :mod:`codi_lens.core.recording`).

        Args:
            names_filter: None (all hooks), a name, a list of names or a predicate on names.
            device: where cached tensors are stored (default: the model's device).
        """
        n_latents = self.latents_or_default(n_latents)
        recorder = ActivationRecorder(self.chunk_scope, device)
        hooks = [*fwd_hooks, *self._caching_hooks(recorder, names_filter, n_latents)]
        result = self._generate(questions, n_latents, max_new_tokens, hooks, return_logits, prompt_logits="all")
        return result, ActivationCache(recorder.tensors(), self, has_batch_dim=True)

    def _caching_hooks(
        self, recorder: ActivationRecorder, names_filter: NamesFilter, n_latents: int
    ) -> list[tuple[str, ActivationRecorder]]:
        keep = _as_name_predicate(names_filter)
        return [(name, recorder) for name in self.hook_names_of_run(n_latents) if keep(name)]

    @torch.no_grad()
    def run_latents(
        self,
        questions: Sequence[str],
        *,
        n_latents: int | None = None,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        names_filter: NamesFilter | Literal[False] = False,
        device: str | torch.device | None = None,
    ) -> LatentRun:
        """The latent loop alone: question + BOT and thoughts 1..n under ``fwd_hooks``, no EOT or answer.

        With ``names_filter`` (None for every hook), the activations of the question, BOT and thoughts are
        cached as in :meth:`run_codi_with_cache`. The latent states, fed thoughts and cached activations
        equal those of a full run, which computes the same steps before its answer.
        """
        n_latents = self.latents_or_default(n_latents)
        tokens, mask = loop.prepare(self, questions, n_latents)
        positions = loop.run_positions(self, mask, n_latents, [1] * len(questions))
        recorder = None if names_filter is False else ActivationRecorder(self.chunk_scope, device)
        hooks = [*fwd_hooks, *([] if recorder is None else self._caching_hooks(recorder, names_filter, n_latents))]
        with loop.hooks_for_run(self, hooks, positions):
            state, _ = loop.run_latents(self, tokens, mask, positions)
        batch, like = len(questions), state.kv_cache[0].past_keys
        return LatentRun(
            latent_states=stack_steps(state.latent_states, batch, self.cfg.d_model, like),
            thought_embeds=stack_steps(state.thought_embeds, batch, self.cfg.d_model, like),
            positions=positions,
            cache=None if recorder is None else ActivationCache(recorder.tensors(), self, has_batch_dim=True),
        )

    def hook_names_of_run(self, n_latents: int | None = None) -> list[str]:
        """Every hook point that fires in a run with ``n_latents`` thoughts (SAE hook points included)."""
        n_latents = self.latents_or_default(n_latents)
        self.ensure_thought_hooks(n_latents)

        n_sweeps = self.latent_loop.n_sweeps
        return [
            name for name in self.hook_dict if loop.unreached_hook(self.latent_loop, name, n_latents, n_sweeps) is None
        ]

    # ------------------------------------------------------------------ teacher forcing
    @torch.no_grad()
    def score_answers(
        self,
        questions: Sequence[str],
        answers: Sequence[str | Sequence[int]],
        *,
        n_latents: int | None = None,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        append_eos: bool = False,
    ) -> AnswerScores:
        """Teacher-forced logits at every answer token, after running the real latent loop.

        Feeds ``[EOT] + answer tokens`` (with the loop's answer prompt after EOT, PCCoT's) in one pass under
        the latent loop's KV cache; row j of the logits predicts answer token j. ``answers`` are strings
        (tokenized without special tokens) or token-id lists (e.g. a generation's ``answer_tokens``). Use it for
        KL and logit-difference
        metrics (e.g. at the first answer-number token of ``"The answer is: 18"``).
        """
        if isinstance(answers, str) or len(questions) != len(answers):
            raise ValueError(f"give one answer per question ({len(questions)} questions)")
        n_latents = self.latents_or_default(n_latents)
        tokens, mask = loop.prepare(self, questions, n_latents)
        answer_tokens, answer_mask = self.tokenize_answers(answers, append_eos)
        positions = loop.run_positions(self, mask, n_latents, answer_mask.sum(1).tolist())
        opening = loop.answer_opening(self)
        fed, fed_mask = loop.teacher_forced_input(opening, answer_tokens, answer_mask)
        answer_rows = loop.answer_rows(opening, answer_tokens.shape[1], len(questions))
        with loop.hooks_for_run(self, fwd_hooks, positions):
            state, _ = loop.run_latents(self, tokens, mask, positions)
            _, logits = self.forward_embeds(
                self.token_embeds(fed), fed_mask, state.kv_cache, positions=positions, logits_at=answer_rows
            )
        batch, like = len(questions), state.kv_cache[0].past_keys
        return AnswerScores(
            logits=logits,
            answer_tokens=answer_tokens,
            answer_mask=answer_mask,
            latent_states=stack_steps(state.latent_states, batch, self.cfg.d_model, like),
            thought_embeds=stack_steps(state.thought_embeds, batch, self.cfg.d_model, like),
            positions=positions,
        )


def _check_questions(questions: Sequence[str]) -> None:
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not a single string")
    if len(questions) == 0:
        raise ValueError("questions is empty: give at least one question")
    bad = [i for i, q in enumerate(questions) if not isinstance(q, str)]
    if bad:
        raise TypeError(f"questions must be strings; item {bad[0]} is {type(questions[bad[0]]).__name__}")


def _as_name_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    allowed = set(names_filter)
    return lambda name: name in allowed


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``order``."""
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return tuple(inverse)
