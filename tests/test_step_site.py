"""Step importance at a residual site: the input of layer 0 at thought k is the fed thought, so every intervention
there equals the same intervention on the fed thought; at a later site, an ablation is one run with that
activation changed at thought k."""

from __future__ import annotations

import numpy as np
import pytest

from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.importance import step_importance
from codi_lens.interventions import zero_at
from codi_lens.interventions.steps import StepSite

COLUMNS = ["prediction", "kl", "kl_first_token", "logprob_change"]


@pytest.fixture(scope="module")
def chain():
    return load_codi("toy-chain"), load_problems("toy-chain:test", limit=8)


def test_every_intervention_at_layer_0s_input_is_the_same_on_the_fed_thought(chain, tmp_path):
    model, problems = chain
    kwargs = dict(scopes=["single", "all"], max_new_tokens=32, progress=False)
    fed, _ = step_importance(model, problems, tmp_path / "fed", **kwargs)
    site, _ = step_importance(model, problems, tmp_path / "site", site="blocks.0.hook_resid_pre", **kwargs)
    assert set(fed["intervention"]) == {"zero", "mean", "noise", "swap", "shuffle"}
    assert set(site["site"]) == {"blocks.0.hook_resid_pre"} and set(fed["site"]) == {"thought_input"}
    for column in COLUMNS:
        np.testing.assert_allclose(site[column].to_numpy(float), fed[column].to_numpy(float), rtol=1e-5, atol=1e-5)


def test_zeroing_a_residual_at_thought_k_is_one_run_with_it_zeroed(chain, tmp_path):
    model, problems = chain
    name = "blocks.0.hook_resid_post"
    rows, _ = step_importance(
        model, problems, tmp_path / "r", interventions=["zero"], scopes=["single"], site=name, max_new_tokens=32,
        progress=False,
    )  # fmt: skip
    questions = [p.question for p in problems]
    for k in (1, 4):
        run = model.run_codi(questions, max_new_tokens=32, fwd_hooks=zero_at(model, name, [f"thought:{k}"]))
        _, expected = model.decode_answers(run.answer_tokens)
        found = rows[rows["thought"] == k]["prediction"].to_numpy(float)
        np.testing.assert_array_equal(found, np.array([np.nan if p is None else p for p in expected], dtype=float))
    fed, _ = step_importance(
        model, problems, tmp_path / "f", interventions=["zero"], scopes=["single"], max_new_tokens=32, progress=False
    )
    assert not np.allclose(rows["kl"].to_numpy(float), fed["kl"].to_numpy(float))  # another site, other effects


def test_a_step_site_has_a_position_axis():
    with pytest.raises(ValueError, match="position axis"):
        StepSite("thought.3.hook_hidden")
    assert StepSite().name == "thought_input"
