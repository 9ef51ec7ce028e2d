"""The causal feature screen against one run per feature, statsmodels' Benjamini-Hochberg, a dead feature and a
planted one; feature ids and their audit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from statsmodels.stats.multitest import multipletests

from codi_lens import Site, load_pretrained
from codi_lens.core.names import sae_hook_name
from codi_lens.data import load_problems
from codi_lens.feature_screen import (
    CONTROL,
    MIN_PROBLEMS,
    ScreenedFeature,
    screen_block,
    screen_features,
    select_causal,
    site_activations,
)
from codi_lens.metrics import find_answer_number, number_scores
from codi_lens.saes import SAEError, feature_edit, site_metadata
from codi_lens.saes.edits import random_direction_edit
from codi_lens.saes.ids import audit_feature_ids, feature_id, parse_feature_id, saes_by_site
from codi_lens.saes.splice import attached

SITE = Site("thought.3.hook_hidden")
D_SAE = 12
PLANTED, DEAD = 3, 7


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


@pytest.fixture(scope="module")
def problems():
    return load_problems("toy-chain:test", limit=12)


def hand_sae(site: Site, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor) -> StandardSAE:
    """A ReLU SAE with the given weights (no decoder bias), its site in its metadata."""
    cfg = StandardSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1], apply_b_dec_to_input=False)
    for key, value in site_metadata(site).items():
        cfg.metadata[key] = value
    sae = StandardSAE(cfg)
    sae.load_state_dict({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": torch.zeros(w_enc.shape[0])})
    return sae


@pytest.fixture(scope="module")
def planted(model, problems):
    """Small random features at h_3, a feature that is never active (a hugely negative bias) with a large
    decoder row, and a planted feature: always active at 1 (no input weights, bias 1) whose decoder row is
    three times the mean h_3, so ablating it (error term on: the site becomes h_3 - row) moves the answer."""
    generator = torch.Generator().manual_seed(0)
    d = model.cfg.d_model
    w_enc = torch.randn(d, D_SAE, generator=generator) / d**0.5
    b_enc = torch.full((D_SAE,), 0.1)
    w_dec = torch.randn(D_SAE, d, generator=generator) * 0.01
    result = model.run_codi([p.question for p in problems], max_new_tokens=1)
    w_enc[:, PLANTED], b_enc[PLANTED] = 0.0, 1.0
    w_dec[PLANTED] = 3 * result.latent_states[:, SITE.thought].float().mean(0)
    w_enc[:, DEAD], b_enc[DEAD], w_dec[DEAD] = 0.0, -1e4, 50.0
    return hand_sae(SITE, w_enc, b_enc, w_dec)


def _gold_forced(model, problems):
    """The gold answer in the model's words, built by hand: toy-chain writes ``The answer is : N``."""
    answers = model.run_codi([p.question for p in problems], max_new_tokens=16).answer_tokens
    texts = [model.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    assert all(t.startswith("The answer is :") for t in texts), texts
    numbers = []
    for p in problems:
        ids = model.tokenizer(f"The answer is : {int(p.gold)}", add_special_tokens=False)["input_ids"]
        numbers.append(find_answer_number(model.tokenizer, ids))
    return numbers


def test_batched_screen_equals_one_run_per_feature(model, problems, planted):
    """Every edit as a branch of one trunk, many per forward, against each edit in a full run of its own
    (float32): the gold number's log-probability change and KL to 1e-5, the answers' correctness exactly."""
    acts = site_activations(model, planted, [p.question for p in problems])
    features = [ScreenedFeature(SITE.id, f, float(acts[:, f].max())) for f in (0, 1, PLANTED)]
    rows = screen_block(model, planted, problems, features, max_new_tokens=16, max_rows=40)
    numbers = _gold_forced(model, problems)
    questions = [p.question for p in problems]
    with attached(model, [planted], use_error_term=True):
        base_logits, base = number_scores(model, questions, numbers)
        base_correct = np.array(
            [x == p.gold for x, p in zip(model.run_codi(questions, max_new_tokens=16).prediction, problems)]
        )
        for feature in features:
            for op in ("ablate", "clamp", CONTROL):
                if op == CONTROL:
                    hooks = random_direction_edit(
                        model,
                        planted,
                        feature.feature,
                        feature.clamp_value,
                        acts[:, feature.feature],
                        seed=_seed(feature),
                    )
                else:
                    hooks = feature_edit(planted, [feature.feature], op, 0.0 if op == "ablate" else feature.clamp_value)
                logits, edited = number_scores(model, questions, numbers, fwd_hooks=hooks)
                predictions = model.run_codi(questions, max_new_tokens=16, fwd_hooks=hooks).prediction
                mine = rows[(rows["feature"] == feature.feature) & (rows["op"] == op)]
                change = (edited - base).numpy()
                kl = (
                    (
                        base_logits.double().log_softmax(-1).exp()
                        * (base_logits.double().log_softmax(-1) - logits.double().log_softmax(-1))
                    )
                    .sum(-1)
                    .numpy()
                )
                if op == "ablate":  # where the feature is inactive the screen writes an exact 0
                    inactive = ~mine["active"].to_numpy()
                    change[inactive], kl[inactive] = 0.0, 0.0
                np.testing.assert_allclose(mine["gold_logprob_change"], change, atol=1e-5)
                np.testing.assert_allclose(mine["kl"], kl, atol=1e-5)
                correct = np.array([x == p.gold for x, p in zip(predictions, problems)])
                expected = correct.astype(float) - base_correct
                if op == "ablate":
                    expected[~mine["active"].to_numpy()] = 0.0
                np.testing.assert_array_equal(mine["correct_change"], expected)
    planted_ablation = rows[(rows["feature"] == PLANTED) & (rows["op"] == "ablate")]
    assert planted_ablation["gold_logprob_change"].mean() < -1.0  # the comparison is not between two no-ops


def _seed(feature: ScreenedFeature) -> int:
    from codi_lens.feature_screen import control_seed

    return control_seed(feature)


def test_a_dead_feature_is_exactly_zero_and_never_selected(model, problems, planted, tmp_path):
    acts = site_activations(model, planted, [p.question for p in problems])
    assert not (acts[:, DEAD] > 0).any()
    # forced into the screen, its ablation is exactly 0 everywhere (inactive: nothing to remove), and it has no clamp
    rows = screen_block(model, planted, problems, [ScreenedFeature(SITE.id, DEAD, float("nan"))], max_new_tokens=8)
    assert set(rows["op"]) == {"ablate"} and (rows["gold_logprob_change"] == 0.0).all() and (rows["kl"] == 0.0).all()
    screen, _ = screen_features(model, {SITE.id: planted}, problems, tmp_path, max_new_tokens=8, progress=False)
    dead = screen.features.set_index("feature").loc[DEAD]
    assert not dead["live"] and not dead["screened"]
    assert feature_id(SITE, DEAD) not in set(screen.summary["feature_id"]) | set(screen.causal["feature_id"])


def test_the_planted_feature_comes_first_and_selection_is_statsmodels_bh(model, problems, planted, tmp_path):
    screen, _ = screen_features(model, {SITE.id: planted}, problems, tmp_path, max_new_tokens=8, progress=False)
    summary = screen.summary
    # the p-values are t-tests of the per-problem effect, recomputed here from the rows
    row = summary[(summary["feature"] == PLANTED) & (summary["op"] == "ablate")].iloc[0]
    cells = screen.rows[(screen.rows["feature"] == PLANTED) & (screen.rows["op"] == "ablate") & screen.rows["active"]]
    assert row["p_value"] == pytest.approx(scipy.stats.ttest_1samp(cells["gold_logprob_change"], 0).pvalue, rel=1e-9)
    tested = summary["p_value"].notna()  # an edit tested on fewer than MIN_PROBLEMS problems has no p, no q
    assert (summary.loc[~tested, "n"] < MIN_PROBLEMS).all() and (summary.loc[tested, "n"] >= MIN_PROBLEMS).all()
    assert summary.loc[~tested, ["q_value", "cohens_d"]].isna().all().all() and tested.any()
    reject, q, _, _ = multipletests(summary.loc[tested, "p_value"], alpha=0.05, method="fdr_bh")
    np.testing.assert_allclose(summary.loc[tested, "q_value"], q, rtol=1e-12)
    assert (summary.loc[tested, "significant"] == reject).all() and not summary.loc[~tested, "significant"].any()
    assert screen.causal.iloc[0]["feature_id"] == feature_id(SITE, PLANTED)
    assert screen.causal.iloc[0]["best_op"] == "ablate"
    # a clamp cell is its change minus its control's, problem by problem
    clamp = summary[(summary["feature"] == 0) & (summary["op"] == "clamp")].iloc[0]
    paired = screen.rows[screen.rows["feature"] == 0].pivot(
        index="problem_id", columns="op", values="gold_logprob_change"
    )
    difference = paired["clamp"] - paired[CONTROL]
    assert clamp["effect"] == pytest.approx(difference.mean(), abs=1e-12)
    assert clamp["cohens_d"] == pytest.approx(difference.mean() / difference.std(ddof=1), rel=1e-9)


def test_selection_keeps_the_strongest_passing_features_per_site():
    summary = pd.DataFrame(
        {
            "feature_id": ["a/1", "a/1", "a/2", "a/3", "b/1"],
            "site": ["a", "a", "a", "a", "b"],
            "feature": [1, 1, 2, 3, 1],
            "op": ["ablate", "clamp", "ablate", "ablate", "clamp"],
            "cohens_d": [0.5, -2.0, 1.0, 3.0, 0.1],
            "effect": [0.2, -0.3, 0.1, 0.5, 0.06],
            "q_value": [0.01, 0.01, 0.04, 0.2, 0.01],
            "significant": [True, True, True, False, True],
        }
    )
    causal = select_causal(summary, top_per_site=1)
    assert causal["feature_id"].tolist() == ["a/1", "b/1"]  # a/3 is strongest but does not pass
    assert causal["best_op"].tolist() == ["clamp", "clamp"] and causal["cohens_d"].tolist() == [-2.0, 0.1]
    assert select_causal(summary, top_per_site=5)["feature_id"].tolist() == ["a/1", "a/2", "b/1"]
    # an effect under min_effect nats does not select its feature, however significant
    assert select_causal(summary, top_per_site=5, min_effect=0.08)["feature_id"].tolist() == ["a/1", "a/2"]


def test_feature_ids_round_trip_and_the_audit_names_orphans(planted):
    assert feature_id(SITE, 417) == "thought.3.hook_hidden/417"
    assert parse_feature_id("blocks.1.hook_resid_post@3/12") == (Site.at_thought("blocks.1.hook_resid_post", 3), 12)
    with pytest.raises(SAEError, match="not a feature id"):
        parse_feature_id("thought.3.hook_hidden")
    with pytest.raises(SAEError, match="two SAEs at thought.3.hook_hidden"):
        saes_by_site({"a": planted, "b": planted})
    tables = {
        "screen": pd.DataFrame({"feature_id": [feature_id(SITE, 0), feature_id(SITE, D_SAE)]}),
        "tokens": pd.DataFrame({"feature_id": ["thought.4.hook_hidden/1", "nonsense"]}),
        "bare": pd.DataFrame({"feature": [1]}),
    }
    orphans = audit_feature_ids(tables, {"x": planted})
    width = f"feature {D_SAE} >= d_sae {D_SAE}"
    assert orphans[["table", "feature_id", "reason"]].values.tolist()[:3] == [
        ["screen", f"thought.3.hook_hidden/{D_SAE}", width],
        ["tokens", "nonsense", "malformed"],
        ["tokens", "thought.4.hook_hidden/1", "no SAE at site thought.4.hook_hidden"],
    ]
    assert orphans.iloc[3]["table"] == "bare" and orphans.iloc[3]["reason"] == "no feature_id column"
    assert len(orphans) == 4
    assert audit_feature_ids({"screen": tables["screen"].head(1)}, {"x": planted}).empty


def test_named_features_reads_the_screen(tmp_path):
    from codi_lens.feature_screen import named_features

    summary = pd.DataFrame(
        {
            "feature_id": ["a@1/1", "a@1/1", "a@1/2", "a@1/3", "b@2/7", "b@2/8"],
            "site": ["a@1", "a@1", "a@1", "a@1", "b@2", "b@2"],
            "cohens_d": [0.1, -0.9, 0.5, float("nan"), 0.2, -0.3],
        }
    )
    summary.to_parquet(tmp_path / "summary.parquet")
    assert named_features("strongest:2", tmp_path) == [
        "a@1/1",
        "a@1/2",
        "b@2/8",
        "b@2/7",
    ]  # per site, |d|, untested last
    assert named_features("strongest:9", tmp_path)[-1] == "a@1/3"  # ranked over every site, untested last
    pd.DataFrame({"feature_id": []}, dtype=str).to_parquet(tmp_path / "causal.parquet")
    with pytest.raises(SAEError, match="selected no feature"):
        named_features("causal", tmp_path)
    with pytest.raises(SAEError, match="not a feature id"):
        named_features("thought.3.hook_hidden", tmp_path)
    assert named_features("thought.3.hook_hidden/4, thought.5.hook_hidden/1", tmp_path) == [
        "thought.3.hook_hidden/4",
        "thought.5.hook_hidden/1",
    ]


def test_the_clamp_control_pushes_at_its_thought_only(model, problems):
    """At a hook with a position axis, the control's push lands on the SAE's thought (thought 3 here): the SAE's
    output differs from the unedited run's there by the push itself and not at all at any earlier position
    (later ones follow from it through the loop). Float32, 1e-4."""
    site = Site.at_thought("blocks.0.hook_resid_post", 3)
    d = model.cfg.d_model
    sae = hand_sae(
        site, torch.zeros(d, 4), torch.ones(4), torch.randn(4, d, generator=torch.Generator().manual_seed(1))
    )
    questions = [p.question for p in problems[:3]]
    before = torch.ones(3)  # every feature is active at 1 (no input weights, bias 1)
    hooks = random_direction_edit(model, sae, 2, 5.0, before, seed=7)
    name = sae_hook_name(site.hook, "output")
    with attached(model, [sae], use_error_term=True):
        _, plain = model.run_codi_with_cache(questions, names_filter=name, max_new_tokens=1)
        result, pushed = model.run_codi_with_cache(questions, names_filter=name, max_new_tokens=1, fwd_hooks=hooks)
    difference = (pushed[name] - plain[name]).norm(dim=-1)  # [batch, pos]
    at = result.positions.thoughts[2]
    expected = 4.0 * float(sae.W_dec[2].detach().norm())  # (value - before) * |W_dec[2]| along a unit direction
    torch.testing.assert_close(difference[:, at], torch.full((3,), expected), rtol=1e-4, atol=1e-4)
    assert float(difference[:, :at].max()) < 1e-4
