"""The hooked CODI model: a TransformerLens model plus the projection head and the latent loop.

:class:`CODIModel` subclasses SAELens' ``HookedSAETransformer`` (hence ``HookedTransformer``), so
every TransformerLens hook, ``run_with_hooks``, ``ActivationCache`` and SAE splicing works as usual.
On top it adds the projection head (``prj``), one set of hook points per continuous-thought step
(see :mod:`codi_lens.hooks` for names and the position convention) and the exact CODI inference
loop (:meth:`CODIModel.run_codi`), which runs under a TransformerLens KV cache with left padding,
attention masks and per-example position ids so a batch gives the same result as one question.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint

from codi_lens.answers import clean_question, extract_prediction
from codi_lens.hooks import position_axis

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
class CODIPositions:
    """Absolute positions in the left-padded CODI sequence (shared by the whole batch).

    Attributes:
        n_pad: left-padding tokens before each example's question, ``[batch]``.
        bot: position of BOT. ``thoughts[k-1]`` is thought k. ``eot``: position of EOT.
        answer_start: position fed the first answer token (the logits predicting answer token j
            come from position ``eot + j``).
        answer_lengths: answer tokens per example (generated or teacher-forced).
    """

    n_pad: list[int]
    bot: int
    thoughts: list[int]
    eot: int
    answer_start: int
    answer_lengths: list[int]

    def for_example(self, i: int) -> dict[str, object]:
        """Named positions of example ``i``: question span, bot, thought_1.., eot, answer tokens."""
        named: dict[str, object] = {"question": list(range(self.n_pad[i], self.bot)), "bot": self.bot}
        named.update({f"thought_{k}": p for k, p in enumerate(self.thoughts, start=1)})
        named["eot"] = self.eot
        named["answer"] = list(range(self.answer_start, self.answer_start + self.answer_lengths[i]))
        return named


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
    latent_states: list[Tensor] = field(default_factory=list)
    thought_embeds: list[Tensor] = field(default_factory=list)
    step_logits: list[Tensor] = field(default_factory=list)


class CODIModel(HookedSAETransformer):
    """A CODI model as a TransformerLens ``HookedTransformer`` with thought hooks and the CODI loop.

    Build it with :func:`codi_lens.load_codi`; the constructor only creates the (empty) modules.
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
    ):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.codi_tokens = tokens
        self.prj = ProjectionHead(cfg.d_model, prj_dim, layernorm=prj_layernorm)
        self.thought = nn.ModuleList([ThoughtStep() for _ in range(n_thought_hooks + 1)])
        self.prj.to(device=cfg.device, dtype=cfg.dtype)
        #: Absolute positions of the chunk being computed (read by position-aware hooks).
        self.current_positions: Int[Tensor, " pos"] = torch.zeros(0, dtype=torch.long)
        #: Counts forward chunks, so a cache can tell chunks apart (a hook may fire several times per chunk).
        self.chunk_index = 0
        #: Unembed every prompt position (not only the last); set while caching whole sequences.
        self.logits_for_all_prompt_positions = False
        self.setup()

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
        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings, not a single string")
        ids = [self.tokenizer(clean_question(q))["input_ids"] for q in questions]
        width = max(len(x) for x in ids)
        tokens = torch.full((len(ids), width), self.codi_tokens.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, width - len(x) :] = torch.as_tensor(x, dtype=torch.long)
            mask[i, width - len(x) :] = 1
        return tokens.to(self.cfg.device), mask.to(self.cfg.device)

    def token_embeds(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Input embeddings of token ids (rows of ``W_E``, including the BOT/EOT rows)."""
        return self.embed(tokens.to(self.cfg.device))

    # ------------------------------------------------------------------ one chunk under a KV cache
    def forward_embeds(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        kv_cache: TransformerLensKeyValueCache | None = None,
        *,
        logits_at: str = "last",
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch n d_vocab"] | None]:
        """Run the transformer on input embeddings, appending to ``kv_cache`` if given.

        Every input goes through ``hook_embed`` (and ``hook_pos_embed`` for GPT-2) exactly as token
        embeddings do, so caches cover thought positions too. Positions and padding come from the
        attention mask (left padding is ignored by attention and does not shift positions).

        Returns ``(final, logits)``: ``final`` is the post-final-norm residual (with the gain)
        ``[batch, pos, d_model]``; ``logits`` is ``[batch, 1, d_vocab]`` for ``logits_at="last"``,
        ``[batch, pos, d_vocab]`` for ``"all"``, or None for ``"none"``.
        """
        n_past = 0 if kv_cache is None else kv_cache.previous_attention_mask.shape[1]
        n_new = embeds.shape[1]
        self.current_positions = torch.arange(n_past, n_past + n_new)
        self.chunk_index += 1
        attention_mask = attention_mask.to(self.cfg.device)
        full_mask = attention_mask if kv_cache is None else kv_cache.append_attention_mask(attention_mask)
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
        if logits_at == "none":
            return final, None
        return final, self.unembed(final[:, -1:] if logits_at == "last" else final)

    # ------------------------------------------------------------------ the latent loop
    def _project(self, k: int, h: Float[Tensor, "batch d_model"], state: _LatentLoopState) -> Tensor:
        """Record ``h_k`` (through its hook) and return ``prj(h_k)`` (through its hook)."""
        h = self.thought[k].hook_hidden(h)
        state.latent_states.append(h)
        return self.thought[k].hook_projection(self.prj(h))

    def _run_latents(self, tokens: Tensor, mask: Tensor, n_latents: int, keep_logits: bool) -> _LatentLoopState:
        """Question + BOT, then ``n_latents`` fed-back thoughts, under one KV cache."""
        batch = tokens.shape[0]
        state = _LatentLoopState(TransformerLensKeyValueCache.init_cache(self.cfg, self.cfg.device, batch))
        bot = torch.full((batch, 1), self.codi_tokens.bot, dtype=torch.long, device=tokens.device)
        prompt = torch.cat([tokens, bot], dim=1)
        prompt_mask = torch.cat([mask, torch.ones_like(bot)], dim=1)
        final, logits = self.forward_embeds(
            self.token_embeds(prompt),
            prompt_mask,
            state.kv_cache,
            logits_at="all" if self.logits_for_all_prompt_positions else "last",
        )
        if keep_logits:
            state.step_logits.append(logits[:, -1])
        z = self._project(0, final[:, -1], state)
        ones = torch.ones((batch, 1), dtype=torch.long, device=tokens.device)
        for k in range(1, n_latents + 1):
            fed = self.thought[k].hook_input(z)
            state.thought_embeds.append(fed)
            final, logits = self.forward_embeds(fed[:, None], ones, state.kv_cache)
            if keep_logits:
                state.step_logits.append(logits[:, -1])
            z = self._project(k, final[:, -1], state)
        return state

    def _positions(self, mask: Tensor, n_latents: int, answer_lengths: list[int]) -> CODIPositions:
        width = mask.shape[1]
        return CODIPositions(
            n_pad=(width - mask.sum(1)).tolist(),
            bot=width,
            thoughts=[width + k for k in range(1, n_latents + 1)],
            eot=width + n_latents + 1,
            answer_start=width + n_latents + 2,
            answer_lengths=answer_lengths,
        )

    def _greedy_decode(
        self,
        state: _LatentLoopState,
        batch: int,
        max_new_tokens: int,
        keep_logits: bool,
        first_logits: Tensor | None = None,
    ) -> list[list[int]]:
        """Feed EOT, then greedy tokens (argmax excluding only EOT) until EOS or the budget.

        With ``first_logits`` (``[batch, d_vocab]``), nothing is fed first: the first token is
        chosen from those logits (plain decoding after a prompt).
        """
        device = self.cfg.device
        eos, n_allowed = self.codi_tokens.eos, self.cfg.d_vocab - 1
        ones = torch.ones((batch, 1), dtype=torch.long, device=device)
        next_input = torch.full((batch, 1), self.codi_tokens.eot, dtype=torch.long, device=device)
        answers: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool)
        for step in range(max_new_tokens):
            if step == 0 and first_logits is not None:
                logits = first_logits[:, None]
            else:
                _, logits = self.forward_embeds(self.token_embeds(next_input), ones, state.kv_cache)
            if keep_logits:
                state.step_logits.append(logits[:, -1])
            chosen = logits[:, -1, :n_allowed].argmax(-1).cpu()
            for i in torch.nonzero(~finished).flatten().tolist():
                answers[i].append(int(chosen[i]))
            finished |= chosen == eos
            if bool(finished.all()):
                break
            next_input = chosen[:, None].to(device)
        return answers

    @contextmanager
    def _hooks_for_run(self, fwd_hooks):
        """Add hooks for one call and always remove them (no hook leaks into the next cell)."""
        with self.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
            yield

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
            questions: raw question strings (cleaned with upstream's rule).
            n_latents: number of fed-back continuous thoughts (6 in CODI).
            max_new_tokens: answer-token budget.
            fwd_hooks: ``(name, fn)`` pairs (TransformerLens names at any layer, or thought hooks;
                names may also be predicates) applied throughout the loop and removed afterwards.
                Activations a hook sees cover the current chunk; ``self.current_positions`` gives
                their absolute positions (see :func:`codi_lens.hooks.positional_hook`).
            return_logits: also return every step's logits (memory: steps x d_vocab per example).
        """
        self.ensure_thought_hooks(n_latents)
        tokens, mask = self.tokenize_questions(questions)
        with self._hooks_for_run(fwd_hooks):
            state = self._run_latents(tokens, mask, n_latents, return_logits)
            answers = self._greedy_decode(state, len(questions), max_new_tokens, return_logits)
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        return CODIResult(
            latent_states=torch.stack(state.latent_states, dim=1),
            thought_embeds=torch.stack(state.thought_embeds, dim=1)
            if n_latents
            else tokens.new_zeros((len(questions), 0, self.cfg.d_model), dtype=self.cfg.dtype),
            answer_tokens=answers,
            answer_text=texts,
            prediction=[extract_prediction(t) for t in texts],
            positions=self._positions(mask, n_latents, [len(a) for a in answers]),
            step_logits=torch.stack(state.step_logits, dim=1) if return_logits else None,
        )

    @torch.no_grad()
    def generate_explicit(self, questions: Sequence[str], *, max_new_tokens: int = 128) -> CODIResult:
        """Plain greedy decoding after the question, with no BOT and no thoughts.

        This is CODI's *teacher* mode: a model trained with the CODI objective also learned to write
        the explicit chain of thought (``<<a*b=c>> ... The answer is: N``). ``latent_states`` and
        ``thought_embeds`` of the result are empty; ``positions.bot`` is where the answer starts.
        """
        tokens, mask = self.tokenize_questions(questions)
        batch = len(questions)
        state = _LatentLoopState(TransformerLensKeyValueCache.init_cache(self.cfg, self.cfg.device, batch))
        _, logits = self.forward_embeds(self.token_embeds(tokens), mask, state.kv_cache)
        answers = self._greedy_decode(state, batch, max_new_tokens, False, first_logits=logits[:, -1])
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        empty = torch.zeros((batch, 0, self.cfg.d_model), dtype=self.cfg.dtype)
        width = mask.shape[1]
        return CODIResult(
            latent_states=empty,
            thought_embeds=empty,
            answer_tokens=answers,
            answer_text=texts,
            prediction=[extract_prediction(t) for t in texts],
            positions=CODIPositions((width - mask.sum(1)).tolist(), width, [], width, width, [len(a) for a in answers]),
        )

    def run_codi_with_cache(
        self,
        questions: Sequence[str],
        *,
        names_filter=None,
        device: str | torch.device | None = None,
        **run_kwargs,
    ) -> tuple[CODIResult, ActivationCache]:
        """:meth:`run_codi` plus an ``ActivationCache`` stitched across the KV-cache steps.

        Standard activations cover the whole fed sequence (question, BOT, thoughts, EOT, answer
        tokens that were fed back) along their usual position axis; attention patterns are
        ``[batch, head, query_pos, key_pos]`` over that sequence (zero where a key was not yet
        visible). Thought hooks hold ``[batch, d_model]``; ``prj.*`` hooks are stacked per step to
        ``[batch, n_latents + 1, ...]``.

        Args:
            names_filter: None (all hooks), a name, a list of names or a predicate on names.
            device: where cached tensors are stored (default: the model's device).
        """
        # name -> {chunk index -> activation}; a hook firing twice in one chunk (TransformerLens
        # calls ln1 once each for queries, keys and values) keeps its last value.
        chunks: dict[str, dict[int, Tensor]] = defaultdict(dict)
        chunk_len: dict[int, int] = {}
        keep = _as_name_predicate(names_filter)

        def store(acts: Tensor, hook: HookPoint) -> None:
            chunks[hook.name][self.chunk_index] = acts.detach().to(device or acts.device)
            chunk_len[self.chunk_index] = len(self.current_positions)

        caching_hooks = [(name, store) for name in self.hook_dict if keep(name)]
        self.logits_for_all_prompt_positions = True
        try:
            result = self.run_codi(
                questions, fwd_hooks=[*run_kwargs.pop("fwd_hooks", ()), *caching_hooks], **run_kwargs
            )
        finally:
            self.logits_for_all_prompt_positions = False
        stitched = {
            name: _stitch(name, list(parts.values()), [chunk_len[i] for i in parts]) for name, parts in chunks.items()
        }
        return result, ActivationCache(stitched, self, has_batch_dim=True)

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
        width = max(len(x) for x in ids)
        tokens = torch.full((len(ids), width), self.codi_tokens.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return tokens.to(self.cfg.device), mask.to(self.cfg.device)

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
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        self.ensure_thought_hooks(n_latents)
        tokens, mask = self.tokenize_questions(questions)
        answer_tokens, answer_mask = self.tokenize_answers(answers, append_eos)
        eot = torch.full((len(questions), 1), self.codi_tokens.eot, dtype=torch.long, device=tokens.device)
        fed = torch.cat([eot, answer_tokens[:, :-1]], dim=1)
        fed_mask = torch.cat([torch.ones_like(eot), answer_mask[:, :-1]], dim=1)
        with self._hooks_for_run(fwd_hooks):
            state = self._run_latents(tokens, mask, n_latents, keep_logits=False)
            _, logits = self.forward_embeds(self.token_embeds(fed), fed_mask, state.kv_cache, logits_at="all")
        return AnswerScores(
            logits=logits,
            answer_tokens=answer_tokens,
            answer_mask=answer_mask,
            latent_states=torch.stack(state.latent_states, dim=1),
            thought_embeds=torch.stack(state.thought_embeds, dim=1),
            positions=self._positions(mask, n_latents, answer_mask.sum(1).tolist()),
        )


def _as_name_predicate(names_filter):
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    allowed = set(names_filter)
    return lambda name: name in allowed


def _stitch(name: str, parts: list[Tensor], lengths: list[int]) -> Tensor:
    """Join one hook's per-chunk activations into whole-sequence (or per-step) tensors."""
    axis = position_axis(name)
    if axis is None:
        return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)
    if axis == 2:  # attention [batch, head, query, key]: widen keys to the full length, then join queries
        total = parts[-1].shape[-1]
        fill = float("-inf") if name.endswith("hook_attn_scores") else 0.0
        parts = [F.pad(p, (0, total - p.shape[-1]), value=fill) for p in parts]
        return torch.cat(parts, dim=2)
    # Some activations (rotated keys) cover every cached position; keep each chunk's new ones.
    return torch.cat([p.narrow(1, p.shape[1] - n, n) for p, n in zip(parts, lengths)], dim=1)
