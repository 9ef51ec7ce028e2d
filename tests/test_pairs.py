"""Clean/corrupted pairs: answers recomputed by hand, rejections with their reasons, foreign pair files."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from codi_lens.core.errors import MissingFileError
from codi_lens.data import DataError, Problem, load_problems
from codi_lens.data.pairs import (
    Pair,
    Reason,
    Rejected,
    check_pairs,
    corrupt,
    make_pairs,
    parse_chain,
    question_numbers,
    read_pair_file,
    read_pair_table,
    recompute_program,
)


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


def message_of(problem: Problem, at: int, new: float, **kwargs) -> str:
    with pytest.raises(Rejected) as info:
        corrupt(problem, at, new, **kwargs)
    return str(info.value)


def one_span(expression: str, question: str = "Di has 5 coins and 2 bags. How many?") -> Problem:
    """A problem whose chain is the single span ``expression`` (its stated result is the gold answer)."""
    result = expression.split("=")[-1]
    return gsm8k_problem(question, f"<<{expression}>>\n#### {result}")


def test_rejection_messages_say_which_number_or_span():
    """Each rejection writes its reason and the detail that locates it (what ``rejections.parquet`` shows)."""
    cases = [
        (gsm8k_problem("Tom has 4 cats and 3 dogs. How many pets?", "<<4+3=8>>\n#### 8"), "4", 5,
         "a span's stated result differs from its expression: <<4+3=8>>"),
        (gsm8k_problem("Tom has 4 cats. How many legs?", "<<4*legs=16>>\n#### 16"), "4", 5,
         "a span cannot be re-evaluated: unsupported syntax Name"),
        (gsm8k_problem("Ann has 4 red and 4 blue pens. How many?", "<<4+4=8>>\n#### 8"), "4", 5,
         "the number occurs more than once in the question: 4"),
        (gsm8k_problem("A square has side 3. How many cells?", "<<3*3=9>>\n#### 9"), "3", 4,
         "the number plays several roles in the chain: 3 is used 2 times"),
        (gsm8k_problem("Bo has 3 bags of 2 apples, eats 6 and finds 1. How many?",
                       "<<3*2=6>> <<6-6=0>> <<0+1=1>>\n#### 1"), "6", 5,
         "the number plays several roles in the chain: 6 is also an earlier result"),
        (gsm8k_problem("Jo has 2 red and 3 blue pens, Mo 1 red and 4 blue. Each costs 6. Total cost?",
                       "<<2+3=5>> <<1+4=5>> <<5*6=30>>\n#### 30"), "2", 3,
         "the number plays several roles in the chain: 5 matches earlier results that now differ"),
        (gsm8k_problem("Cy has 5 hats and buys 2. How many?", "<<5+2=7>>\n#### 8"), "5", 6,
         "the chain does not end at the gold answer: last span gives 7, gold is 8"),
        (gsm8k_problem("Ed is 30 and has 5 cups and 2 plates. How many things?", "<<5+2=7>>\n#### 7"), "30", 31,
         "the number is not used in the chain: 30"),
        (gsm8k_problem("Fi has 5 boxes with 0 cups each. How many cups?", "<<5*0=0>>\n#### 0"), "5", 6,
         "the answer does not change"),
        (gsm8k_problem("Gus splits 8 cakes among 2 kids. How many each?", "<<8/2=4>>\n#### 4"), "8", 9,
         "the corrupted answer is not an integer: 4.5"),
        (one_span("2**10=1024", "Di has 2 coins and 10 bags."), "2", 3, None),  # the largest exponent allowed
        (one_span("2**11=2048", "Di has 2 coins and 11 bags."), "2", 3,
         "a span cannot be re-evaluated: exponent too large"),
        (one_span("5/(2-2)=0"), "5", 6, "a span cannot be re-evaluated: division by zero"),
        (one_span("True+5=6"), "5", 6, "a span cannot be re-evaluated: unsupported syntax Constant"),
    ]  # fmt: skip
    for problem, number, new, expected in cases:
        at = problem.question.index(number)
        if expected is None:
            corrupt(problem, at, new)
            continue
        assert message_of(problem, at, new) == expected, problem.solution
    assert message_of(JANET, 3, 4) == "no integer in the question: no number at character 3"
    hal = gsm8k_problem("Hal has 5 eggs and eats 4. How many left?", "<<5-4=1>>\n#### 1")
    assert message_of(hal, hal.question.index("5"), 45, max_value=40) == (
        "a value leaves the model's number range: above 40"
    )
    assert corrupt(hal, hal.question.index("5"), 40, max_value=40).corrupted_answer == 36  # the bound is allowed


def test_signs_and_powers_are_re_evaluated():
    """Unary minus of an expression, unary plus, powers, parentheses: the stated results check and the
    corrupted answer is the expression on the new number."""
    assert corrupt(one_span("-(2-5)*2=6"), 7, 7).corrupted_answer == -(2 - 7) * 2
    assert corrupt(one_span("+5*2=10"), 7, 6).corrupted_answer == 12
    assert corrupt(one_span("5**2=25"), 7, 6).corrupted_answer == 36
    assert corrupt(one_span("(5+2)*2=14"), 7, 6).corrupted_answer == 16


def toy_problem(question: str, solution: str) -> Problem:
    gold = float(solution.split("#### ")[1])
    return Problem(id="toy:x", question=question, solution=solution, gold=gold, n_steps=solution.count("<<"),
                   source="toy", split="test", index=0)  # fmt: skip


def test_synthetic_programs_refuse_what_they_cannot_trace():
    """A span that is not one operation on two written numbers, a question number past the program's operands,
    an odd value halved: each names itself. Halving that rounds (``//``) floors."""
    nested = toy_problem("Ava has 6 coins. On Monday Ava keeps half and gets 1.", "<<6/2+1=4>>\n#### 4")
    assert message_of(nested, 8, 8) == "a span cannot be re-evaluated: <<6/2+1>> is not one synthetic operation"
    extra = toy_problem("Ava has 6 coins. On Monday Ava buys 2 more. How many after 3 days?", "<<6+2=8>>\n#### 8")
    at_extra = question_numbers(extra.question)[2][0]
    assert message_of(extra, at_extra, 4) == "the number is not used in the chain: number 2 of the question"
    odd = toy_problem("Ava has 6 coins. On Monday Ava keeps half of them.", "<<6/2=3>>\n#### 3")
    assert message_of(odd, 8, 7) == "an odd value would be halved: halving 7"
    spans = parse_chain("<<6//2=3>> <<3+2=5>>")
    assert recompute_program(spans, 0, 9) == [4.0, 6.0]


def test_make_pairs_tables_by_hand():
    """Candidates in question order, ``value + delta`` in the order given; a number-level rejection skips that
    number's other deltas; a value-level one tries the next delta. Every tried candidate is one rejection row
    saying whether its problem got a pair; a problem without an integer is one row with NaN numbers."""
    hal = gsm8k_problem("Hal has 5 eggs and eats 4. How many left?", "<<5-4=1>>\n#### 1", pid="hal")
    twice = gsm8k_problem("Ann has 4 red and 4 blue pens. How many?", "<<4+4=8>>\n#### 8", pid="ann")
    none = gsm8k_problem("How many pens does Bo have?", "<<1+1=2>>\n#### 2", pid="bo")
    pairs, rejections = make_pairs([hal, twice, none], deltas=(-5, 1))
    assert list(pairs.columns) == list(Pair.__dataclass_fields__)
    assert pairs.to_dict("records") == [
        {"pair_id": "hal|8:5->6", "clean_id": "hal", "clean_question": hal.question,
         "corrupted_question": hal.question.replace("5", "6"), "clean_answer": 1.0, "corrupted_answer": 2.0,
         "changed_from": 5.0, "changed_to": 6.0, "changed_at": 8, "n_steps": 1, "source": "t", "split": "t"},
    ]  # fmt: skip
    expected = pd.DataFrame(
        [
            ("hal", 5.0, 0.0, Reason.NEGATIVE.value, "", True),
            ("ann", 4.0, -1.0, Reason.REPEATED_IN_QUESTION.value, "4", False),
            ("ann", 4.0, -1.0, Reason.REPEATED_IN_QUESTION.value, "4", False),
            ("bo", math.nan, math.nan, Reason.NO_NUMBER.value, "", False),
        ],
        columns=["problem_id", "changed_from", "changed_to", "reason", "detail", "has_pair"],
    )
    pd.testing.assert_frame_equal(rejections, expected)
    empty_pairs, empty_rejections = make_pairs([])
    assert list(empty_pairs.columns) == list(Pair.__dataclass_fields__)
    assert list(empty_rejections.columns) == list(expected.columns)


def test_check_pairs_table_by_hand():
    """Every column of the report, for a pair that agrees without a pair id or claimed answers (id = its index,
    claims None) and one that is rejected (recomputed values NaN, no clean id, the reason's text)."""
    hal = gsm8k_problem("Hal has 5 eggs and eats 4. How many left?", "<<5-4=1>>\n#### 1", pid="hal")
    rows = [
        {"clean_question": hal.question, "corrupted_question": hal.question.replace("4", "3")},
        {"clean_question": hal.question, "corrupted_question": hal.question, "clean_answer": "1"},
    ]
    report = check_pairs(rows, [hal])
    expected = pd.DataFrame(
        [
            ("0", "agrees", "", None, 1.0, None, 2.0, "hal", 1, 4.0, 3.0, rows[0]["clean_question"],
             rows[0]["corrupted_question"]),
            ("1", "rejected", Reason.NOT_ONE_NUMBER.value + ": 0 numbers differ", 1.0, math.nan, None, math.nan,
             None, math.nan, math.nan, math.nan, hal.question, hal.question),
        ],
        columns=["pair_id", "status", "reason", "claimed_clean_answer", "recomputed_clean_answer",
                 "claimed_corrupted_answer", "recomputed_corrupted_answer", "clean_id", "n_steps", "changed_from",
                 "changed_to", "clean_question", "corrupted_question"],
    )  # fmt: skip
    pd.testing.assert_frame_equal(report, expected)
    assert check_pairs([{**rows[0], "corrupted_answer": "two"}], [hal])["status"].tolist() == ["disagrees"]


def test_pair_files_that_cannot_be_read_name_the_file_and_the_pair(tmp_path):
    missing = tmp_path / "none.jsonl"
    with pytest.raises(MissingFileError, match=f"no pair file at '{missing}'"):
        read_pair_file(missing)
    listed = tmp_path / "pairs.json"
    listed.write_text('\n  [{"clean_question": "a 1", "corrupted_question": "a 2"}]')
    assert read_pair_file(listed) == [{"clean_question": "a 1", "corrupted_question": "a 2"}]
    listed.write_text('[{"clean_question": "a 1",\n "corrupted_question": }]')
    with pytest.raises(DataError, match=r"pairs.json: not valid JSON \(Expecting value at line 2\)"):
        read_pair_file(listed)
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"clean_question": "a 1", "corrupted_question": "a 2"}\n{"clean_question": "b 1"}\n')
    with pytest.raises(DataError) as info:
        read_pair_file(lines)
    assert str(info.value) == f"{lines}: pair 1 has no field 'corrupted_question' (fields: ['clean_question'])"
    lines.write_text('{"clean_question": "a 1", "corrupted_question": "a 2"}\nnot json\n')
    with pytest.raises(DataError, match=f"{lines}"):
        read_pair_file(lines)


def test_spans_that_cannot_be_parsed_are_rejected_and_thousands_separators_are_read():
    for solution, detail in [("<<3+4>>", "<<3+4>> has no '='"), ("<<2=2=2>>", "<<2=2=2>>")]:
        with pytest.raises(Rejected) as caught:
            parse_chain(solution + "\n#### 7")
        assert (caught.value.reason, caught.value.detail) == (Reason.NOT_EVALUABLE, detail)
    (span,) = parse_chain("He pays <<1,000+5=1,005>> dollars.\n#### 1005")
    assert (span.expression, span.result) == ("1,000+5", 1005)
    assert eval(compile(span.tree, "<span>", "eval")) == 1005  # the parsed tree reads 1000, not 1 and 0


def test_pair_tables_are_read_and_checked(tmp_path):
    table = pd.DataFrame(
        {"pair_id": ["a"], "clean_question": ["q"], "corrupted_question": ["r"], "clean_answer": [1.0]}
    )
    with pytest.raises(MissingFileError, match="no pairs file at '.*nowhere.parquet'"):
        read_pair_table(tmp_path / "nowhere.parquet")
    table.to_parquet(tmp_path / "short.parquet")
    with pytest.raises(DataError, match="short.parquet lacks the column 'corrupted_answer'"):
        read_pair_table(tmp_path / "short.parquet")
    table.assign(corrupted_answer=[2.0]).to_parquet(tmp_path / "pairs.parquet")
    pd.testing.assert_frame_equal(read_pair_table(tmp_path / "pairs.parquet"), table.assign(corrupted_answer=[2.0]))
