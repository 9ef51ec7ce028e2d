"""Answer extraction (upstream rule) and GSM8K loading/gold parsing on the real data."""

import json
import math
from pathlib import Path

import pytest

from codi_lens import extract_prediction, parse_gold_answer
from codi_lens.core.answers import clean_question, is_correct
from codi_lens.data import DataError, load_problems, problems_frame, shipped_dataset_text
from codi_lens.data.problems import count_steps

GSM8K_TEST = "gsm8k:test"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is: 18", 18.0),
        ("The answer is: 1,234", 1234.0),  # commas removed before matching
        ("The answer is: -7", -7.0),
        ("The answer is: 2.5", 2.5),
        ("3 apples then 5.", 5.0),  # the LAST number wins; "5." parses as 5
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_prediction_follows_upstream_rule(text, expected):
    assert extract_prediction(text) == expected


def test_gold_parsing_and_scoring_hand_values():
    assert parse_gold_answer("x\n#### 1,200") == 1200.0
    assert parse_gold_answer("#### -3") == -3.0
    assert is_correct(18.0, 18.0) and not is_correct(None, 18.0) and not is_correct(18.5, 18.0)
    with pytest.raises(ValueError, match="####"):
        parse_gold_answer("no answer line")


def test_clean_question_matches_upstream():
    # upstream: q.strip().replace('  ', ' ') -- one pass, so four spaces become two
    assert clean_question("  a  b    c \n") == "a b  c"


def test_all_1319_gsm8k_test_golds_parse():
    problems = load_problems(GSM8K_TEST)
    assert len(problems) == 1319
    raw = [json.loads(line) for line in shipped_dataset_text(GSM8K_TEST).splitlines()]
    for p, row in zip(problems, raw):
        # independent parse: the last line of the solution is "#### N"
        last_line = row["answer"].strip().splitlines()[-1]
        assert last_line.startswith("####")
        assert p.gold == float(last_line[4:].replace(",", "").strip())
        assert math.isfinite(p.gold)
    # hand-checked first two problems
    assert problems[0].gold == 18.0 and problems[0].n_steps == 2
    assert problems[1].gold == 3.0
    assert problems[0].id == "gsm8k:test:0" and problems[0].split == "test"


def test_problems_frame_and_steps():
    problems = load_problems(GSM8K_TEST, limit=20)
    frame = problems_frame(problems)
    assert list(frame["index"]) == list(range(20))
    # Independent count: every calculator span opens with "<<" in GSM8K solutions.
    assert list(frame["n_steps"]) == [p.solution.count("<<") for p in problems]
    assert list(frame["n_steps"][:3]) == [2, 2, 4]  # hand-checked: problems 0, 1 and 2 of the test split
    assert count_steps("<<1+2=3>> and <<3*4=12>>") == 2


def test_load_problems_errors_name_the_problem(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(DataError, match="record 1 has no field 'answer'"):
        load_problems(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_problems(broken)
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="split is required"):
        load_problems("openai/gsm8k")


def test_span_results_are_the_intermediate_values():
    from codi_lens.data.problems import span_results

    assert span_results("a <<16-3-4=9>>9 b <<9*2=18>>18\n#### 18") == (9.0, 18.0)
    assert span_results("<<1,000/4=250>>") == (250.0,)
    problems = load_problems(GSM8K_TEST, limit=1)
    assert problems[0].intermediates == (9.0, 18.0)
