"""Ablating sets of thoughts together: a set is one run with every member ablated, a thought paired with itself
is its single ablation, and the interaction against the singles is the arithmetic it says."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from codi_lens import load_codi
from codi_lens.core.errors import FlagError
from codi_lens.data import load_problems
from codi_lens.importance import Ablation, ablation_grid, importance_rows, set_interactions
from codi_lens.interventions import AblationInputs, zero_thoughts


@pytest.fixture(scope="module")
def chain():
    return load_codi("toy-chain"), load_problems("toy-chain:test", limit=12)


def _inputs(baseline):
    return AblationInputs(baseline.thought_embeds, None, None, [0] * len(baseline.answer_tokens), 0)


def test_a_pair_is_one_run_with_both_thoughts_ablated_and_a_thought_with_itself_is_its_single(chain):
    model, problems = chain
    pair = Ablation("zero", "pairs", 5, (2, 5))
    itself = Ablation("zero", "pairs", 3, (3, 3))
    single = Ablation("zero", "single", 3, (3,))
    rows = importance_rows(model, problems, [pair, itself, single], _inputs, max_new_tokens=32)
    whole = model.run_codi([p.question for p in problems], max_new_tokens=32, fwd_hooks=zero_thoughts([2, 5]))
    _, predictions = model.decode_answers(whole.answer_tokens)
    found = rows[rows["thoughts"] == "2,5"]["prediction"].to_numpy()
    np.testing.assert_array_equal(found, np.array([np.nan if p is None else p for p in predictions], dtype=float))
    a, b = (rows[rows["thoughts"] == t].reset_index(drop=True) for t in ("3,3", "3"))
    for column in ("prediction", "kl", "kl_first_token", "logprob_change"):
        # float32 summed in blocks of different sizes: KL of up to ~13 nats agree to 1e-6 relative
        np.testing.assert_allclose(
            a[column].to_numpy(dtype=float), b[column].to_numpy(dtype=float), rtol=1e-5, atol=1e-5
        )


def test_the_grid_of_pairs_and_triples():
    grid = ablation_grid(["zero", "shuffle"], ["pairs", "triples"], n_latents=4)
    zero = [a for a in grid if a.intervention == "zero"]
    assert [a.members for a in zero if a.scope == "pairs"] == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert len([a for a in zero if a.scope == "triples"]) == 4
    assert all(a.thought == a.members[-1] for a in grid)
    assert len([a for a in grid if a.intervention == "shuffle"]) == 10  # shuffle needs two thoughts: both scopes


def test_set_interactions_by_hand():
    """Changes -1 and -2 alone and -5 together: -5 - (-1 - 2) = -2 (synergy); the pair breaks the answer, thought
    1 alone does not, thought 2 alone does: broken alone."""
    frame = pd.DataFrame(
        {
            "problem_id": ["p"] * 3,
            "intervention": ["zero"] * 3,
            "scope": ["single", "single", "pairs"],
            "thought": [1, 2, 2],
            "thoughts": ["1", "2", "1,2"],
            "baseline_correct": [True] * 3,
            "correct": [True, False, False],
            "logprob_change": [-1.0, -2.0, -5.0],
        }
    )
    out = set_interactions(frame)
    assert out["logprob_interaction"].tolist() == [-2.0]
    assert out["breaks_only_together"].tolist() == [0.0] and out["breaks_alone"].tolist() == [1.0]
    with pytest.raises(ValueError, match="add scope 'single'"):
        set_interactions(frame[frame["thoughts"] != "2"])


def test_step_importance_with_pairs(tmp_path):
    from experiments import step_importance

    summary = step_importance.main(
        ["--limit", "8", "--max-new-tokens", "32", "--interventions", "zero", "--scopes", "single,pairs",
         "--out", str(tmp_path / "si")]
    )  # fmt: skip
    assert len([k for k in summary["set_interactions"] if k.startswith("zero/pairs/")]) == 15
    assert "Plotly.newPlot" in (tmp_path / "si" / "pairs_zero.html").read_text()
    with pytest.raises(FlagError, match="add single"):
        step_importance.main(["--limit", "4", "--scopes", "pairs", "--out", str(tmp_path / "bad")])
