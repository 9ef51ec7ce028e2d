"""Clean/corrupted pairs: answers recomputed by hand, rejections with their reasons, foreign pair files."""

from __future__ import annotations

import json

import pytest

from codi_lens.data import Problem, load_problems
from codi_lens.data.pairs import Reason, check_pairs, corrupt, make_pairs, question_numbers, read_pair_file


def gsm8k_problem(question: str, solution: str, pid: str = "p") -> Problem:
    from codi_lens.data import problem_from_record

    return problem_from_record({"question": question, "answer": solution, "id": pid}, source="t", split="t", index=0)


JANET = gsm8k_problem(
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes with four. "
    "She sells the rest for $2 per egg. How much does she make?",
    "16 - 3 - 4 = <<16-3-4=9>>9 eggs. 9 * 2 = $<<9*2=18>>18\n#### 18",
)


def reason_of(problem: Problem, at: int, new: float, **kwargs) -> str:
    with pytest.raises(Exception) as info:
        corrupt(problem, at, new, **kwargs)
    return info.value.reason


def test_corrupted_answer_is_recomputed_through_the_chain():
    at = JANET.question.index("16")
    pair = corrupt(JANET, at, 17)
    assert pair.corrupted_answer == (17 - 3 - 4) * 2 == 20
    assert pair.corrupted_question == JANET.question.replace("16", "17")
    assert (pair.clean_answer, pair.changed_from, pair.changed_to) == (18, 16, 17)
    # The $2 is used once, so changing it is a valid pair too: 9 * 5 = 45.
    assert corrupt(JANET, JANET.question.index("2 per"), 5).corrupted_answer == 45


def test_rejections_name_their_reason():
    bad_span = gsm8k_problem("Tom has 4 cats and 3 dogs. How many pets?", "<<4+3=8>>\n#### 8")
    assert reason_of(bad_span, 8, 5) == Reason.STATED_RESULT_DIFFERS
    not_evaluable = gsm8k_problem("Tom has 4 cats. How many legs?", "<<4*legs=16>>\n#### 16")
    assert reason_of(not_evaluable, 8, 5) == Reason.NOT_EVALUABLE
    twice = gsm8k_problem("Ann has 4 red and 4 blue pens. How many?", "<<4+4=8>>\n#### 8")
    assert reason_of(twice, 8, 5) == Reason.REPEATED_IN_QUESTION
    used_twice = gsm8k_problem("A square has side 3. How many cells does it hold?", "<<3*3=9>>\n#### 9")
    assert reason_of(used_twice, used_twice.question.index("3"), 4) == Reason.SEVERAL_ROLES
    also_a_result = gsm8k_problem(
        "Bo has 3 bags of 2 apples, eats 6 and finds 1. How many?", "<<3*2=6>> <<6-6=0>> <<0+1=1>>\n#### 1"
    )
    assert reason_of(also_a_result, also_a_result.question.index("6"), 5) == Reason.SEVERAL_ROLES
    off_gold = gsm8k_problem("Cy has 5 hats and buys 2. How many?", "<<5+2=7>>\n#### 8")
    assert reason_of(off_gold, 7, 6) == Reason.NOT_AT_GOLD
    unused = gsm8k_problem("Ed is 30 and has 5 cups and 2 plates. How many things?", "<<5+2=7>>\n#### 7")
    assert reason_of(unused, 6, 31) == Reason.NOT_IN_CHAIN
    unchanged = gsm8k_problem("Fi has 5 boxes with 0 cups each. How many cups?", "<<5*0=0>>\n#### 0")
    assert reason_of(unchanged, 7, 6) == Reason.UNCHANGED
    not_integer = gsm8k_problem("Gus splits 8 cakes among 2 kids. How many each?", "<<8/2=4>>\n#### 4")
    assert reason_of(not_integer, not_integer.question.index("8"), 9) == Reason.NOT_INTEGER
    negative = gsm8k_problem("Hal has 5 eggs and eats 4. How many left?", "<<5-4=1>>\n#### 1")
    assert reason_of(negative, negative.question.index("4"), 6) == Reason.NEGATIVE


def test_synthetic_pairs_follow_the_program():
    problem = Problem(
        id="toy:test:x",
        question="Ava has 6 coins. On Monday Ava keeps half of them. On Tuesday Ava buys 2 more. How many now?",
        solution="<<6/2=3>> <<3+2=5>>\n#### 5",
        gold=5.0,
        n_steps=2,
        source="toy",
        split="test",
        index=0,
    )
    at_start, at_buy = (n[0] for n in question_numbers(problem.question))
    assert corrupt(problem, at_start, 8).corrupted_answer == 8 // 2 + 2
    assert corrupt(problem, at_buy, 4).corrupted_answer == 3 + 4
    assert reason_of(problem, at_start, 7) == Reason.ODD_HALVING
    assert reason_of(problem, at_buy, 40, max_value=40) == Reason.OUT_OF_RANGE


def test_make_pairs_on_the_shipped_data_recomputes_every_answer():
    problems = load_problems("toy:test", limit=60)
    pairs, rejections = make_pairs(problems, max_value=40)
    assert len(pairs) >= 50 and set(rejections["reason"]) <= {r.value for r in Reason}
    by_id = {p.id: p for p in problems}
    for row in pairs.itertuples():
        clean = by_id[row.clean_id]
        # Recompute from scratch by simulating the story sentence by sentence.
        value = None
        numbers = iter(float(n[2]) for n in question_numbers(row.corrupted_question))
        for sentence in row.corrupted_question.split(". "):
            if value is None:
                value = next(numbers)
            elif "half" in sentence:
                value = value / 2
            elif any(w in sentence for w in ("gets", "buys", "finds")):
                value += next(numbers)
            elif any(w in sentence for w in ("gives away", "loses", "sells")):
                value -= next(numbers)
            elif "times" in sentence or "multiplies" in sentence:
                value *= next(numbers)
        assert value == row.corrupted_answer and clean.gold == row.clean_answer
        assert row.corrupted_answer != row.clean_answer and 0 <= row.corrupted_answer <= 40


def test_checking_a_foreign_pair_file(tmp_path):
    problems = load_problems("gsm8k:test", limit=50)
    pairs, _ = make_pairs(problems)
    good, bad = pairs.iloc[0], pairs.iloc[1]
    rows = [
        {
            "pair_id": "a",
            "clean_question": good.clean_question,
            "corrupted_question": good.corrupted_question,
            "clean_answer": good.clean_answer,
            "corrupted_answer": good.corrupted_answer,
        },
        {
            "pair_id": "b",
            "clean_question": bad.clean_question,
            "corrupted_question": bad.corrupted_question,
            "corrupted_answer": bad.corrupted_answer + 0.5,
        },
        {"pair_id": "c", "clean_question": "Not a GSM8K question with 3 apples?", "corrupted_question": "x 4"},
        {"pair_id": "d", "clean_question": good.clean_question, "corrupted_question": good.clean_question},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    report = check_pairs(read_pair_file(path)).set_index("pair_id")
    assert report.loc["a", "status"] == "agrees"
    assert report.loc["b", "status"] == "disagrees"
    assert report.loc["b", "recomputed_corrupted_answer"] == bad.corrupted_answer
    assert report.loc["c", "status"] == "rejected" and report.loc["c", "reason"] == Reason.NOT_FOUND.value
    assert report.loc["d", "status"] == "rejected" and report.loc["d", "reason"].startswith(Reason.NOT_ONE_NUMBER)
    (tmp_path / "list.json").write_text(json.dumps(rows[:1]))
    assert len(read_pair_file(tmp_path / "list.json")) == 1
