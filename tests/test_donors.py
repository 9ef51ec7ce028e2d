"""Several donors or noise seeds per problem: draw 0 is the single-donor sweep, draw d swaps in problem i + 1 + d,
and tables average a problem's draws before the CI over problems."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.importance import Ablation, importance_rows, importance_table, step_importance
from codi_lens.interventions import AblationInputs


@pytest.fixture(scope="module")
def chain():
    return load_codi("toy-chain"), load_problems("toy-chain:test", limit=8)


COLUMNS = ["problem_id", "intervention", "scope", "thought", "prediction", "kl", "logprob_change"]


def test_draw_zero_is_the_single_donor_sweep_and_draw_one_the_next_donor(chain, tmp_path):
    model, problems = chain
    kwargs = dict(interventions=["swap", "noise"], scopes=["single"], max_new_tokens=32, progress=False)
    one, _ = step_importance(model, problems, tmp_path / "one", **kwargs)
    two, _ = step_importance(model, problems, tmp_path / "two", draws=2, **kwargs)
    assert set(two["draw"]) == {0, 1} and set(one["draw"]) == {0}
    first = two[two["draw"] == 0][COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, one[COLUMNS].reset_index(drop=True))
    # Draw 1's swap donor of problem i is problem i + 2, from an independent run of those questions.
    donors = model.run_latents(
        [problems[(i + 2) % len(problems)].question for i in range(len(problems))]
    ).thought_embeds
    ablations = [Ablation("swap", "single", k, (k,)) for k in range(1, 7)]
    expected = importance_rows(
        model,
        problems,
        ablations,
        lambda b: AblationInputs(b.thought_embeds, donors, None, [0] * len(problems), 0),
        max_new_tokens=32,
    )
    order = ["problem_id", "thought"]
    found = two[(two["draw"] == 1) & (two["intervention"] == "swap")].sort_values(order)
    expected = expected.sort_values(order)
    np.testing.assert_allclose(found["kl"].to_numpy(), expected["kl"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert (found["prediction"].to_numpy() == expected["prediction"].to_numpy()).all()
    noise = two[two["intervention"] == "noise"].pivot_table(
        index=["problem_id", "thought"], columns="draw", values="kl"
    )
    assert (noise[0] != noise[1]).all()  # another seed, other noise


def test_tables_average_each_problems_draws_before_the_ci():
    """Two problems, two draws each: problem a breaks in one draw of two (0.5), problem b in both (1.0): the mean
    is 0.75 over n = 2 problems; the draws' means are 0.5 and 1.0, so their sd is 0.3536."""
    frame = pd.DataFrame(
        {
            "problem_id": ["a", "a", "b", "b"],
            "intervention": ["swap"] * 4,
            "scope": ["single"] * 4,
            "thought": [1] * 4,
            "draw": [0, 1, 0, 1],
            "baseline_correct": [True] * 4,
            "correct": [True, False, False, False],
            "prediction": [1.0, 2.0, 2.0, 2.0],
            "baseline_prediction": [1.0] * 4,
            "kl": [0.0, 1.0, 1.0, 1.0],
        }
    )
    table = importance_table(frame)
    assert table["n"].tolist() == [2] and table["n_draws"].tolist() == [2]
    assert table["importance"].iloc[0] == pytest.approx(0.75)
    assert table["importance_draw_sd"].iloc[0] == pytest.approx(np.std([0.5, 1.0], ddof=1))
