"""What sets one latent-reasoning method's loop apart from another's: :class:`LatentLoop`.

Every method codi_lens runs feeds a question, a marker token that opens the latent span (called BOT in
codi_lens, whatever its method calls it), ``n`` continuous thoughts, a marker that closes the span (EOT),
and then decodes the answer. Thought ``k``'s input is computed from ``h_{k-1}``, the post-final-norm
hidden state at the position before it (HF's ``hidden_states[-1]``). What differs:

- **feedback**: CODI sends ``h`` through its projection head (``prj``); Coconut feeds ``h`` itself.
- **markers**: CODI's BOT and EOT are rows grown on the vocabulary after its pad row (ids V + 1, V + 2;
  pad V); Coconut's are the ``<|start-latent|>`` and ``<|end-latent|>`` tokens it adds to the tokenizer
  (ids V, V + 1, with ``<|latent|>`` at V + 2, a placeholder never fed at inference) and it pads with EOS.
- **text conventions**: how a question is written before tokenizing, how an answer is written (for
  teacher forcing) and read back (for scoring), which text is fed after EOT before the answer (PCCoT's
  ``"The answer is:"``), and which ids greedy decoding may choose.
- **schedule**: ``"sequential"`` (CODI, Coconut: thought k + 1 is computed after thought k, one position at
  a time) or ``"jacobi"`` (PCCoT: all ``n`` thoughts are fed together, ``n_sweeps + 1`` times over the
  question's keys and values. Sweep 0 feeds the ``<pcot.latent>`` token's embedding at every thought;
  sweep s + 1 feeds thought 1 ``prj(h_0)`` (BOT's) and thought k + 1 the projection of sweep s's ``h_k``.
  The answer reads the keys and values of the last sweep).

The marker ids themselves live in :class:`~codi_lens.core.components.CODITokens`, set by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codi_lens.core.answers import ANSWER_TEMPLATE, NUMBER_PATTERN, clean_question, extract_prediction, write_number

Feedback = Literal["projection", "identity"]
Schedule = Literal["sequential", "jacobi"]


@dataclass(frozen=True)
class LatentLoop:
    """The specification of a latent loop.

    Attributes:
        method: the method's name (``"codi"``, ``"coconut"``), as errors and results name it.
        feedback: ``"projection"`` (thought k + 1 is fed ``prj(h_k)``) or ``"identity"`` (it is fed ``h_k``).
        n_latents: how many thoughts the method was trained with (the runs' default).
        question_suffix: text appended to each question before tokenizing (Coconut: a newline).
        clean_questions: whether questions are first ``strip()``-ed and double spaces collapsed (CODI).
        answer_template: how the method writes an answer number (``{}`` is the number).
        answer_rule: how a generated answer's number is read: ``"last_number"`` (CODI's ``test.py``: the last
            number in the text) or ``"after_hash"`` (Coconut's ``run.py``: the text after the last ``#``).
        exclude_eot_from_argmax: whether greedy decoding never chooses EOT (CODI: the vocabulary's last row
            is left out of the argmax; Coconut chooses among every row).
        schedule: ``"sequential"`` or ``"jacobi"`` (see the module docstring).
        n_sweeps: with the Jacobi schedule, how many sweeps follow sweep 0 (PCCoT's ``num_iterations``); 0 else.
        answer_prompt: text fed after EOT, before the answer (PCCoT: ``"The answer is:"``; "" else).
    """

    method: str
    feedback: Feedback
    n_latents: int
    question_suffix: str
    clean_questions: bool
    answer_template: str
    answer_rule: Literal["last_number", "after_hash"]
    exclude_eot_from_argmax: bool
    schedule: Schedule = "sequential"
    n_sweeps: int = 0
    answer_prompt: str = ""

    def __post_init__(self) -> None:
        if (self.schedule == "jacobi") != (self.n_sweeps > 0):
            raise ValueError(
                f"{self.method}: a Jacobi schedule needs n_sweeps >= 1 and a sequential one none "
                f"(schedule={self.schedule!r}, n_sweeps={self.n_sweeps})"
            )

    @property
    def is_jacobi(self) -> bool:
        """Whether thoughts are computed together in sweeps (PCCoT) rather than one after another."""
        return self.schedule == "jacobi"

    @property
    def has_projection(self) -> bool:
        """Whether thoughts are fed through a projection head (then ``prj.*`` and ``hook_projection`` exist)."""
        return self.feedback == "projection"

    def question_text(self, question: str) -> str:
        """A question as the method writes it before tokenizing."""
        return (clean_question(question) if self.clean_questions else question) + self.question_suffix

    def answer_text(self, value: float) -> str:
        """``value`` written as the method writes its answer (integers without ``.0``)."""
        return self.answer_template.format(write_number(value))

    def prediction(self, text: str) -> float | None:
        """The number a generated answer text predicts, by the method's own rule (None when there is none)."""
        if self.answer_rule == "after_hash":
            tail = text.split("#")[-1].replace(",", "").strip()
            return float(tail) if NUMBER_PATTERN.fullmatch(tail) else None
        return extract_prediction(text)

    def argmax_width(self, d_vocab: int) -> int:
        """How many leading vocabulary rows greedy decoding chooses among."""
        return d_vocab - 1 if self.exclude_eot_from_argmax else d_vocab


#: CODI (Shen et al. 2025; upstream ``test.py``).
CODI_LOOP = LatentLoop(
    method="codi",
    feedback="projection",
    n_latents=6,
    question_suffix="",
    clean_questions=True,
    answer_template=ANSWER_TEMPLATE,
    answer_rule="last_number",
    exclude_eot_from_argmax=True,
)

#: Coconut (Hao et al. 2024; upstream ``coconut.py`` and ``run.py``; GSM8K: 3 stages x 2 thoughts).
COCONUT_LOOP = LatentLoop(
    method="coconut",
    feedback="identity",
    n_latents=6,
    question_suffix="\n",
    clean_questions=False,
    answer_template="### {}",
    answer_rule="after_hash",
    exclude_eot_from_argmax=False,
)

#: PCCoT (Wu et al. 2025; upstream ``modeling_gpt2.py`` and ``generate.py``). A checkpoint sets its own
#: ``n_latents`` (``num_latent_tokens``), ``n_sweeps`` (``num_iterations``), feedback (``use_projection``) and
#: answer prompt; these are upstream's defaults.
PCCOT_LOOP = LatentLoop(
    method="pccot",
    feedback="projection",
    n_latents=6,
    question_suffix="",
    clean_questions=False,
    answer_template="{}",
    answer_rule="last_number",
    exclude_eot_from_argmax=False,
    schedule="jacobi",
    n_sweeps=6,
    answer_prompt="The answer is:",
)

#: Every loop codi_lens runs, by method name.
LATENT_LOOPS = {loop.method: loop for loop in (CODI_LOOP, COCONUT_LOOP, PCCOT_LOOP)}
