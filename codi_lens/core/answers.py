"""Answer extraction and gold parsing, following upstream CODI's ``test.py`` scoring rule."""

from __future__ import annotations

import re

from codi_lens.core.registry import Registry

NUMBER_PATTERN = re.compile(r"-?\d+\.?\d*")

#: How CODI writes its final answer (upstream's training targets end with it).
ANSWER_TEMPLATE = "The answer is: {}"


def write_number(value: float) -> str:
    """``value`` as an answer writes it: integers without ``.0``."""
    return str(int(value) if float(value).is_integer() else value)


def format_answer(value: float) -> str:
    """``value`` written as CODI writes an answer: ``"The answer is: 18"`` (integers without ``.0``)."""
    return ANSWER_TEMPLATE.format(write_number(value))


def extract_prediction(text: str) -> float | None:
    """The model's numeric answer: commas removed, the LAST match of ``-?\\d+\\.?\\d*`` as a float.

    Returns None when the text holds no number (upstream scores that as wrong via ``inf``).
    """
    matches = NUMBER_PATTERN.findall(text.replace(",", ""))
    return float(matches[-1]) if matches else None


def parse_gold_answer(solution: str) -> float:
    """The gold answer of a GSM8K-format solution: the text after ``####``, commas removed, as float."""
    if "####" not in solution:
        raise ValueError(f"solution has no '####' answer line: {solution[-80:]!r}")
    return float(solution.split("####")[-1].strip().replace(",", ""))


def is_correct(prediction: float | None, gold: float) -> bool:
    """Exact equality of floats, as upstream scores it; no prediction is wrong."""
    return prediction is not None and prediction == gold


def clean_question(question: str) -> str:
    """Upstream's question preprocessing: ``q.strip().replace('  ', ' ')`` (no prompt template)."""
    return question.strip().replace("  ", " ")


#: How a pair's two answer numbers are compared (``--metric``).
ANSWER_METRICS: Registry[str] = Registry("answer metric")
ANSWER_METRICS.add(
    "first_difference",
    "logit difference at the first token where the two numbers differ (the default; the first token when "
    "they differ there, so one-token numbers read as before)",
)
ANSWER_METRICS.add("first_token", "logit difference at the numbers' first token (pairs sharing it are skipped)")
ANSWER_METRICS.add(
    "answer_logprob",
    "log-probability of the whole clean number minus the whole corrupted one's, each teacher-forced",
)
DEFAULT_ANSWER_METRIC = "first_difference"
