"""Seeded multi-step arithmetic word problems in the GSM8k-Aug format.

Each problem is a chain: a start value, then ``n_steps`` dependent operations, one per day of the
week ("On Tuesday Ava loses 3."), every value kept in ``0..MAX_VALUE`` so that each intermediate result
is one token of a word-level tokenizer (what logit-lens readouts need).

Two choices are meant to make serial computation pay off over a one-pass shortcut (they do not
force it: a 2-layer no-CoT model still solves 83.5% of the test chains, against 89.5% for the CODI
model; see the toy-arith model card):

- operations mix addition/subtraction with multiplication and halving, weighted to the non-linear
  ones (``OP_WEIGHTS``), so the answer is not a sum of the operands that one attention layer could
  add up along the question;
- chains are weighted to 3-5 steps (``STEP_MIX``), each step marked by its day.

Two harder variants are options of the generator, off by default (toy-arith was trained without
them; the default model, toy-chain, with both): ``shuffle`` puts the day sentences in random order,
so the running value cannot be built up left to right along the question; ``halve_odd`` halves odd
values too, rounding down (``<<7//2=3>>``), so a chain is no longer a composition of affine maps.
With the upstream objective alone neither made CODI beat the no-CoT baseline in our runs (with
shuffled order the student learned far too slowly, and a 2-layer no-CoT model still reached 85% with
odd halving); toy-chain needed the chain logit distillation and a Fourier start for the number
embeddings (``experiments/train_toy_codi.py``).

Records carry the question, the equation-only chain of thought (``<<5+7=12>> <<12*3=36>>``), a
GSM8K-style ``answer`` field ending in ``#### N`` (so the GSM8K loader and gold parser work
unchanged), the answer value, the number of steps and every intermediate value.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

from codi_lens.data.problems import Problem

#: The ``make_splits`` arguments of the shipped toy-arith data (``toy:train``, ``toy:val``, ``toy:test``).
SHIPPED_SPLITS = {"seed": 0, "n_train": 40000, "n_val": 500, "n_test": 1000}

MAX_VALUE = 40
#: Largest operand of an addition/subtraction and of a multiplication.
MAX_ADD, MAX_MUL = 10, 3
#: Share of problems per number of steps: weighted to multi-step chains.
STEP_MIX = {1: 0.05, 2: 0.15, 3: 0.25, 4: 0.3, 5: 0.25}
#: Chains weighted to 4-6 steps (one per thought of a 6-thought model): a one-pass shortcut pays less.
LONG_STEP_MIX = {2: 0.05, 3: 0.15, 4: 0.25, 5: 0.25, 6: 0.3}
STEP_MIXES = {"default": STEP_MIX, "long": LONG_STEP_MIX}
#: Relative odds of each operation among those that keep the value in range.
OP_WEIGHTS = {"+": 1.0, "-": 1.0, "*": 2.0, "/": 1.5}
#: With ``halve_odd`` halving is weighted up further (about 39% of steps, 15% halve an odd value).
OP_WEIGHTS_HALVE_ODD = {**OP_WEIGHTS, "/": 2.5}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

NAMES = [
    "Ava",
    "Ben",
    "Cara",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ian",
    "Jo",
    "Kai",
    "Lena",
    "Milo",
    "Nia",
    "Omar",
    "Pia",
    "Quin",
    "Rosa",
    "Sam",
    "Tara",
    "Uma",
    "Vic",
    "Wes",
    "Yara",
    "Zoe",
]
ITEMS = [
    "apples",
    "coins",
    "stamps",
    "marbles",
    "books",
    "shells",
    "cards",
    "pencils",
    "stickers",
    "cookies",
    "beads",
    "buttons",
    "tickets",
    "plums",
    "toys",
]
STARTS = ["{name} has {a} {item}.", "{name} starts with {a} {item}.", "{name} owns {a} {item}."]
ADDS = ["gets {x} more.", "buys {x} more.", "finds {x} more."]
SUBS = ["gives away {x}.", "loses {x}.", "sells {x}."]
MULS = ["multiplies them by {x}.", "ends up with {x} times as many."]
HALVES = ["keeps half of them.", "gives away half of them."]
#: Halving of any value (``halve_odd``): the text says how it rounds, the CoT writes ``//``.
HALVES_FLOOR = ["keeps half of them, rounding down.", "gives away half of them, rounding up."]
QUESTIONS = ["How many now?", "How many {item} at the end?"]
#: Word-level pieces: calculator brackets, integers, words, single symbols.
TOKEN_PATTERN = r"<<|>>|\d+|[A-Za-z]+|[^\sA-Za-z\d]"


def _next_op(rng: random.Random, value: int, halve_odd: bool) -> tuple[str, int, int]:
    """Pick an operation that keeps the value in range: (symbol, operand, result)."""
    feasible = {
        "+": value < MAX_VALUE,
        "-": value > 0,
        "*": 1 < value <= MAX_VALUE // 2,
        "/": value >= 2 and (halve_odd or value % 2 == 0),
    }
    options = [op for op, ok in feasible.items() if ok]
    weights = OP_WEIGHTS_HALVE_ODD if halve_odd else OP_WEIGHTS
    op = rng.choices(options, [weights[o] for o in options])[0]
    if op == "/":
        return op, 2, value // 2
    if op == "+":
        x = rng.randint(1, min(MAX_ADD, MAX_VALUE - value))
        return op, x, value + x
    if op == "-":
        x = rng.randint(1, min(MAX_ADD, value))
        return op, x, value - x
    x = rng.randint(2, min(MAX_MUL, MAX_VALUE // value))
    return op, x, value * x


def generate_problem(
    rng: random.Random, n_steps: int, shuffle: bool = False, halve_odd: bool = False, cot_days: bool = False
) -> tuple[str, str, list[int]]:
    """Question text, CoT and intermediate values of one random chain of ``n_steps`` operations.

    With ``shuffle`` the day sentences appear in random order in the question (the CoT stays in
    day order). With ``halve_odd`` halving applies to odd values too and rounds down
    (``<<7//2=3>>``); without it only even values are halved (``<<8/2=4>>``). With ``cot_days`` each
    equation of the CoT is preceded by its day (``Monday <<5+7=12>> Tuesday <<12*3=36>>``), so the
    explicit chain names the sentence each step reads; the questions drawn are the same.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 20)
    start = rng.choice(STARTS).format(name=name, a=value, item=item)
    steps, equations, intermediates = [], [], []
    for day in DAYS[:n_steps]:
        op, x, result = _next_op(rng, value, halve_odd)
        template = {"+": ADDS, "-": SUBS, "*": MULS, "/": HALVES_FLOOR if halve_odd else HALVES}[op]
        steps.append(f"On {day} {name} " + rng.choice(template).format(x=x))
        symbol = "//" if op == "/" and halve_odd else op
        equations.append(f"{day} " * cot_days + f"<<{value}{symbol}{x}={result}>>")
        intermediates.append(result)
        value = result
    if shuffle:
        rng.shuffle(steps)
    question = " ".join([start, *steps, rng.choice(QUESTIONS).format(name=name, item=item)])
    return question, " ".join(equations), intermediates


def generate_problems(
    n: int,
    seed: int,
    split: str = "all",
    step_mix: dict[int, float] = STEP_MIX,
    shuffle: bool = False,
    halve_odd: bool = False,
    cot_days: bool = False,
) -> list[Problem]:
    """``n`` distinct problems (unique question text) drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    steps, weights = zip(*sorted(step_mix.items()))
    seen: set[str] = set()
    problems = []
    while len(problems) < n:
        n_steps = rng.choices(steps, weights)[0]
        question, cot, intermediates = generate_problem(rng, n_steps, shuffle, halve_odd, cot_days)
        if question in seen:
            continue
        seen.add(question)
        problems.append(_problem(split, len(problems), question, cot, intermediates))
    return problems


def _problem(split: str, index: int, question: str, cot: str, intermediates: list[int]) -> Problem:
    return Problem(
        id=f"toy:{split}:{index}",
        question=question,
        solution=f"{cot}\n#### {intermediates[-1]}",
        gold=float(intermediates[-1]),
        n_steps=len(intermediates),
        source="toy",
        split=split,
        index=index,
        intermediates=tuple(float(v) for v in intermediates),
    )


def make_splits(
    seed: int = 0,
    n_train: int = 40000,
    n_val: int = 500,
    n_test: int = 1000,
    shuffle: bool = False,
    halve_odd: bool = False,
    step_mix: str = "default",
    cot_days: bool = False,
    name: str = "toy",
) -> dict[str, list[Problem]]:
    """Fixed train/validation/test splits with no question text shared between them.

    ``step_mix`` names the share of problems per chain length (``STEP_MIXES``); ``cot_days`` puts
    each step's day before its equation in the solutions (see :func:`generate_problem`). Problem ids
    are ``"{name}:{split}:{index}"``: the name of the dataset (``"toy"`` for toy-arith's), so that two
    shipped datasets never share an id; it does not change the problems."""
    if step_mix not in STEP_MIXES:
        raise ValueError(f"unknown step_mix {step_mix!r}; choose from {sorted(STEP_MIXES)}")
    pool = generate_problems(
        n_train + n_val + n_test,
        seed,
        step_mix=STEP_MIXES[step_mix],
        shuffle=shuffle,
        halve_odd=halve_odd,
        cot_days=cot_days,
    )
    bounds = {
        "train": (0, n_train),
        "validation": (n_train, n_train + n_val),
        "test": (n_train + n_val, n_train + n_val + n_test),
    }
    splits = {}
    for split, (lo, hi) in bounds.items():
        splits[split] = [replace(p, id=f"{name}:{split}:{i}", split=split, index=i) for i, p in enumerate(pool[lo:hi])]
    return splits


def value_limit(problems: list[Problem]) -> int | None:
    """``MAX_VALUE`` when every problem comes from this generator (a shipped toy split, whatever its
    model: ids ``toy:...`` or ``toy-chain:...``), so minimal pairs stay in the one-token range; else None."""
    return MAX_VALUE if problems and all(map(is_synthetic, problems)) else None


def is_synthetic(problem: Problem) -> bool:
    """Whether ``problem`` comes from this generator (a shipped toy split: ids ``toy:...`` or ``toy-chain:...``):
    its chain is then a program, each step applied to the previous result."""
    return problem.source in ("toy", "toy-chain") or problem.id.startswith("toy")


def to_record(p: Problem) -> dict:
    """The on-disk record of a synthetic problem: GSM8K fields (``question``, ``answer``) plus its id,
    split, equation chain, answer value, number of steps and intermediate values."""
    return {
        "id": p.id,
        "split": p.split,
        "question": p.question,
        "cot": p.cot,
        "answer": p.solution,
        "answer_value": p.answer_value,
        "n_steps": p.n_steps,
        "intermediates": [int(v) for v in p.intermediates],
    }


def save_jsonl(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as JSON Lines (readable by :func:`codi_lens.data.load_problems`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps(to_record(p)) + "\n")
    return path


def vocabulary(halve_odd: bool = False, extra_symbols: tuple[str, ...] = ()) -> list[str]:
    """Every piece the generator can emit: numbers 0..MAX_VALUE first, then words and symbols (sorted).

    ``halve_odd`` adds the words of the rounding templates (a different vocabulary from the default,
    which is the shipped model's). ``extra_symbols`` are appended last (Coconut writes ``### N``), so every
    other token keeps its id.
    """
    texts = [*NAMES, *ITEMS, *DAYS, *STARTS, *ADDS, *SUBS, *MULS, *HALVES, *QUESTIONS, "On", "The answer is:"]
    words: set[str] = set()
    for text in texts + (HALVES_FLOOR if halve_odd else []):
        words.update(re.findall(TOKEN_PATTERN, re.sub(r"\{\w+\}", " ", text)))
    symbols = ["<<", ">>", "+", "-", "*", "/", "="]
    return [str(i) for i in range(MAX_VALUE + 1)] + sorted(words - set(symbols)) + symbols + list(extra_symbols)


def build_tokenizer(halve_odd: bool = False, extra_symbols: tuple[str, ...] = ()):
    """Word-level tokenizer over :func:`vocabulary`: every number 0..MAX_VALUE is one token.

    Adds ``<s>`` in front of each text (like LLaMA's BOS) and stops at ``</s>``.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary(halve_odd, extra_symbols))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
