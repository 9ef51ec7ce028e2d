"""The hooked CODI model: a TransformerLens model plus the projection head and the latent loop.

:class:`CODIModel` subclasses SAELens' ``HookedSAETransformer`` (hence ``HookedTransformer``), so
every TransformerLens hook, ``run_with_hooks``, ``ActivationCache`` and SAE splicing works as usual.
On top it adds the projection head (``prj``), one set of hook points per continuous-thought step
(see :mod:`codi_lens.hooks` for names and the position convention) and the exact CODI inference
loop (:meth:`CODIModel.run_codi`), which runs under a TransformerLens KV cache with left padding,
attention masks and per-example position ids so a batch gives the same result as one question.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint

from codi_lens.answers import clean_question, extract_prediction
from codi_lens.architectures import BaseArchitecture
from codi_lens.cache import ActivationRecorder
from codi_lens.checkpoint import CheckpointLayout, file_sha256
from codi_lens.hooks import (
    ChunkContext,
    CODIPositions,
    PositionalHook,
    PositionContextError,
    PositionError,
    parse_thought_hook,
)
from codi_lens.padding import pad_rows

DEFAULT_N_LATENTS = 6


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


class ThoughtStep(nn.Module):
    """Hook points of one latent step (index 0 is BOT); see :mod:`codi_lens.hooks`."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_input = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_projection = HookPoint()


@dataclass(frozen=True)
class CODITokens:
    """Token ids CODI adds to a base vocabulary of size V, plus the stop token."""

    pad: int
    bot: int
    eot: int
    eos: int


@dataclass
class CODIResult:
    """Output of :meth:`CODIModel.run_codi`.

    Attributes:
        latent_states: ``[batch, n_latents + 1, d_model]``: ``h_0`` (at BOT) .. ``h_n``, post-final-norm
            hidden states including the norm's gain: exactly what the projection consumed.
        thought_embeds: ``[batch, n_latents, d_model]``: the embeddings fed at thoughts 1..n.
        answer_tokens: generated token ids per example (including the EOS that stopped it).
        answer_text: decoded with special tokens skipped.
        prediction: the last number in ``answer_text`` (upstream's rule), or None.
        positions: the position map (see :class:`CODIPositions`).
        step_logits: if requested, ``[batch, n_latents + 2 + max_answer_len - 1, d_vocab]``: the
            logits output at BOT, each thought, EOT and each fed answer token, in order.
    """

    latent_states: Float[Tensor, "batch n_latents_plus_1 d_model"]
    thought_embeds: Float[Tensor, "batch n_latents d_model"]
    answer_tokens: list[list[int]]
    answer_text: list[str]
    prediction: list[float | None]
    positions: CODIPositions
    step_logits: Float[Tensor, "batch n_steps d_vocab"] | None = None


@dataclass
class AnswerScores:
    """Teacher-forced answer logits from :meth:`CODIModel.score_answers`.

    Attributes:
        logits: ``[batch, max_answer_len, d_vocab]``: row j is the distribution predicting answer
            token j (row 0 is the output at EOT). Rows past an example's answer length are padding.
        answer_tokens: ``[batch, max_answer_len]`` token ids, right-padded with the pad id.
        answer_mask: ``[batch, max_answer_len]``, 1 where a real answer token is.
        latent_states, thought_embeds, positions: as in :class:`CODIResult`.
    """

    logits: Float[Tensor, "batch answer_pos d_vocab"]
    answer_tokens: Int[Tensor, "batch answer_pos"]
    answer_mask: Int[Tensor, "batch answer_pos"]
    latent_states: Float[Tensor, "batch n_latents_plus_1 d_model"]
    thought_embeds: Float[Tensor, "batch n_latents d_model"]
    positions: CODIPositions

    def log_probs_of_answers(self) -> Float[Tensor, "batch answer_pos"]:
        """Log-probability of each teacher-forced answer token (0 at padding)."""
        logp = self.logits.float().log_softmax(-1).gather(-1, self.answer_tokens[..., None])[..., 0]
        return logp * self.answer_mask


@dataclass
class _LatentLoopState:
    kv_cache: TransformerLensKeyValueCache
    layout: CODIPositions
    latent_states: list[Tensor] = field(default_factory=list)
    thought_embeds: list[Tensor] = field(default_factory=list)
    step_logits: list[Tensor] = field(default_factory=list)


def _stack_steps(steps: list[Tensor], batch: int, d_model: int, like: Tensor) -> Tensor:
    """``[batch, n_steps, d_model]`` from per-step tensors (an empty ``[batch, 0, d_model]`` for none)."""
    if not steps:
        return like.new_zeros((batch, 0, d_model))
    return torch.stack(steps, dim=1)


class CODIModel(HookedSAETransformer):
    """A CODI model as a TransformerLens ``HookedTransformer`` with thought hooks and the CODI loop.

    Build it with :func:`codi_lens.load_codi`; the constructor only creates the (empty) modules.

    Attributes:
        architecture, layout: the base architecture and the checkpoint layout it was loaded from.
        checkpoint_file: the weights file (None for a model built in memory, e.g. during training).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        tokenizer,
        *,
        tokens: CODITokens,
        prj_dim: int,
        prj_layernorm: bool,
        n_thought_hooks: int = DEFAULT_N_LATENTS,
        architecture: BaseArchitecture | None = None,
        layout: CheckpointLayout | None = None,
        checkpoint_file: str | Path | None = None,
    ):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.codi_tokens = tokens
        self.architecture = architecture
        self.layout = layout
        self.checkpoint_file = None if checkpoint_file is None else Path(checkpoint_file)
        self.prj = ProjectionHead(cfg.d_model, prj_dim, layernorm=prj_layernorm)
        self.thought = nn.ModuleList([ThoughtStep() for _ in range(n_thought_hooks + 1)])
        self.prj.to(device=cfg.device, dtype=cfg.dtype)
        self._chunk_context: ChunkContext | None = None
        #: how :func:`codi_lens.load_codi` loaded this model (None when built otherwise); see
        #: :class:`codi_lens.loading.LoadSpec`. A Ray worker loads its own copy from it.
        self.load_spec = None
        self.setup()

    @cached_property
    def checkpoint_sha256(self) -> str | None:
        """Content hash of the weights file (what ``run.json`` records), or None without a file."""
        return None if self.checkpoint_file is None else file_sha256(self.checkpoint_file)

    # ------------------------------------------------------------------ set-up helpers
    def store_weights_for_linear(self) -> None:
        """Lay out weights so TransformerLens' per-call ``.T.contiguous()`` copies become no-ops.

        TransformerLens runs its gated MLP, unembedding and attention output through ``F.linear``
        on ``W.T.contiguous()`` (HF's memory layout, for identical bf16 accumulation). With the
        weights stored as ``[d_model, d_mlp]`` that copies every weight on every call: on a CPU
        decoding one token at a time that copy, not the matmul, dominated (41 of 51 s for
        LLaMA-1B). Storing the same values in the transposed memory layout keeps every shape and
        value and makes those copies free.
        """
        with torch.no_grad():
            for name, param in self.named_parameters():
                if (
                    self.cfg.gated_mlp and name.endswith(("mlp.W_gate", "mlp.W_in", "mlp.W_out"))
                ) or name == "unembed.W_U":
                    param.data = param.data.T.contiguous().T
                elif name.endswith("attn.W_O"):
                    param.data = param.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)

    def ensure_thought_hooks(self, n_latents: int) -> None:
        """Make sure hook points exist for thought steps ``0..n_latents``."""
        if len(self.thought) < n_latents + 1:
            self.thought.extend(ThoughtStep() for _ in range(n_latents + 1 - len(self.thought)))
            self.setup()

    def tokenize_questions(self, questions: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Clean (upstream rule), tokenize (BOS as the tokenizer adds it) and left-pad questions.

        Returns ``(tokens, attention_mask)``, both ``[batch, max_len]``, padded with the pad id.
        """
        _check_questions(questions)
        ids = [self.tokenizer(clean_question(q))["input_ids"] for q in questions]
        tokens, mask = pad_rows(ids, self.codi_tokens.pad, side="left")
        return tokens.to(self.cfg.device), mask.to(self.cfg.device)

    def token_embeds(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Input embeddings of token ids (rows of ``W_E``, including the BOT/EOT rows)."""
        return self.embed(tokens.to(self.cfg.device))

    # ------------------------------------------------------------------ the position context
    @property
    def chunk_context(self) -> ChunkContext:
        """The chunk being computed (positions and the run's position map); read by positional hooks.

        Raises :class:`~codi_lens.hooks.PositionContextError` outside a CODI run (a plain
        ``run_with_hooks`` does not track positions).
        """
        if self._chunk_context is None:
            raise PositionContextError(
                "a positional hook fired outside a CODI run: positions are known only inside run_codi, "
                "run_codi_with_cache, score_answers and generate_explicit"
            )
        return self._chunk_context

    @contextmanager
    def _chunk_scope(self, context: ChunkContext) -> Iterator[None]:
        """Publish ``context`` for one chunk; the previous context (an outer run's) comes back after."""
        outer, self._chunk_context = self._chunk_context, context
        try:
            yield
        finally:
            self._chunk_context = outer

    # ------------------------------------------------------------------ one chunk under a KV cache
    def forward_embeds(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        kv_cache: TransformerLensKeyValueCache | None = None,
        *,
        layout: CODIPositions,
        logits_at: str = "last",
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch n d_vocab"] | None]:
        """Run the transformer on input embeddings, appending to ``kv_cache`` if given.

        Every input goes through ``hook_embed`` (and ``hook_pos_embed`` for GPT-2) exactly as token
        embeddings do, so caches cover thought positions too. Positions and padding come from the
        attention mask (left padding is ignored by attention and does not shift positions). Hooks see
        this chunk's positions as ``model.chunk_context`` (``layout`` is the run's position map).

        Returns ``(final, logits)``: ``final`` is the post-final-norm residual (with the gain)
        ``[batch, pos, d_model]``; ``logits`` is ``[batch, 1, d_vocab]`` for ``logits_at="last"``,
        ``[batch, pos, d_vocab]`` for ``"all"``, or None for ``"none"``; a ``[batch]`` (or
        ``[batch, k]``) tensor of indices into this chunk gives ``[batch, 1 (or k), d_vocab]`` at each
        row's own indices (the unembedding, the largest matmul of a small model with a large
        vocabulary, then runs only there).
        """
        n_past = 0 if kv_cache is None else kv_cache.previous_attention_mask.shape[1]
        positions = torch.arange(n_past, n_past + embeds.shape[1])
        attention_mask = attention_mask.to(self.cfg.device)
        full_mask = attention_mask if kv_cache is None else kv_cache.append_attention_mask(attention_mask)
        with self._chunk_scope(ChunkContext(positions, layout)):
            residual = self.hook_embed(embeds.to(self.cfg.dtype))
            if self.cfg.positional_embedding_type == "standard":
                residual = residual + self.hook_pos_embed(self.pos_embed(attention_mask, n_past, full_mask))
            for i, block in enumerate(self.blocks):
                residual = block(
                    residual,
                    past_kv_cache_entry=None if kv_cache is None else kv_cache[i],
                    attention_mask=full_mask,
                )
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
        with self._chunk_scope(ChunkContext(positions[-1:], layout)):  # the unembedding sees the last position only
            return final, self.unembed(final[:, -1:])

    def _logits_hooked(self) -> bool:
        """Whether a hook watches the unembedding (then every step's logits are computed, as it expects)."""
        return any(point._forward_hooks for point in (self.unembed.hook_in, self.unembed.hook_out))

    def _step_logits(self, keep_logits: bool) -> str:
        """What a latent step computes at the unembedding: nothing unless kept or hooked."""
        return "last" if keep_logits or self._logits_hooked() else "none"

    # ------------------------------------------------------------------ the latent loop
    def _project(self, k: int, h: Float[Tensor, "batch d_model"], state: _LatentLoopState) -> Tensor:
        """Record ``h_k`` (through its hook) and return ``prj(h_k)`` (through its hook)."""
        h = self.thought[k].hook_hidden(h)
        state.latent_states.append(h)
        return self.thought[k].hook_projection(self.prj(h))

    def _new_state(self, batch: int, layout: CODIPositions) -> _LatentLoopState:
        return _LatentLoopState(TransformerLensKeyValueCache.init_cache(self.cfg, self.cfg.device, batch), layout)

    def _run_prompt(
        self, tokens: Tensor, mask: Tensor, layout: CODIPositions, *, keep_logits: bool, prompt_logits: str = "last"
    ) -> tuple[_LatentLoopState, Tensor]:
        """Question + BOT in one chunk; returns the state and ``prj(h_0)``, the input of thought 1."""
        batch = tokens.shape[0]
        state = self._new_state(batch, layout)
        bot = torch.full((batch, 1), self.codi_tokens.bot, dtype=torch.long, device=tokens.device)
        prompt = torch.cat([tokens, bot], dim=1)
        prompt_mask = torch.cat([mask, torch.ones_like(bot)], dim=1)
        if prompt_logits == "last":
            prompt_logits = self._step_logits(keep_logits)
        final, logits = self.forward_embeds(
            self.token_embeds(prompt), prompt_mask, state.kv_cache, layout=layout, logits_at=prompt_logits
        )
        if keep_logits:
            state.step_logits.append(logits[:, -1])
        return state, self._project(0, final[:, -1], state)

    def _run_thoughts(
        self, state: _LatentLoopState, z: Tensor, *, keep_logits: bool, first: int = 1, last: int | None = None
    ) -> Tensor:
        """Feed thoughts ``first``..``last`` (default: n; ``z`` is the input of thought ``first``) under the
        state's KV cache; returns ``prj(h_last)``, the input of the thought after ``last``."""
        ones = torch.ones((z.shape[0], 1), dtype=torch.long, device=z.device)
        logits_at = self._step_logits(keep_logits)
        last = state.layout.n_latents if last is None else last
        for k in range(first, last + 1):
            fed = self.thought[k].hook_input(z)
            state.thought_embeds.append(fed)
            final, logits = self.forward_embeds(
                fed[:, None], ones, state.kv_cache, layout=state.layout, logits_at=logits_at
            )
            if keep_logits:
                state.step_logits.append(logits[:, -1])
            z = self._project(k, final[:, -1], state)
        return z

    def _run_latents(
        self, tokens: Tensor, mask: Tensor, layout: CODIPositions, *, keep_logits: bool, prompt_logits: str = "last"
    ) -> _LatentLoopState:
        """Question + BOT, then ``layout.n_latents`` fed-back thoughts, under one KV cache."""
        state, z = self._run_prompt(tokens, mask, layout, keep_logits=keep_logits, prompt_logits=prompt_logits)
        self._run_thoughts(state, z, keep_logits=keep_logits)
        return state

    @staticmethod
    def _layout(mask: Tensor, n_latents: int, answer_lengths: list[int]) -> CODIPositions:
        width = mask.shape[1]
        return CODIPositions(
            n_pad=(width - mask.sum(1)).tolist(),
            bot=width,
            thoughts=[width + k for k in range(1, n_latents + 1)],
            eot=width + n_latents + 1,
            answer_start=width + n_latents + 2,
            answer_lengths=answer_lengths,
        )

    def hook_names_of_run(self, n_latents: int = DEFAULT_N_LATENTS) -> list[str]:
        """Every hook point that fires in a run with ``n_latents`` thoughts (SAE hook points included)."""
        self.ensure_thought_hooks(n_latents)

        def fires(name: str) -> bool:
            thought = parse_thought_hook(name)
            return thought is None or (1 if thought[1] == "input" else 0) <= thought[0] <= n_latents

        return [name for name in self.hook_dict if fires(name)]

    def _check_hooks(self, fwd_hooks: Sequence[tuple], layout: CODIPositions) -> None:
        """Refuse, before anything runs, hooks aimed at thoughts or positions this run does not reach."""
        n = layout.n_latents
        for name, fn in fwd_hooks:
            if isinstance(name, str):
                thought = parse_thought_hook(name)
                if thought is not None:
                    k, kind = thought
                    if not (1 if kind == "input" else 0) <= k <= n:
                        raise PositionError(
                            f"{name} is outside this run: it has {n} thoughts (thought.k.hook_input for k = 1..{n}, "
                            f"hook_hidden / hook_projection for k = 0..{n})"
                        )
                elif name not in self.hook_dict:
                    raise KeyError(f"no hook point named {name!r} (see model.hook_dict)")
            if isinstance(fn, PositionalHook):
                if fn.model is not self:
                    raise ValueError(f"the positional hook on {name} was built for another model")
                fn.resolve(layout)

    def _greedy_decode(
        self,
        state: _LatentLoopState,
        max_new_tokens: int,
        keep_logits: bool,
        first_logits: Tensor | None = None,
        *,
        compact: bool = False,
    ) -> list[list[int]]:
        """Feed EOT, then greedy tokens (argmax excluding only EOT) until EOS or the budget.

        Rows stop at their own EOS (later tokens are not recorded); the batch stops when all have.
        With ``first_logits`` (``[batch, d_vocab]``), nothing is fed first: the first token is chosen
        from those logits (plain decoding after a prompt). With ``compact=True`` finished rows leave
        the batch (their KV-cache rows are dropped), so later steps compute only the rows still
        writing; use it only when no hook that indexes rows is live during decoding. ``compact``
        does not keep logits.
        """
        if compact and keep_logits:
            raise ValueError("compact decoding does not keep logits")
        device, batch = self.cfg.device, len(state.layout.n_pad)
        eos, n_allowed = self.codi_tokens.eos, self.cfg.d_vocab - 1
        next_input = torch.full((batch, 1), self.codi_tokens.eot, dtype=torch.long, device=device)
        answers: list[list[int]] = [[] for _ in range(batch)]
        active = torch.arange(batch)  # the original row of each row still in the batch
        finished = torch.zeros(batch, dtype=torch.bool)
        for step in range(max_new_tokens):
            if step == 0 and first_logits is not None:
                logits = first_logits[:, None]
            else:
                ones = torch.ones((len(next_input), 1), dtype=torch.long, device=device)
                _, logits = self.forward_embeds(
                    self.token_embeds(next_input), ones, state.kv_cache, layout=state.layout
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
                _keep_rows(state.kv_cache, torch.nonzero(still).flatten().to(device))
                active, chosen = active[still], chosen[still]
            next_input = chosen[:, None].to(device)
        return answers

    def _result(self, state: _LatentLoopState, answers: list[list[int]], keep_logits: bool) -> CODIResult:
        """The one place a :class:`CODIResult` is assembled from a finished run."""
        batch, like = len(answers), state.kv_cache[0].past_keys
        texts, predictions = self.decode_answers(answers)
        layout = state.layout
        positions = replace(layout, answer_lengths=[len(a) for a in answers])
        return CODIResult(
            latent_states=_stack_steps(state.latent_states, batch, self.cfg.d_model, like),
            thought_embeds=_stack_steps(state.thought_embeds, batch, self.cfg.d_model, like),
            answer_tokens=answers,
            answer_text=texts,
            prediction=predictions,
            positions=positions,
            step_logits=torch.stack(state.step_logits, dim=1) if keep_logits else None,
        )

    def decode_answers(self, answers: Sequence[Sequence[int]]) -> tuple[list[str], list[float | None]]:
        """Generated answer tokens as text (special tokens skipped) and the number each predicts
        (upstream's rule: the last number in the text; None if there is none)."""
        texts = [self.tokenizer.decode(list(a), skip_special_tokens=True) for a in answers]
        return texts, [extract_prediction(t) for t in texts]

    @contextmanager
    def _hooks_for_run(self, fwd_hooks: Sequence[tuple], layout: CODIPositions) -> Iterator[None]:
        """Check hooks against the run, add them for one call and always remove them."""
        self._check_hooks(fwd_hooks, layout)
        with self.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
            yield

    def _prepare(self, questions: Sequence[str], n_latents: int) -> tuple[Tensor, Tensor]:
        if n_latents < 0:
            raise ValueError(f"n_latents must be >= 0, got {n_latents}")
        self.ensure_thought_hooks(n_latents)
        return self.tokenize_questions(questions)

    @torch.no_grad()
    def run_codi(
        self,
        questions: Sequence[str],
        *,
        n_latents: int = DEFAULT_N_LATENTS,
        max_new_tokens: int = 256,
        fwd_hooks: Sequence[tuple] = (),
        return_logits: bool = False,
    ) -> CODIResult:
        """Run CODI inference exactly as upstream ``test.py`` does, batch-invariantly.

        Sequence: ``[question..., BOT, z_1..z_n, EOT, answer...]`` with ``z_1 = prj(h_0)``,
        ``z_{k+1} = prj(h_k)``, greedy decoding excluding only the EOT id, stopping at EOS.

        Args:
            questions: raw question strings (cleaned with upstream's rule), at least one.
            n_latents: number of fed-back continuous thoughts (6 in CODI; 0 runs BOT, EOT, answer).
            max_new_tokens: answer-token budget (upstream: 256).
            fwd_hooks: ``(name, fn)`` pairs (TransformerLens names at any layer, or thought hooks;
                names may also be predicates) applied throughout the loop and removed afterwards.
                Activations a hook sees cover the current chunk; ``model.chunk_context`` gives their
                positions (see :class:`codi_lens.hooks.PositionalHook`). A hook on a thought or
                position this run does not reach raises :class:`~codi_lens.hooks.PositionError`.
            return_logits: also return every step's logits (memory: steps x d_vocab per example).
        """
        return self._run(questions, n_latents, max_new_tokens, fwd_hooks, return_logits, prompt_logits="last")

    def _run(self, questions, n_latents, max_new_tokens, fwd_hooks, return_logits, prompt_logits) -> CODIResult:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, mask = self._prepare(questions, n_latents)
        layout = self._layout(mask, n_latents, [max_new_tokens] * len(questions))
        with self._hooks_for_run(fwd_hooks, layout):
            state = self._run_latents(tokens, mask, layout, keep_logits=return_logits, prompt_logits=prompt_logits)
            answers = self._greedy_decode(state, max_new_tokens, return_logits)
        return self._result(state, answers, return_logits)

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
        layout = CODIPositions(
            (width - mask.sum(1)).tolist(), width, [], width, width, [max_new_tokens] * len(questions)
        )
        state = self._new_state(len(questions), layout)
        _, logits = self.forward_embeds(self.token_embeds(tokens), mask, state.kv_cache, layout=layout)
        answers = self._greedy_decode(state, max_new_tokens, False, first_logits=logits[:, -1])
        return self._result(state, answers, False)

    @torch.no_grad()
    def run_codi_with_cache(
        self,
        questions: Sequence[str],
        *,
        names_filter=None,
        device: str | torch.device | None = None,
        n_latents: int = DEFAULT_N_LATENTS,
        max_new_tokens: int = 256,
        fwd_hooks: Sequence[tuple] = (),
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
        (see :mod:`codi_lens.cache`).

        Args:
            names_filter: None (all hooks), a name, a list of names or a predicate on names.
            device: where cached tensors are stored (default: the model's device).
        """
        recorder = ActivationRecorder(lambda: self.chunk_context, device)
        keep = _as_name_predicate(names_filter)
        caching_hooks = [(name, recorder) for name in self.hook_names_of_run(n_latents) if keep(name)]
        result = self._run(
            questions, n_latents, max_new_tokens, [*fwd_hooks, *caching_hooks], return_logits, prompt_logits="all"
        )
        return result, ActivationCache(recorder.tensors(), self, has_batch_dim=True)

    # ------------------------------------------------------------------ teacher forcing
    def tokenize_answers(
        self, answers: Sequence[str | Sequence[int]], append_eos: bool = False
    ) -> tuple[Tensor, Tensor]:
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

    def _teacher_forced_input(self, answer_tokens: Tensor, answer_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``[EOT] + answer tokens[:-1]`` and its mask: what teacher forcing feeds after the thoughts."""
        eot = torch.full(
            (answer_tokens.shape[0], 1), self.codi_tokens.eot, dtype=torch.long, device=answer_tokens.device
        )
        fed = torch.cat([eot, answer_tokens[:, :-1]], dim=1)
        return fed, torch.cat([torch.ones_like(eot), answer_mask[:, :-1]], dim=1)

    @torch.no_grad()
    def score_answers(
        self,
        questions: Sequence[str],
        answers: Sequence[str | Sequence[int]],
        *,
        n_latents: int = DEFAULT_N_LATENTS,
        fwd_hooks: Sequence[tuple] = (),
        append_eos: bool = False,
    ) -> AnswerScores:
        """Teacher-forced logits at every answer token, after running the real latent loop.

        Feeds ``[EOT] + answer tokens`` in one pass under the latent loop's KV cache; row j of the
        logits predicts answer token j. ``answers`` are strings (tokenized without special tokens)
        or token-id lists (e.g. a generation's ``answer_tokens``). Use it for KL and logit-difference
        metrics (e.g. at the first answer-number token of ``"The answer is: 18"``).
        """
        if isinstance(answers, str) or len(questions) != len(answers):
            raise ValueError(f"give one answer per question ({len(questions)} questions)")
        tokens, mask = self._prepare(questions, n_latents)
        answer_tokens, answer_mask = self.tokenize_answers(answers, append_eos)
        layout = self._layout(mask, n_latents, answer_mask.sum(1).tolist())
        fed, fed_mask = self._teacher_forced_input(answer_tokens, answer_mask)
        with self._hooks_for_run(fwd_hooks, layout):
            state = self._run_latents(tokens, mask, layout, keep_logits=False)
            _, logits = self.forward_embeds(
                self.token_embeds(fed), fed_mask, state.kv_cache, layout=layout, logits_at="all"
            )
        batch, like = len(questions), state.kv_cache[0].past_keys
        return AnswerScores(
            logits=logits,
            answer_tokens=answer_tokens,
            answer_mask=answer_mask,
            latent_states=_stack_steps(state.latent_states, batch, self.cfg.d_model, like),
            thought_embeds=_stack_steps(state.thought_embeds, batch, self.cfg.d_model, like),
            positions=layout,
        )


def _keep_rows(kv_cache: TransformerLensKeyValueCache, rows: Int[Tensor, " n_kept"]) -> None:
    """Keep only ``rows`` of a KV cache (keys, values and attention mask), in that order."""
    for entry in kv_cache.entries:
        entry.past_keys = entry.past_keys[rows]
        entry.past_values = entry.past_values[rows]
    kv_cache.previous_attention_mask = kv_cache.previous_attention_mask[
        rows.to(kv_cache.previous_attention_mask.device)
    ]


def _check_questions(questions: Sequence[str]) -> None:
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not a single string")
    if len(questions) == 0:
        raise ValueError("questions is empty: give at least one question")
    bad = [i for i, q in enumerate(questions) if not isinstance(q, str)]
    if bad:
        raise TypeError(f"questions must be strings; item {bad[0]} is {type(questions[bad[0]]).__name__}")


def _as_name_predicate(names_filter):
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    allowed = set(names_filter)
    return lambda name: name in allowed
