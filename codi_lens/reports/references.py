"""Published findings on CODI, shown beside a checkpoint's own numbers where the report measures the same thing.

Each :class:`Reference` names its source, states the published finding and how our measure differs, and computes
"this checkpoint" from the report's headline numbers (``report.json``'s ``headlines``: section title -> numbers),
so nothing on the page is typed by hand. A measure the report did not make reads "not measured" with the part it
needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

Headlines = dict[str, dict[str, Any]]

LENS = "Logit and tuned lens readout"
VALUES = "Value-matched patching"
TEMPLATE = "Value-matched patching on the Cywinski templates"
EARLY = "Early answers"


@dataclass(frozen=True)
class Reference:
    """One published finding: where it is from, what it says, how our measure differs, and ours."""

    source: str
    finding: str
    published: str
    protocol: str
    ours: Callable[[Headlines], str]


def _percent(values: list[float]) -> str:
    mean, low, high = (100 * v for v in values)
    return f"{mean:.0f}% [{low:.0f}%, {high:.0f}%]"


def decoded_share(n_steps: int) -> Callable[[Headlines], str]:
    def ours(headlines: Headlines) -> str:
        numbers = headlines.get(LENS, {})
        own = numbers.get(f"final layer/own/{n_steps}-step problems/top5")
        if own is None:
            return f"not measured (no {n_steps}-step problems read; part 'reading')"
        control = numbers.get(f"final layer/control/{n_steps}-step problems/top5")
        return _percent(own) + (f" (another problem's values: {_percent(control)})" if control else "")

    return ours


def moved_most(step: int) -> Callable[[Headlines], str]:
    def ours(headlines: Headlines) -> str:
        prefix = f"moved/different/step {step}/thought "
        for section, data in ((TEMPLATE, "their templates"), (VALUES, "the report's problems")):
            numbers = headlines.get(section, {})
            cells = {int(key[len(prefix) :]): v for key, v in numbers.items() if key.startswith(prefix)}
            if cells:
                thought = max(cells, key=lambda k: cells[k][0])
                moved = _percent(cells[thought])
                return f"thought {thought}: the answer moves to the value's prediction in {moved} ({data})"
        return f"not measured (no step-{step} value patched; parts 'template' or 'reading')"

    return ours


def early_answer_rises(headlines: Headlines) -> str:
    numbers = headlines.get(EARLY, {})
    accuracy = {int(key.split()[-1]): v[0] for key, v in numbers.items() if key.startswith("after thought ")}
    if len(accuracy) < 2:
        return "not measured (part 'reading')"
    rises = {k: accuracy[k] - accuracy[k - 1] for k in sorted(accuracy) if k - 1 in accuracy}
    odd = sum(max(r, 0) for k, r in rises.items() if k % 2)
    even = sum(max(r, 0) for k, r in rises.items() if not k % 2)
    total = odd + even
    if total <= 0:
        return "accuracy does not rise with more thoughts"
    order = sorted(rises, key=lambda k: -rises[k])[:2]
    return (
        f"{100 * odd / total:.0f}% of the rise comes after odd thoughts, {100 * even / total:.0f}% after even ones "
        f"(largest after thoughts {', '.join(map(str, order))})"
    )


REFERENCES = (
    *(
        Reference(
            "CODI paper (Shen et al. 2025), Table 3",
            f"intermediate results decoded from the latents, {n}-step problems (LLaMA-1B)",
            published,
            "paper: top-5 tokens of each latent; ours: a value counts when it is in the logit lens's top 5 at the "
            "final layer of BOT or some thought, the share of a problem's values, 95% CI over problems",
            decoded_share(n),
        )
        for n, published in ((1, "97.1%"), (2, "83.9%"), (3, "75.0%"))
    ),
    Reference(
        "Cywinski, Bussmann et al. 2025 (CODI LLaMA-1B)",
        "3-step problems: the first intermediate value is stored in the latent fed at thought 3",
        "patching in the mean latent of prompts with another value moves the answer to the predicted value",
        "their latent index k is the vector fed at thought k + 1; ours: the mean fed thought of reference "
        "problems with another value, on their templates (part 'template', when the tokenizer can write them; "
        "each mean over one (step1, Z) group, as theirs) or else the report's problems (grouped by the value "
        "alone); the share of answers that move to the prediction, 95% CI over problems",
        moved_most(1),
    ),
    Reference(
        "Cywinski, Bussmann et al. 2025 (CODI LLaMA-1B)",
        "3-step problems: the second intermediate value is stored in the latent fed at thought 5",
        "as above, for the second value",
        "as above",
        moved_most(2),
    ),
    Reference(
        "Scratchpad Thinking (NeurIPS 2025 MI workshop)",
        "even latent steps store, odd steps compute",
        "early-answer accuracy jumps after compute (odd) steps",
        "ours: accuracy when the answer is asked after k thoughts; the share of its rise that comes after odd k",
        early_answer_rises,
    ),
)


def reference_table(headlines: Headlines) -> pd.DataFrame:
    """One row per published finding: source, finding, published value, this checkpoint's, how they differ."""
    return pd.DataFrame(
        [
            {
                "source": r.source,
                "finding": r.finding,
                "published": r.published,
                "this checkpoint": r.ours(headlines),
                "how the measures differ": r.protocol,
            }
            for r in REFERENCES
        ]
    )
