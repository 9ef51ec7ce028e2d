"""CODI training (Shen et al. 2025) for any HF causal LM, LoRA optional.

One model plays both roles:

- **teacher**: ``[question, CoT, "The answer is: N", eos]`` with cross-entropy on CoT + answer;
- **student**: ``[question, BOT] + n latents + [EOT, "The answer is: N", eos]`` with cross-entropy on
  the answer part; latents are ``z_{k+1} = prj(h_k)`` fed back as input embeddings (gradients flow
  through the whole loop);
- **distillation**: SmoothL1 between the student's and the (detached) teacher's hidden states of every
  layer at the token just before the answer number, each divided by the teacher's std, averaged over
  layers.

``loss = w_student * CE_student + beta * distill + w_teacher * CE_teacher``, plus, when
``chain_distill_weight`` is set (not upstream), ``chain_distill_weight * chain``: thought ``j``'s states
pulled toward the teacher's at the position that predicts its ``j``-th intermediate result
(:func:`chain_loss`). Training runs a fixed
step budget with a seeded data order, so a run reproduces; :class:`Trainer` checkpoints model,
optimiser, scheduler and step, and resumes identically. The model is kept in upstream's module layout
(``codi`` + ``prj``) so :func:`export_codi` writes the upstream on-disk format.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from codi_lens.answers import clean_question
from codi_lens.architectures import N_CODI_TOKENS, architecture_from_config
from codi_lens.checkpoint import TensorInfo, validate_checkpoint
from codi_lens.data import Problem
from codi_lens.loading import model_from_tensors
from codi_lens.model import CODIModel
from codi_lens.padding import pad_rows

ANSWER_PREFIX = "The answer is:"
#: Config fields that do not change what is computed (a resume may change them). The thread count
#: can change float rounding: a run resumed with another one matches to rounding, not bit for bit.
BOOKKEEPING_FIELDS = ("threads", "val_every", "val_size", "checkpoint_every", "device")


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved with every checkpoint)."""

    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    n_latents: int = 6
    prj_dim: int = 256
    prj_layernorm: bool = True
    #: Start the projection's LayerNorm gain at the token embeddings' std, so a fed-back thought has
    #: the scale of a token embedding (a from-scratch model's embeddings are ~50x smaller than a
    #: unit-variance LayerNorm output). Only changes the initialisation.
    prj_gain_matches_embeddings: bool = False
    #: Amplitude of the Fourier code written into the number tokens' embeddings at initialisation (0:
    #: off; see ``fourier_number_embeddings``). Only changes the initialisation.
    number_fourier_scale: float = 0.0
    distill_weight: float = 20.0
    student_weight: float = 1.0
    teacher_weight: float = 1.0
    distill_div_std: bool = True
    #: Standardise the states by the teacher's std before the SmoothL1 (see ``distillation_loss``).
    distill_standardise: bool = False
    #: Weight of the *chain distillation* (0: off, upstream's objective): thought ``j``'s states (every
    #: layer after the embeddings) are pulled toward the teacher's states at the position that predicts
    #: intermediate result ``j`` of its chain. See ``chain_loss``.
    chain_distill_weight: float = 0.0
    #: Weight of the *chain logit distillation* (0: off): KL from the teacher's next-token distribution
    #: at the position that predicts intermediate result ``j`` to thought ``j``'s own (its last state
    #: through the unembedding), so that the thought's logit lens reads result ``j``. See
    #: ``chain_logit_loss``.
    chain_logit_weight: float = 0.0
    #: Give the chain losses a target for every thought: a thought past a problem's last result is
    #: paired with the teacher's position that predicts the answer number (the chain's value is carried
    #: to the last thought). Off: such thoughts are left free.
    chain_carry_answer: bool = False
    drop_last_cot_step: bool = True
    #: The teacher's chain: ``"equations"`` (GSM8k-Aug: the ``<<...>>`` spans only, upstream),
    #: ``"solution"`` (the solution's text before its ``####`` line, words between spans included) or
    #: ``"results"`` (that text with each span replaced by its result). See ``teacher_chain``.
    cot_text: str = "equations"
    use_teacher: bool = True
    #: Split each batch into this many micro-batches of similar length (gradient accumulation), so
    #: less compute goes into padding. Each micro-batch's losses are token/element means over that
    #: micro-batch and the distillation std is the micro-batch's, so with more than 1 the objective
    #: is close to, not identical with, the whole batch's. 1 keeps the original computation.
    micro_batches: int = 1
    val_every: int = 150
    val_size: int = 200
    checkpoint_every: int = 150
    threads: int = 2
    #: Where training runs ("cpu", "cuda", "cuda:1"); bookkeeping, so a run may resume elsewhere.
    device: str = "cpu"
    #: "float32", or "bfloat16": mixed precision (fp32 weights and optimizer, bf16 autocast).
    dtype: str = "float32"


class CODIModule(nn.Module):
    """Upstream's training module: ``codi`` (the LM, vocab V + 3) and ``prj`` (projection head).

    Its ``state_dict()`` is exactly upstream's checkpoint layout.
    """

    def __init__(self, lm: nn.Module, prj_dim: int, prj_layernorm: bool = True, gain_matches_embeddings: bool = False):
        super().__init__()
        d = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.codi = lm
        self.prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d, prj_dim), nn.GELU(), nn.Linear(prj_dim, d))
        if prj_layernorm:
            self.prj.add_module("ln", nn.LayerNorm(d))
            if gain_matches_embeddings:
                with torch.no_grad():
                    self.prj.ln.weight.fill_(lm.get_input_embeddings().weight.std().item())

    @property
    def base_lm(self) -> nn.Module:
        return self.codi.get_base_model() if hasattr(self.codi, "get_base_model") else self.codi


#: Periods (in units of the number) of the Fourier code of ``fourier_number_embeddings``: parity, the
#: decimal digits' periods and slower ones that tell every value 0..63 apart.
NUMBER_PERIODS = (2.0, 5.0, 10.0, 16.0, 32.0, 64.0)


def fourier_number_embeddings(
    lm: nn.Module, token_ids: list[int], values: list[int], scale: float, periods: tuple[float, ...] = NUMBER_PERIODS
) -> None:
    """Add a Fourier code of each number's value to its token embedding, in place.

    Token ``token_ids[i]`` (the number ``values[i]``) gets ``scale * [cos(2 pi v / T), sin(2 pi v / T)]``
    for every period ``T`` in ``periods``, on the first ``2 * len(periods)`` embedding dimensions,
    on top of its random initialisation. With tied embeddings the unembedding gets the same code, so
    ``v + x`` is a rotation of the code of ``v`` (which a gated MLP can compute) and the logit of the
    result peaks where every period agrees. Pretrained LLMs read numbers this way; here it is only a
    starting point and trains freely.
    """
    weight = lm.get_input_embeddings().weight
    if 2 * len(periods) > weight.shape[1]:
        raise ValueError(f"{len(periods)} periods need {2 * len(periods)} dimensions; d_model is {weight.shape[1]}")
    angles = 2 * math.pi * torch.tensor(values, dtype=torch.float64)[:, None] / torch.tensor(periods)[None, :]
    code = torch.cat([angles.cos(), angles.sin()], dim=1).to(weight.dtype)
    with torch.no_grad():
        weight[torch.tensor(token_ids), : code.shape[1]] += scale * code


def add_codi_tokens(lm: nn.Module) -> int:
    """Grow the vocabulary by pad/bot/eot (rows V, V+1, V+2); returns the base vocabulary size V."""
    base_vocab = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(base_vocab + N_CODI_TOKENS, mean_resizing=False)
    return base_vocab


# ---------------------------------------------------------------------------------------- batches
@dataclass
class CODIBatch:
    """Tensors for one training step (see module docstring for the three sequences)."""

    teacher_ids: Int[Tensor, "batch t_pos"]
    teacher_mask: Int[Tensor, "batch t_pos"]
    teacher_labels: Int[Tensor, "batch t_pos"]
    teacher_distill_pos: Int[Tensor, " batch"]
    prompt_ids: Int[Tensor, "batch q_pos"]  # question + BOT, left-padded
    prompt_mask: Int[Tensor, "batch q_pos"]
    answer_ids: Int[Tensor, "batch a_pos"]  # EOT + answer + eos (inputs), right-padded
    answer_mask: Int[Tensor, "batch a_pos"]
    answer_labels: Int[Tensor, "batch a_pos"]
    student_distill_pos: Int[Tensor, " batch"]  # index within the answer chunk
    #: Teacher position that predicts intermediate result ``j`` (column ``j-1``; see ``result_positions``),
    #: -1 past a problem's last result.
    teacher_result_pos: Int[Tensor, "batch n_results"] | None = None


#: A calculator span ``<<expression=result>>``; group 1 is the result.
CALC_SPAN = re.compile(r"<<[^=>]*=([^>]*)>>")
#: The forms of the teacher's chain (:func:`teacher_chain`).
COT_TEXTS = ("equations", "solution", "results")


def teacher_chain(
    problem: Problem, drop_last_cot_step: bool = True, cot_text: str = "equations"
) -> tuple[str, list[int]]:
    """The chain the teacher writes, and the character offset in it where each intermediate result
    starts.

    ``cot_text``: ``"equations"`` (``problem.cot``, the ``<<...>>`` spans only; upstream drops the last
    one, ``drop_last_cot_step``), ``"solution"`` (the solution's text before its ``####`` line) or
    ``"results"`` (that text with each span replaced by its result: ``Monday <<5+7=12>> Tuesday
    <<12*3=36>>`` becomes ``Monday 12 Tuesday 36``; meant for chains written as spans, like the
    synthetic ones). The last two keep every step.
    """
    if cot_text not in COT_TEXTS:
        raise ValueError(f"cot_text must be one of {COT_TEXTS}, got {cot_text!r}")
    if cot_text == "equations":
        steps = problem.cot.split()
        text = " ".join(steps[:-1] if drop_last_cot_step else steps)
        return text, [m.start(1) for m in CALC_SPAN.finditer(text)]
    if drop_last_cot_step:
        raise ValueError(f"drop_last_cot_step needs cot_text='equations' (cot_text={cot_text!r} keeps every step)")
    text = problem.solution.rsplit("####", 1)[0].strip()
    if cot_text == "solution":
        return text, [m.start(1) for m in CALC_SPAN.finditer(text)]
    pieces, offsets, length, last = [], [], 0, 0
    for m in CALC_SPAN.finditer(text):
        before = text[last : m.start()]
        offsets.append(length + len(before))
        pieces += [before, m.group(1)]
        length += len(before) + len(m.group(1))
        last = m.end()
    return "".join(pieces) + text[last:], offsets


def result_positions(chain: str, offsets: list[int], tokenizer) -> list[int]:
    """Token index, within the tokenized ``chain``, of the position that predicts each result (the
    token before it: the ``=`` of an equation, or the word before a bare result).

    Each index is the length of the tokenized text before the result (trailing spaces dropped), less
    one: exact for tokenizers that do not merge a result with what precedes it (word-level, GPT-2 and
    LLaMA-3 BPE, where a space-led number is its own token).
    """
    return [len(tokenizer(chain[:at].rstrip(), add_special_tokens=False)["input_ids"]) - 1 for at in offsets]


def make_batch(
    problems: list[Problem],
    tokenizer,
    base_vocab: int,
    drop_last_cot_step: bool = True,
    cot_text: str = "equations",
) -> CODIBatch:
    """Tokenize problems (GSM8K or synthetic; see :class:`codi_lens.data.Problem`) into a CODIBatch
    (the teacher's chain from :func:`teacher_chain`)."""
    pad, bot, eot, eos = base_vocab, base_vocab + 1, base_vocab + 2, tokenizer.eos_token_id
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    teacher, t_labels, t_pos, prompts, answers, a_labels, s_pos, result_pos = [], [], [], [], [], [], [], []
    for p in problems:
        question = tokenizer(clean_question(p.question))["input_ids"]
        chain, offsets = teacher_chain(p, drop_last_cot_step, cot_text)
        cot = enc(chain)
        result_pos.append([len(question) + i for i in result_positions(chain, offsets, tokenizer)])
        prefix, number = enc(ANSWER_PREFIX), enc(f" {p.answer_value}")
        target = cot + prefix + number + [eos]
        teacher.append(question + target)
        t_labels.append([-100] * len(question) + target)
        t_pos.append(len(question) + len(cot) + len(prefix) - 1)
        prompts.append(question + [bot])
        answers.append([eot] + prefix + number)
        a_labels.append(prefix + number + [eos])
        s_pos.append(len(prefix))  # [eot] + prefix: the last prefix token
    teacher_ids, teacher_mask = pad_rows(teacher, pad, side="right")
    teacher_labels, _ = pad_rows(t_labels, -100, side="right")
    prompt_ids, prompt_mask = pad_rows(prompts, pad, side="left")
    answer_ids, answer_mask = pad_rows(answers, pad, side="right")
    answer_labels, _ = pad_rows(a_labels, -100, side="right")
    return CODIBatch(
        teacher_ids,
        teacher_mask,
        teacher_labels,
        torch.tensor(t_pos),
        prompt_ids,
        prompt_mask,
        answer_ids,
        answer_mask,
        answer_labels,
        torch.tensor(s_pos),
        pad_rows([row or [-1] for row in result_pos], -1, side="right")[0],
    )


# ---------------------------------------------------------------------------------------- losses
def _lm_step(lm, embeds, mask, positions, cache):
    return lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
    )


def student_forward(model: CODIModule, batch: CODIBatch, n_latents: int):
    """The student pass: prompt, ``n_latents`` fed-back thoughts, then the answer chunk.

    Returns ``(answer_logits [batch, a_pos, vocab], hidden_states, thought_states)``: the answer
    chunk's states, a tuple over layers (embeddings first) of ``[batch, a_pos, d]``, and the thoughts'
    states, a tuple over the same layers of ``[batch, n_latents, d]`` (thought ``j`` in column ``j-1``).
    """
    from transformers import DynamicCache

    lm, embed = model.codi, model.codi.get_input_embeddings()
    mask = batch.prompt_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = _lm_step(lm, embed(batch.prompt_ids), mask, positions, cache)
    h = out.hidden_states[-1][:, -1]
    next_pos = positions[:, -1:] + 1
    ones = torch.ones_like(next_pos)
    thought_states = []
    for _ in range(n_latents):
        mask = torch.cat([mask, ones], dim=1)
        out = _lm_step(lm, model.prj(h)[:, None], mask, next_pos, cache)
        h = out.hidden_states[-1][:, -1]
        thought_states.append(out.hidden_states)
        next_pos = next_pos + 1
    mask = torch.cat([mask, batch.answer_mask], dim=1)
    answer_pos = next_pos + torch.arange(batch.answer_ids.shape[1], device=next_pos.device)[None]
    out = _lm_step(lm, embed(batch.answer_ids), mask, answer_pos, cache)
    by_layer = tuple(torch.cat(layer, dim=1) for layer in zip(*thought_states)) if thought_states else ()
    return out.logits, out.hidden_states, by_layer


def _gather(states: Float[Tensor, "batch pos d"], index: Int[Tensor, " batch"]) -> Float[Tensor, "batch d"]:
    return states[torch.arange(states.shape[0], device=states.device), index]


def distillation_loss(
    student_states, teacher_states, s_pos, t_pos, div_std: bool = True, standardise: bool = False
) -> Tensor:
    """Mean over layers of SmoothL1(student, teacher.detach()) / teacher std, at the given positions.

    ``standardise=True`` divides both states by the teacher's std *before* the SmoothL1 instead of
    dividing the loss after it. Upstream's form is scale-dependent (SmoothL1 is quadratic for small
    differences), so on a from-scratch model whose states are ~0.02 in size it is ~1e-4 and does
    nothing; the standardised form measures the gap in units of the teacher's spread at any scale.
    """
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        s_sel, t_sel = _gather(s, s_pos), _gather(t, t_pos).detach()
        if standardise:
            sigma = t_sel.std().clamp_min(1e-6)
            term = F.smooth_l1_loss(s_sel / sigma, t_sel / sigma)
        else:
            term = F.smooth_l1_loss(s_sel, t_sel)
            term = term / t_sel.std() if div_std else term
        total = total + term
    return total / len(student_states)


def chain_loss(thought_states, teacher_states, result_pos: Int[Tensor, "batch n_results"]) -> Tensor:
    """Mean over layers (embeddings excluded) of SmoothL1 between thought ``j``'s states and the
    teacher's (detached) states at the position that predicts its result ``j`` (``result_pos``, see
    :func:`result_positions`), both divided by the teacher's std.

    Pairs exist for ``j <= min(n_results, n_latents)``; a thought past a problem's last result is left
    free. The embedding layer is left out: it would pull every fed-back thought toward the embedding
    of the token before a result. The standardised form is used because the from-scratch model's
    states are small (see :func:`distillation_loss`).
    """
    n = min(result_pos.shape[1], thought_states[0].shape[1])
    rows, steps = torch.nonzero(result_pos[:, :n] >= 0, as_tuple=True)
    if rows.numel() == 0:
        return thought_states[0].sum() * 0.0
    cols = result_pos[rows, steps]
    total = 0.0
    for s, t in zip(thought_states[1:], teacher_states[1:]):
        target = t[rows, cols].detach()
        sigma = target.std().clamp_min(1e-6)
        total = total + F.smooth_l1_loss(s[rows, steps] / sigma, target / sigma)
    return total / (len(thought_states) - 1)


def chain_logit_loss(
    thought_logits: Float[Tensor, "batch n_latents vocab"],
    teacher_logits: Float[Tensor, "batch t_pos vocab"],
    result_pos: Int[Tensor, "batch n_results"],
) -> Tensor:
    """Mean over (problem, thought) pairs of KL(teacher || thought): the teacher's (detached)
    next-token distribution at the position that predicts its result ``j`` against thought ``j``'s.

    Pairs as in :func:`chain_loss` (``result_pos`` column ``j-1`` for thought ``j``, -1: no pair).
    """
    n = min(result_pos.shape[1], thought_logits.shape[1])
    rows, steps = torch.nonzero(result_pos[:, :n] >= 0, as_tuple=True)
    if rows.numel() == 0:
        return thought_logits.sum() * 0.0
    target = F.log_softmax(teacher_logits[rows, result_pos[rows, steps]].detach().float(), dim=-1)
    student = F.log_softmax(thought_logits[rows, steps].float(), dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def chain_targets(
    result_pos: Int[Tensor, "batch n_results"], answer_pos: Int[Tensor, " batch"], n_latents: int, carry_answer: bool
) -> Int[Tensor, "batch n_latents"]:
    """The teacher position each thought is distilled toward: result ``j``'s for thought ``j``; past a
    problem's last result, the position that predicts the answer number (``carry_answer``) or -1."""
    targets = torch.full((result_pos.shape[0], n_latents), -1, dtype=result_pos.dtype, device=result_pos.device)
    n = min(n_latents, result_pos.shape[1])
    targets[:, :n] = result_pos[:, :n]
    if carry_answer:
        targets = torch.where(targets < 0, answer_pos[:, None].to(targets.dtype), targets)
    return targets


def codi_losses(model: CODIModule, batch: CODIBatch, cfg: TrainConfig) -> dict[str, Tensor]:
    """The three CODI losses and their weighted sum (``loss``)."""
    logits, s_states, thought_states = student_forward(model, batch, cfg.n_latents)
    ce_student = F.cross_entropy(logits.flatten(0, 1).float(), batch.answer_labels.flatten(), ignore_index=-100)
    losses = {"ce_student": ce_student}
    if cfg.use_teacher:
        t_out = model.codi(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask, output_hidden_states=True)
        t_logits = t_out.logits[:, :-1].flatten(0, 1).float()
        losses["ce_teacher"] = F.cross_entropy(t_logits, batch.teacher_labels[:, 1:].flatten(), ignore_index=-100)
        losses["distill"] = distillation_loss(
            s_states,
            t_out.hidden_states,
            batch.student_distill_pos,
            batch.teacher_distill_pos,
            cfg.distill_div_std,
            cfg.distill_standardise,
        )
        losses["loss"] = (
            cfg.student_weight * ce_student
            + cfg.distill_weight * losses["distill"]
            + cfg.teacher_weight * losses["ce_teacher"]
        )
        if (cfg.chain_distill_weight or cfg.chain_logit_weight) and cfg.n_latents:
            targets = chain_targets(
                batch.teacher_result_pos, batch.teacher_distill_pos, cfg.n_latents, cfg.chain_carry_answer
            )
        if cfg.chain_distill_weight and cfg.n_latents:
            losses["chain"] = chain_loss(thought_states, t_out.hidden_states, targets)
            losses["loss"] = losses["loss"] + cfg.chain_distill_weight * losses["chain"]
        if cfg.chain_logit_weight and cfg.n_latents:
            thought_logits = model.codi.get_output_embeddings()(thought_states[-1])
            losses["chain_logits"] = chain_logit_loss(thought_logits, t_out.logits, targets)
            losses["loss"] = losses["loss"] + cfg.chain_logit_weight * losses["chain_logits"]
    else:
        losses["loss"] = cfg.student_weight * ce_student
    return losses


# ---------------------------------------------------------------------------------------- export
def export_codi(model: CODIModule, tokenizer, out_dir: str | Path) -> Path:
    """Write the upstream layout: ``model.safetensors`` (whole state dict), base ``config.json``
    (vocabulary V, without the 3 CODI rows) and the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    config = model.base_lm.config.to_dict()
    config["vocab_size"] = config["vocab_size"] - N_CODI_TOKENS
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir / "model.safetensors"


def to_codi_model(model: CODIModule, tokenizer) -> CODIModel:
    """A hooked :class:`codi_lens.CODIModel` with the module's current weights (for validation)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    config = model.base_lm.config.to_dict()
    config["vocab_size"] -= N_CODI_TOKENS
    arch = architecture_from_config(config, "training state")
    info = {k: TensorInfo(tuple(v.shape), str(v.dtype)) for k, v in state.items()}
    layout = validate_checkpoint(info, arch, path="training state")
    return model_from_tensors(state, layout, arch, tokenizer)


def build_llama_lm(
    vocab_size: int,
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 512,
    max_positions: int = 512,
    seed: int = 0,
) -> nn.Module:
    """A small LLaMA-architecture causal LM (RMSNorm, rope, GQA, tied embeddings) from scratch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def batch_to(batch: CODIBatch, device: str | torch.device) -> CODIBatch:
    """The batch with every tensor on ``device``."""
    return CODIBatch(**{k: None if v is None else v.to(device) for k, v in vars(batch).items()})


# ---------------------------------------------------------------------------------------- trainer
@dataclass
class Trainer:
    """Fixed-budget CODI training with periodic validation and exact resume.

    ``train_problems`` / ``val_problems`` are :class:`codi_lens.data.Problem` records (GSM8K or
    synthetic). ``workdir`` receives ``train_state.pt``
    (resume point), ``log.jsonl`` (losses and validation accuracy) and, at the end, the export.
    """

    model: CODIModule
    tokenizer: Any
    base_vocab: int
    cfg: TrainConfig
    train_problems: list[Problem]
    val_problems: list[Problem] = field(default_factory=list)
    workdir: Path | None = None
    step: int = 0
    #: Training wall time summed over every invocation (resumes included), seconds.
    wall_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.cfg.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.cfg.dtype!r}: choose float32 or bfloat16")
        self.model.to(self.cfg.device)
        if len(self.train_problems) < self.cfg.batch_size:
            raise ValueError(
                f"{len(self.train_problems)} training problems cannot fill one batch of {self.cfg.batch_size}; "
                "lower batch_size or give more problems"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if self.workdir is not None:
            self.workdir = Path(self.workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        progress = (step - self.cfg.warmup_steps) / max(1, self.cfg.steps - self.cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def batch_indices(self, step: int) -> list[int]:
        """The problems of ``step``: a seeded permutation per epoch, so the order depends only on the seed."""
        n, bs = len(self.train_problems), self.cfg.batch_size
        per_epoch = n // bs
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        return order[offset * bs : (offset + 1) * bs].tolist()

    def micro_batches(self, step: int) -> list[tuple[CODIBatch, float]]:
        """The step's problems sorted by length and cut into ``cfg.micro_batches`` batches, each
        with its share of the step's problems (the weight of its loss)."""
        problems = [self.train_problems[i] for i in self.batch_indices(step)]
        if self.cfg.micro_batches > 1:
            problems = sorted(problems, key=lambda p: len(p.question) + len(p.cot))
        bounds = torch.linspace(0, len(problems), self.cfg.micro_batches + 1).round().long().tolist()
        groups = [problems[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
        return [
            (
                make_batch(g, self.tokenizer, self.base_vocab, self.cfg.drop_last_cot_step, self.cfg.cot_text),
                len(g) / len(problems),
            )
            for g in groups
        ]

    def train_step(self) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        autocast = torch.autocast(
            torch.device(self.cfg.device).type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16"
        )
        for batch, share in self.micro_batches(self.step):
            with autocast:
                losses = codi_losses(self.model, batch_to(batch, self.cfg.device), self.cfg)
            (losses["loss"] * share).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() * share
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return totals

    def validate(self) -> float:
        """Greedy CODI-loop accuracy on the first ``val_size`` validation problems (hooked model)."""
        model = to_codi_model(self.model, self.tokenizer)
        problems = self.val_problems[: self.cfg.val_size]
        correct = 0
        for start in range(0, len(problems), 100):
            chunk = problems[start : start + 100]
            result = model.run_codi([p.question for p in chunk], n_latents=self.cfg.n_latents, max_new_tokens=12)
            correct += sum(pred == p.answer_value for pred, p in zip(result.prediction, chunk))
        return correct / max(1, len(problems))

    # -- checkpoints
    def save_state(self) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "config": asdict(self.cfg),
                "wall_seconds": self.wall_seconds,
                # Plain tensors, so that a weights_only load restores them (the data order needs no
                # state: it is a function of the seed and the step).
                "torch_rng": torch.get_rng_state(),
            },
            self.workdir / "train_state.pt.tmp",
        )
        (self.workdir / "train_state.pt.tmp").replace(self.workdir / "train_state.pt")

    def load_state(self) -> bool:
        """Resume from ``workdir/train_state.pt`` if present; returns whether it did."""
        path = None if self.workdir is None else self.workdir / "train_state.pt"
        if path is None or not path.exists():
            return False
        state = torch.load(path, weights_only=True, map_location="cpu")
        saved, current = (
            {k: v for k, v in config.items() if k not in BOOKKEEPING_FIELDS}
            for config in ({"micro_batches": 1, "dtype": "float32", **state["config"]}, asdict(self.cfg))  # older
        )
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"{path} was written with a different config ({', '.join(changed)}); use a fresh workdir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.wall_seconds = state.get("wall_seconds", 0.0)
        if "torch_rng" in state:  # older states did not keep it
            torch.set_rng_state(state["torch_rng"])
        return True

    def _log(self, record: dict) -> None:
        if self.workdir is not None:
            with open(self.workdir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, progress: bool = True, stop_at: int | None = None) -> dict[str, float]:
        """Train until ``cfg.steps`` (resuming if a state exists); returns the last losses.

        ``stop_at`` ends the call early at that step (the schedule still follows ``cfg.steps``), as a
        kill would; a later ``fit`` resumes from the last checkpoint.
        """
        torch.set_num_threads(self.cfg.threads)
        self.load_state()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="CODI training", disable=not progress)
        last: dict[str, float] = {}
        start = time.perf_counter()
        while self.step < min(self.cfg.steps, stop_at or self.cfg.steps):
            tick = time.perf_counter()
            last = self.train_step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
            record: dict[str, Any] = {"step": self.step, **last, "elapsed_s": round(time.perf_counter() - start, 1)}
            if self.val_problems and (self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps):
                record["val_accuracy"] = self.validate()
                bar.write(f"step {self.step}: validation accuracy {record['val_accuracy']:.3f}")
            self.wall_seconds += time.perf_counter() - tick
            record["wall_seconds"] = round(self.wall_seconds, 1)
            self._log(record)
            if self.workdir is not None and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps):
                self.save_state()
        bar.close()
        if self.workdir is not None and self.step < self.cfg.steps:
            self.save_state()  # stopped early on purpose: keep every finished step
        return last
