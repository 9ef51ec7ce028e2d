"""The synthetic arithmetic generator: determinism, disjoint splits, correct chains, tokenization."""

from __future__ import annotations

import re
from collections import Counter

from codi_lens import parse_gold_answer
from codi_lens.data import load_problems
from codi_lens.data.problems import count_steps
from codi_lens.data.synthetic import (
    DAYS,
    LONG_STEP_MIX,
    MAX_VALUE,
    STEP_MIX,
    build_tokenizer,
    generate_problems,
    make_splits,
    save_jsonl,
)

EQUATION = re.compile(r"<<(\d+)(//|[-+*/])(\d+)=(\d+)>>")


def test_generator_is_deterministic_and_seeded():
    a, b, c = generate_problems(200, seed=3), generate_problems(200, seed=3), generate_problems(200, seed=4)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]


def test_splits_are_disjoint_and_fixed():
    splits = make_splits(seed=0, n_train=3000, n_val=200, n_test=300)
    assert {k: len(v) for k, v in splits.items()} == {"train": 3000, "validation": 200, "test": 300}
    questions = {k: {p.question for p in v} for k, v in splits.items()}
    assert all(len(questions[k]) == len(splits[k]) for k in splits)
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["validation"]
    assert not questions["validation"] & questions["test"]
    assert splits["test"][0].id == "toy:test:0" and splits["test"][0].split == "test"
    assert make_splits(seed=0, n_train=3000, n_val=200, n_test=300)["test"] == splits["test"]


def test_chains_are_correct_and_in_range():
    for p in generate_problems(500, seed=1):
        equations = EQUATION.findall(p.cot)
        assert len(equations) == p.n_steps == len(p.intermediates) == count_steps(p.solution)
        previous = None
        for (a, op, b, result), value in zip(equations, p.intermediates):
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b, "//": a // b}[op] == result == value
            assert 0 <= result <= MAX_VALUE
            if previous is not None:
                assert a == previous  # each step uses the previous result
            previous = result
        assert p.answer_value == p.intermediates[-1] == parse_gold_answer(p.solution)


def _solve_from_question(question: str) -> list[int]:
    """Recompute the chain from the question text alone: start value, then the days in week order."""
    value = int(re.search(r"(?:has|starts with|owns) (\d+)", question).group(1))
    by_day = dict(re.findall(r"On (\w+day) \w+ ([^.]+)\.", question))
    values = []
    for day in DAYS[: len(by_day)]:
        phrase = by_day[day]
        x = int(re.search(r"\d+", phrase).group()) if re.search(r"\d+", phrase) else None
        if "half" in phrase:
            value //= 2
        elif "times" in phrase or "multiplies" in phrase:
            value *= x
        elif "more" in phrase:
            value += x
        else:  # gives away / loses / sells x
            value -= x
        values.append(value)
    return values


def test_questions_state_the_chain_in_week_order():
    for p in generate_problems(500, seed=1):
        assert _solve_from_question(p.question) == list(p.intermediates)
        assert re.findall(r"On (\w+day)", p.question) == DAYS[: p.n_steps]
        for a, op, _, _ in EQUATION.findall(p.cot):
            assert op != "//" and (op != "/" or int(a) % 2 == 0)  # by default only even values are halved


def test_odd_halving_rounds_down():
    problems = generate_problems(500, seed=1, halve_odd=True)
    for p in problems:
        assert _solve_from_question(p.question) == list(p.intermediates)
    odd = [int(a) for p in problems for a, op, _, _ in EQUATION.findall(p.cot) if op == "//" and int(a) % 2]
    assert len(odd) > 50


def test_shuffled_questions_still_state_the_chain():
    problems = generate_problems(500, seed=1, shuffle=True)
    for p in problems:
        assert _solve_from_question(p.question) == list(p.intermediates)
        assert sorted(re.findall(r"On (\w+day)", p.question), key=DAYS.index) == DAYS[: p.n_steps]
    in_text_order = [re.findall(r"On (\w+day)", p.question) == DAYS[: p.n_steps] for p in problems if p.n_steps >= 3]
    assert 0 < sum(in_text_order) < 0.5 * len(in_text_order)


def test_operations_are_mostly_non_linear():
    """Multiplication and halving make up at least 40% of all steps (no sum-of-operands shortcut)."""
    ops = [op for p in generate_problems(2000, seed=6) for _, op, _, _ in EQUATION.findall(p.cot)]
    assert set(ops) == {"+", "-", "*", "/"}
    assert sum(op in "*/" for op in ops) / len(ops) >= 0.4


def test_step_mix_is_weighted_to_multi_step():
    problems = generate_problems(2000, seed=2)
    share = sum(p.n_steps >= 3 for p in problems) / len(problems)
    expected = sum(w for n, w in STEP_MIX.items() if n >= 3)
    assert expected >= 0.75 and abs(share - expected) < 0.03
    assert {p.n_steps for p in problems} == set(STEP_MIX)


def test_tokenizer_numbers_are_single_tokens_and_nothing_is_unknown():
    tok = build_tokenizer()
    for value in range(MAX_VALUE + 1):
        assert len(tok(str(value), add_special_tokens=False)["input_ids"]) == 1
    text = " ".join(p.question + " " + p.cot + " The answer is: 5" for p in generate_problems(300, seed=5))
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(tok("The answer is: 37")["input_ids"], skip_special_tokens=True).endswith("37")
    rounding = build_tokenizer(halve_odd=True)
    assert set(tok.get_vocab()) < set(rounding.get_vocab())
    text = " ".join(p.question + " " + p.cot for p in generate_problems(300, seed=5, halve_odd=True))
    assert rounding.unk_token_id not in rounding(text)["input_ids"]


def test_jsonl_round_trip_through_the_gsm8k_loader(tmp_path):
    problems = generate_problems(20, seed=0, split="test")
    path = save_jsonl(problems, tmp_path / "test.jsonl")
    loaded = load_problems(path)
    assert [p.question for p in loaded] == [p.question for p in problems]
    assert [p.gold for p in loaded] == [float(p.answer_value) for p in problems]
    assert [p.intermediates for p in loaded] == [tuple(float(v) for v in p.intermediates) for p in problems]


def test_long_step_mix_and_day_labelled_chains():
    """``step_mix="long"`` draws chains of 2-6 steps in about the stated shares; ``cot_days`` puts each
    step's day before its equation and changes nothing else (same questions, spans and answers)."""
    splits = make_splits(seed=0, n_train=2000, n_val=10, n_test=10, step_mix="long")
    counts = Counter(p.n_steps for p in splits["train"])
    assert set(counts) == set(LONG_STEP_MIX)
    for n, share in LONG_STEP_MIX.items():
        assert abs(counts[n] / 2000 - share) < 0.04, (n, counts[n])
    labelled = make_splits(seed=0, n_train=2000, n_val=10, n_test=10, step_mix="long", cot_days=True)
    for plain, days in zip(splits["train"][:200], labelled["train"][:200]):
        assert (days.question, days.cot, days.gold, days.intermediates) == (
            plain.question,
            plain.cot,
            plain.gold,
            plain.intermediates,
        )
        chain = days.solution.split("\n")[0]
        assert chain == " ".join(f"{day} {eq}" for day, eq in zip(DAYS, plain.cot.split()))


def test_toy_chain_splits_are_regenerated_with_its_own_generator_settings():
    """``toy-chain:validation`` is regenerated from the settings in toy-chain's ``training.json``
    (shuffled days, odd halving, long chains), its ids name its own dataset, and its questions are
    neither toy-arith's nor toy-chain's shipped test questions."""
    validation = load_problems("toy-chain:validation", limit=300)
    assert validation[0].id == "toy-chain:validation:0" and validation[0].split == "validation"
    assert any("rounding" in p.question for p in validation)
    assert any(re.findall(r"On (\w+day)", p.question) != DAYS[: p.n_steps] for p in validation)
    assert all(_solve_from_question(p.question) == list(p.intermediates) for p in validation)
    assert Counter(p.n_steps for p in validation)[6] > Counter(p.n_steps for p in validation)[2]
    test = load_problems("toy-chain:test")
    assert test[0].id == "toy-chain:test:0"
    assert not {p.question for p in validation} & {p.question for p in test}
    assert not {p.question for p in test} & {p.question for p in load_problems("toy:test")}
