"""Answer numbers that span several tokens, against the HF + peft reference.

The tiny test tokenizer splits numbers as Llama 3 does (``1234`` is `` 12``, ``3``, ``4``; ``1254`` is `` 12``,
``5``, ``4``), so two answers can share their first token. Each metric is computed here from the reference's own
teacher-forced logits, token ids taken from the tokenizer directly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from codi_lens.core.answers import format_answer
from codi_lens.core.sites import Site
from codi_lens.metrics import AnswerContrast, find_answer_number
from codi_lens.patching import NO_COMPARED_TOKEN, patch_rows, prepare_pairs

ANSWERS = {"shared_prefix": (1234, 1254), "first_differs": (18, 812), "one_begins_other": (12, 123)}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, llama_model, questions):
    reference = tiny_checkpoint("llama").reference()
    pairs = pd.DataFrame(
        [
            {
                "pair_id": name,
                "clean_question": questions[i],
                "corrupted_question": questions[(i + 1) % 3],
                "clean_answer": float(a),
                "corrupted_answer": float(b),
            }
            for i, (name, (a, b)) in enumerate(ANSWERS.items())
        ]
    )
    return llama_model, reference, pairs


def _ids(tokenizer, value: float) -> list[int]:
    return tokenizer(format_answer(value), add_special_tokens=False)["input_ids"]


def _prefix_and_numbers(tokenizer, clean: float, corrupted: float):
    """The answer prefix (``The answer is:``) and each number's tokens (the space before it included)."""
    prefix = tokenizer("The answer is:", add_special_tokens=False)["input_ids"]
    a, b = _ids(tokenizer, clean), _ids(tokenizer, corrupted)
    assert a[: len(prefix)] == prefix == b[: len(prefix)]
    return prefix, a[len(prefix) :], b[len(prefix) :]


def test_the_tokenizer_splits_the_numbers_as_the_cases_need(setup):
    model, _, _ = setup
    tok = model.tokenizer
    prefix, a, b = _prefix_and_numbers(tok, 1234, 1254)
    assert len(a) == len(b) == 3 and a[0] == b[0] and a[1] != b[1]
    prefix, a, b = _prefix_and_numbers(tok, 18, 812)
    assert a[0] != b[0]
    prefix, a, b = _prefix_and_numbers(tok, 12, 123)
    assert b[: len(a)] == a
    number = find_answer_number(tok, _ids(tok, 1234))
    assert number.text == "1234" and list(number.tokens) == _prefix_and_numbers(tok, 1234, 1254)[1]
    assert AnswerContrast(tuple(prefix), (1, 2, 3), (1, 2, 4)).divergence == 2
    assert AnswerContrast(tuple(prefix), (1, 2), (1, 2, 4)).divergence is None


def _reference_metric(reference, question, prefix, a, b, metric):
    if metric == "answer_logprob":
        total = 0.0
        for number, sign in ((a, 1), (b, -1)):
            logits = reference.teacher_forced_logits(question, prefix + number).double().log_softmax(-1)
            total += sign * sum(float(logits[len(prefix) + j, t]) for j, t in enumerate(number))
        return total
    j = 0 if metric == "first_token" else next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    logits = reference.teacher_forced_logits(question, prefix + a[: j + 1])[len(prefix) + j]
    return float(logits[a[j]] - logits[b[j]])


@pytest.mark.parametrize("metric", ["first_token", "first_difference", "answer_logprob"])
def test_each_metric_against_the_reference_and_the_pairs_it_cannot_measure(setup, metric):
    model, reference, pairs = setup
    batch, kept, skipped = prepare_pairs(model, pairs, [], answer_from="gold", metric=metric, max_new_tokens=4)
    measured = {"first_token": ["first_differs"]}.get(metric, ["shared_prefix", "first_differs"])
    assert kept["pair_id"].tolist() == measured
    assert dict(zip(skipped["pair_id"], skipped["reason"])) == {
        name: NO_COMPARED_TOKEN[metric] for name in ANSWERS if name not in measured
    }
    for i, row in enumerate(kept.itertuples()):
        prefix, a, b = _prefix_and_numbers(model.tokenizer, row.clean_answer, row.corrupted_answer)
        for question, value in (
            (row.clean_question, batch.ld_clean[i]),
            (row.corrupted_question, batch.ld_corrupted[i]),
        ):
            expected = _reference_metric(reference, question, prefix, a, b, metric)
            assert float(value) == pytest.approx(expected, abs=2e-4), (row.pair_id, metric)
    if metric == "first_difference":
        assert batch.compared_token == [1, 0]  # `` 12`` is shared: the second token compares 1234 with 1254


@pytest.mark.parametrize("metric", ["first_difference", "answer_logprob"])
def test_exact_patching_of_a_fed_thought_under_each_metric(setup, metric):
    """The clean run's thought 3 fed into the corrupted run: the patched metric is the reference's with that
    thought replaced (HF's own loop), on both the compared row and the whole numbers."""
    model, reference, pairs = setup
    rows = patch_rows(
        model, pairs, [Site.of("thought_input", None, "thought:3")], answer_from="gold", metric=metric, max_new_tokens=4
    )
    used = rows[rows["reason"] == ""].set_index("pair_id")
    assert sorted(used.index) == ["first_differs", "shared_prefix"] and (used["metric"] == metric).all()
    for pair_id, row in used.iterrows():
        pair = pairs.set_index("pair_id").loc[pair_id]
        prefix, a, b = _prefix_and_numbers(model.tokenizer, pair.clean_answer, pair.corrupted_answer)
        clean_thought = reference.run(pair.clean_question, max_new_tokens=1)["thought_embeds"][2]
        expected = _reference_metric(reference, pair.corrupted_question, prefix, a, b, metric)
        patched = _reference_metric_replaced(reference, pair.corrupted_question, prefix, a, b, metric, clean_thought)
        assert row["ld_corrupted"] == pytest.approx(expected, abs=2e-4)
        assert row["logit_diff"] == pytest.approx(patched, abs=2e-4)
        assert abs(patched - expected) > 1e-3  # the patch changes something
        np.testing.assert_allclose(
            row["recovery"], (patched - expected) / (row["ld_clean"] - expected), rtol=1e-3, atol=1e-3
        )


def _reference_metric_replaced(reference, question, prefix, a, b, metric, thought, k=3):
    original = reference.teacher_forced_logits

    def replaced(q, answer, n_latents=6, replace=None):
        return original(q, answer, n_latents, {k: thought})

    reference.teacher_forced_logits = replaced
    try:
        return _reference_metric(reference, question, prefix, a, b, metric)
    finally:
        reference.teacher_forced_logits = original


@pytest.mark.parametrize("metric", ["first_difference", "answer_logprob"])
def test_attribution_is_the_directional_derivative_of_each_metric(setup, metric):
    """Attribution of the fed thought 6 is ``(z_clean - z_corrupted) . d metric / dz``: checked against a central
    finite difference of the reference's metric along that direction (HF's loop, thought 6 replaced by
    ``z_corrupted +- t (z_clean - z_corrupted)``). Under ``answer_logprob`` the estimate adds two gradient passes,
    one per side of the metric."""
    model, reference, pairs = setup
    rows = patch_rows(
        model,
        pairs,
        [Site.of("thought_input", None, "thought:6")],
        answer_from="gold",
        metric=metric,
        method="attribution",
        max_new_tokens=4,
    )
    used = rows[rows["reason"] == ""].set_index("pair_id")
    assert sorted(used.index) == ["first_differs", "shared_prefix"]
    t = 0.05
    for pair_id, row in used.iterrows():
        pair = pairs.set_index("pair_id").loc[pair_id]
        prefix, a, b = _prefix_and_numbers(model.tokenizer, pair.clean_answer, pair.corrupted_answer)
        clean = reference.run(pair.clean_question, max_new_tokens=1)["thought_embeds"][5].double()
        corrupted = reference.run(pair.corrupted_question, max_new_tokens=1)["thought_embeds"][5].double()
        moved = [
            _reference_metric_replaced(
                reference, pair.corrupted_question, prefix, a, b, metric, corrupted + step * (clean - corrupted), k=6
            )
            for step in (t, -t)
        ]
        derivative = (moved[0] - moved[1]) / (2 * t)
        estimate = row["logit_diff"] - row["ld_corrupted"]
        assert estimate == pytest.approx(derivative, rel=0.05, abs=1e-3), (pair_id, metric)


def test_every_gsm8k_test_pair_under_the_llama3_tokenizer(tmp_path):
    """With the real Llama 3 tokenizer (extra ``llama``), every pair ``make_pairs`` builds from GSM8K test: the
    numbers as written after ``The answer is:``, counted by hand from the tokenizer's own ids, and the token
    ``first_difference`` compares for each. Pairs whose answers share their first token are measured at the
    first token where they differ, never skipped; ``first_token`` would skip exactly those."""
    from conftest import require

    require("llama_models", "needs the extra codi-lens[llama]")
    from codi_lens.data import load_problems
    from codi_lens.data.pairs import make_pairs
    from codi_lens.loading.llama_tokenizer import llama3_tokenizer
    from codi_lens.patching import corrupted_number_tokens

    tok = llama3_tokenizer(tmp_path)
    pairs, _ = make_pairs(load_problems("gsm8k:test"))
    prefix = tok("The answer is: ", add_special_tokens=False)["input_ids"]  # Llama 3 keeps the space apart
    assert tok.convert_ids_to_tokens(prefix)[-1] == "Ġ"
    multi = shared = 0
    for row in pairs.itertuples():
        a, b = _ids(tok, row.clean_answer), _ids(tok, row.corrupted_answer)
        assert a[: len(prefix)] == prefix == b[: len(prefix)]
        clean, corrupted = a[len(prefix) :], b[len(prefix) :]
        number = find_answer_number(tok, a)
        assert number.prefix == tuple(prefix) and list(number.tokens) == clean
        assert list(corrupted_number_tokens(tok, number, row.corrupted_answer)) == corrupted
        contrast = AnswerContrast(tuple(prefix), tuple(clean), tuple(corrupted))
        multi += len(clean) > 1 or len(corrupted) > 1
        shared += clean[0] == corrupted[0]
        j = contrast.compared_at("first_difference")
        assert j is not None and clean[j] != corrupted[j] and clean[:j] == corrupted[:j], row.pair_id
        assert (contrast.compared_at("first_token") is None) == (clean[0] == corrupted[0])
    print(f"{len(pairs)} pairs, {multi} with a multi-token answer, {shared} sharing the first number token")
    assert shared > 0 and multi >= shared
