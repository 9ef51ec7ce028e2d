"""Training batches: the teacher's chain, the student's prompt and answer, and where the losses read them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from codi_lens.core.answers import clean_question
from codi_lens.core.padding import pad_rows
from codi_lens.data.problems import Problem
from codi_lens.training.config import ANSWER_PREFIX


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


def batch_to(batch, device: str | torch.device):
    """The batch (any batch dataclass) with every tensor on ``device``; other fields as they are."""
    return type(batch)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})
