"""Feature analysis, token association and feature pathways, against hand-computed values and small real
interventions (a gradient is checked against the change a small scaling of the feature really makes)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from codi_lens import Site, load_pretrained
from codi_lens.activations import collect_activations
from codi_lens.core.errors import FlagError
from codi_lens.data import Problem, load_problems
from codi_lens.features import feature_frequency, token_association, top_examples
from codi_lens.pathways import feature_attributions, site_order, target_activation
from codi_lens.saes import SAEError, SAERecipe, encode_decode, feature_edit, load_saes, save_sae, train_sae

SITES = [Site("thought.2.hook_hidden"), Site.at_thought("blocks.1.hook_resid_post", 3)]


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


@pytest.fixture(scope="module")
def sae_dir(model, tmp_path_factory):
    """Standard (ReLU + L1) SAEs at thought 2's final state and at layer 1 of thought 3, saved as
    ``experiments.train_saes`` saves them."""
    root = tmp_path_factory.mktemp("saes")
    data = collect_activations(model, load_problems("toy-chain:train", limit=256), SITES, root / "acts", progress=False)
    recipe = SAERecipe(architecture="standard", d_sae=128, l1_coefficient=1.0, batch_size=64, training_samples=16000)
    for site in SITES:
        sae = train_sae(data.load(site)[0], recipe, site, progress=False)
        save_sae(sae, root / "saes" / f"{site.id}-standard")
    return root


def _problem(i: int, values: tuple[float, ...]) -> Problem:
    return Problem(f"p{i}", f"question {i}", "", values[-1], len(values), "hand", "test", i, values)


def test_frequency_and_top_examples_by_hand():
    acts = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    freq = feature_frequency(acts)
    assert freq["frequency"].tolist() == [0.5, 0.25, 0.75]
    assert freq["mean_when_active"].tolist() == [2.0, 2.0, 2.0]
    assert freq["max_activation"].tolist() == [3.0, 2.0, 4.0]
    problems = [_problem(i, (i + 1.0, 10.0 * i)) for i in range(4)]
    top = top_examples(acts, problems, [0, 1], k=3, site=Site("thought.2.hook_hidden"))
    assert top[top["feature"] == 0]["problem_id"].tolist() == ["p1", "p2"]  # inactive problems are left out
    assert top[top["feature"] == 1]["problem_id"].tolist() == ["p0"]
    assert top.iloc[0]["intermediates"] == "2;10" and top.iloc[0]["thought"] == 2


def test_token_association_counts_by_hand():
    reference = [["a", "x"], ["a"], ["a", "y"]]  # 5 tokens: a 3, x 1, y 1
    intervened = [["b", "x"], ["b"], ["b", "b"]]  # 5 tokens: b 4 (twice in one answer), x 1
    table = token_association(reference, intervened).set_index("token")
    assert table.loc["b", ["count_intervened", "count_reference", "answers_intervened"]].tolist() == [4, 0, 3]
    # b: [[4, 1], [0, 5]] of 10 tokens, 4 of them b; P(X=4) = C(6,1)/C(10,5) = 6/252, and X=0 is as extreme
    assert table.loc["b", "p_value"] == pytest.approx(12 / 252)
    # a: [[0, 5], [3, 2]]: P(X=0) = P(X=3) = C(7,5)/252 = 21/252, X=1 and 2 are likelier
    assert table.loc["a", "p_value"] == pytest.approx(42 / 252)
    assert table.loc["x", "p_value"] == pytest.approx(1.0) and table.loc["x", "log_odds"] == pytest.approx(0.0)
    assert table.loc["b", "log_odds"] == pytest.approx(np.log(4.5 / 1.5) - np.log(0.5 / 5.5))  # prior 0.5 per cell
    assert table.loc["a", "log_odds"] == pytest.approx(np.log(0.5 / 5.5) - np.log(3.5 / 2.5))
    # Benjamini-Hochberg by hand over the 4 tokens' p-values: rank r -> min_{j>=r} p_j m / j
    p = table["p_value"].sort_values().to_numpy()
    by_hand = np.minimum.accumulate((p * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
    assert np.allclose(np.sort(table["q_value"].to_numpy()), np.minimum(by_hand, 1.0))
    assert table.loc["b", "q_value"] == pytest.approx(4 * 12 / 252) and not table["significant"].any()
    assert table["large_effect"].to_dict() == {"b": True, "a": True, "y": True, "x": False}
    assert not table["flagged"].any()
    many = token_association([["a"]] * 40, [["b"]] * 40)
    assert many.set_index("token")["flagged"].to_dict() == {"a": True, "b": True}


def test_benjamini_hochberg_step_up_by_hand():
    """Three tokens written 20, 12 and 6 times in 20 intervened answers and never in 20 reference ones (which write
    ``r`` once each): their q-values follow the step-up rule written out here (q of rank r = min over ranks
    j >= r of p_j m / j)."""
    reference = [["r"] for _ in range(20)]
    intervened = [["t1"] for _ in range(20)]
    for i in range(12):
        intervened[i].append("t2")
    for i in range(6):
        intervened[i].append("t3")
    table = token_association(reference, intervened).set_index("token")
    p = table["p_value"]
    ranked = p.sort_values()
    m = len(p)
    expected = {}
    running = 1.0
    for rank in range(m, 0, -1):  # step-up from the largest p-value
        token = ranked.index[rank - 1]
        running = min(running, ranked.iloc[rank - 1] * m / rank)
        expected[token] = running
    for token, q in expected.items():
        assert table.loc[token, "q_value"] == pytest.approx(q)
    assert table.loc["t1", "significant"] and table.loc["t2", "significant"]


def test_site_order_follows_the_loop():
    order = [
        Site.at_thought("thought.2.hook_input", 2),
        Site.at_thought("blocks.0.hook_resid_post", 2),
        Site.at_thought("blocks.1.hook_resid_post", 2),
        Site.at_thought("thought.2.hook_hidden", 2),
        Site.at_thought("thought.3.hook_input", 3),
    ]
    assert sorted(order, key=site_order) == order


def test_attribution_predicts_a_small_scaling_of_the_source(model, sae_dir):
    saes = load_saes(sae_dir)
    source, target = saes["thought.2.hook_hidden-standard"], saes["blocks.1.hook_resid_post@3-standard"]
    questions = [p.question for p in load_problems("toy-chain:test", limit=32)]
    every = target_activation(model, questions, target, None, [source, target])
    # Read at thought 3's own position: equal to the SAE applied there in a plain cached run.
    result, cache = model.run_codi_with_cache(questions, names_filter="blocks.1.hook_resid_post", max_new_tokens=1)
    at_thought_3, _ = encode_decode(target, cache["blocks.1.hook_resid_post"][:, result.positions.thoughts[2]])
    assert np.allclose(every, at_thought_3.numpy(), atol=1e-4)
    feature = int((every > 0).mean(0).argmax())
    attributions, value = feature_attributions(model, questions, target, feature, [source])
    assert np.allclose(value, every[:, feature], atol=1e-5)  # the gradient run is the spliced run
    ranked = attributions.assign(size=attributions["attribution"].abs()).sort_values("size", ascending=False)
    best = ranked.groupby("source_feature")["size"].sum().idxmax()
    mine = attributions[attributions["source_feature"] == best].set_index("problem")
    epsilon = 0.02
    scaled = target_activation(
        model,
        questions,
        target,
        feature,
        [source, target],
        fwd_hooks=feature_edit(source, [best], "scale", 1 - epsilon),
    )
    actual = scaled - every[:, feature]
    predicted = np.zeros(len(questions))
    predicted[mine.index] = epsilon * mine["attribution"]  # a (1 - eps) scaling is eps of an ablation
    assert np.abs(predicted).max() > 1e-4
    assert np.abs(actual - predicted).max() <= 0.1 * np.abs(predicted).max() + 1e-5
    with pytest.raises(SAEError, match="not computed before the target"):
        feature_attributions(model, questions, source, 0, [target])


def test_feature_pathways_experiment_agrees_with_replay(sae_dir, tmp_path):
    from experiments import feature_pathways

    summary = feature_pathways.main(
        ["--saes", str(sae_dir), "--limit", "48", "--candidates", "6", "--out", str(tmp_path)]
    )
    table = pd.read_parquet(tmp_path / "results.parquet")
    assert summary["target"] == "blocks.1.hook_resid_post@3-standard"
    assert summary["sources"] == ["thought.2.hook_hidden-standard"]
    assert len(table) == 6 * 48 and {"problem_id", "predicted", "actual"} <= set(table.columns)
    low, high = summary["pearson_ci95"]
    assert low <= summary["pearson"] <= high and summary["pearson"] > 0.8
    assert (tmp_path / "pathways.html").read_text().count("plotly") > 0
    # 48 problems in batches of 16 (the default) against one batch: each problem's gradient is its own.
    flags = ["--saes", str(sae_dir), "--limit", "48", "--candidates", "6", "--batch-size", "48"]
    feature_pathways.main([*flags, "--out", str(tmp_path / "one")])
    batched, whole = (pd.read_parquet(d / "attributions.parquet") for d in (tmp_path, tmp_path / "one"))
    assert batched["problem"].max() == 47 and len(batched) == len(whole)
    keys = ["problem", "source_site", "source_feature"]
    batched, whole = (t.sort_values(keys).reset_index(drop=True) for t in (batched, whole))
    assert (batched[keys] == whole[keys]).all().all()
    assert np.allclose(batched["attribution"], whole["attribution"], atol=1e-6)


def test_sae_features_experiment_writes_tables_and_a_browser(sae_dir, tmp_path):
    from experiments import sae_features

    flags = ["--saes", str(sae_dir), "--limit", "40", "--top-features", "4", "--intervene", "1"]
    summary = sae_features.main([*flags, "--max-new-tokens", "16", "--out", str(tmp_path)])
    table = pd.read_parquet(tmp_path / "results.parquet")
    assert set(table["sae_id"]) == {"thought.2.hook_hidden-standard", "blocks.1.hook_resid_post@3-standard"}
    assert len(table) == 2 * 128
    profile = pd.read_parquet(tmp_path / "position_profile.parquet")
    own = profile[profile["own"]]
    assert set(zip(own["sae_id"], own["thought"])) == {
        ("thought.2.hook_hidden-standard", 2),
        ("blocks.1.hook_resid_post@3-standard", 3),
    }
    merged = own.merge(table, on=["sae_id", "feature"])  # the profile at the SAE's own thought is its frequency
    assert np.allclose(merged["frequency_x"], merged["frequency_y"], atol=1e-6)
    examples = pd.read_parquet(tmp_path / "top_examples.parquet")
    for _, group in examples.groupby(["sae_id", "feature"]):
        assert group["activation"].is_monotonic_decreasing
    tokens = pd.read_parquet(tmp_path / "token_association" / "results.parquet")
    assert {"token", "log_odds", "p_value", "q_value", "significant"} <= set(tokens.columns)
    assert len(summary["interventions"]) == 2
    for effect in summary["interventions"].values():
        low, high = effect["logprob_change_ci95"]
        assert low <= effect["logprob_change"] <= high
    html = (tmp_path / "dashboard_thought.2.hook_hidden-standard.html").read_text()
    assert "updatemenus" in html and json.loads((tmp_path / "run.json").read_text())["settings"]["intervene"] == 1


def test_feature_interventions_score_the_whole_answer_number(model, sae_dir, tmp_path):
    """``feature_interventions``' ``logprob_change`` is the mean over problems of ``log p`` summed over every
    token of the plain answer number, SAE spliced with its error term and the feature clamped, minus the
    plain run's: computed here from two teacher-forced runs per problem."""
    from codi_lens.features import FeatureSurvey, feature_interventions
    from codi_lens.metrics import find_answer_number
    from codi_lens.saes.splice import attached

    saes = load_saes(sae_dir / "saes", ["thought.2.hook_hidden-standard"])
    (sae_id, sae), feature, value = next(iter(saes.items())), 5, 30.0
    table = pd.DataFrame(
        {"sae_id": [sae_id], "site": ["thought.2.hook_hidden"], "feature": [feature], "frequency": [1.0]}
    ).assign(mean_when_active=1.0, max_activation=value / 10.0)
    problems = load_problems("toy-chain:test", limit=6)
    survey = FeatureSurvey(table, None, {})
    rows = feature_interventions(model, saes, problems, survey, tmp_path, intervene=1, max_new_tokens=16)
    questions = [p.question for p in problems]
    changes = []
    for question, tokens in zip(questions, model.run_codi(questions, max_new_tokens=16).answer_tokens):
        number = find_answer_number(model.tokenizer, tokens)
        forced = [list(number.prefix) + list(number.tokens)]
        before = model.score_answers([question], forced).logits[0].double().log_softmax(-1)
        with attached(model, [sae], use_error_term=True):
            edit = feature_edit(sae, [feature], "clamp", value)
            after = model.score_answers([question], forced, fwd_hooks=edit).logits[0].double().log_softmax(-1)
        answer_rows = range(number.index, number.index + len(number.tokens))
        changes.append(sum(float(after[r, t] - before[r, t]) for r, t in zip(answer_rows, number.tokens)))
    first = rows.iloc[0]
    assert first["n_scored"] == len(problems)
    assert first["logprob_change"] == pytest.approx(np.mean(changes), abs=1e-4)
    assert abs(np.mean(changes)) > 1e-2  # the clamp moves the answer, so the comparison means something
    assert first["logprob_change_low"] <= first["logprob_change"] <= first["logprob_change_high"]


def test_many_targets_share_one_forward_and_each_equals_its_own_study(model, sae_dir, tmp_path):
    """Two targets differentiated over one retained graph give each target the attributions it gets alone
    (float32, 1e-6), and one replay per source measures each target as a replay aimed at it alone does."""
    from codi_lens.pathways import many_target_attributions, replay_source, study_pathways
    from codi_lens.saes.ids import audit_feature_ids, feature_id, saes_by_site

    saes = saes_by_site(load_saes(sae_dir))
    source, target = saes["thought.2.hook_hidden"], saes["blocks.1.hook_resid_post@3"]
    questions = [p.question for p in load_problems("toy-chain:test", limit=24)]
    frequent = np.argsort(-(target_activation(model, questions, target, None, [source, target]) > 0).mean(0))[:2]
    ids = [feature_id("blocks.1.hook_resid_post@3", f) for f in frequent]
    together, values = many_target_attributions(model, questions, [(target, int(f)) for f in frequent], [source])
    assert sorted(together["target_id"].unique()) == sorted(ids)
    for column, f in enumerate(frequent):
        alone, value = feature_attributions(model, questions, target, int(f), [source])
        mine = together[together["target_id"] == ids[column]].drop(columns="target_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone, atol=1e-6, rtol=0)
        assert np.allclose(values[:, column], value, atol=1e-6)
    best = together.groupby("source_id")["attribution"].apply(lambda x: x.abs().sum()).idxmax()
    _, source_feature = best.rsplit("/", 1)
    both = replay_source(model, questions, saes, best, ids).numpy()
    clean = replay_source(model, questions, saes, None, ids).numpy()
    for column, f in enumerate(frequent):
        ablated = target_activation(
            model,
            questions,
            target,
            int(f),
            [source, target],
            fwd_hooks=feature_edit(source, [int(source_feature)], "ablate"),
        )
        assert np.allclose(both[:, column], ablated, atol=1e-6)
        assert np.allclose(
            clean[:, column], target_activation(model, questions, target, int(f), [source, target]), atol=1e-6
        )
    study, _ = study_pathways(
        model, load_problems("toy-chain:test", limit=24), saes, ids, tmp_path, n_candidates=3, progress=False
    )
    assert len(study.pathways) == 6 and set(study.agreement["target_id"]) == {*ids, "pooled"}
    tables = {
        "attributions": together.rename(columns={"target_id": "feature_id"}),
        "pathways": study.pathways.rename(columns={"source_id": "feature_id"}),
    }
    assert audit_feature_ids(tables, saes).empty


def test_a_pathway_is_validated_by_its_replayed_ci_and_sign():
    from codi_lens.pathways import pathway_table

    rng = np.random.default_rng(0)
    n = 40
    rows = []
    for source, actual, predicted in [("s/1", 1.0, 0.8), ("s/2", 1.0, -0.8), ("s/3", 0.0, 0.8)]:
        noise = rng.normal(0, 0.1, n) if actual else rng.normal(0, 1.0, n)
        rows.append(
            pd.DataFrame(
                {
                    "target_id": "t/0",
                    "source_id": source,
                    "problem": np.arange(n),
                    "actual": actual + noise,
                    "predicted": predicted + rng.normal(0, 0.1, n),
                }
            )
        )
    table = pathway_table(pd.concat(rows)).set_index("source_id")
    assert table["validated"].to_dict() == {
        "s/1": True,
        "s/2": False,
        "s/3": False,
    }  # right sign; wrong sign; CI holds 0
    assert table.loc["s/1", "low"] > 0 and table.loc["s/3", "low"] < 0 < table.loc["s/3", "high"]


def test_value_encoding_by_hand():
    from codi_lens.feature_report import own_step_shares, shuffled_problems, value_encoding

    problems = [_problem(i, (float(i), float((i * 7) % 5), float(i * i % 11))) for i in range(12)]
    own = [p.intermediates[1] for p in problems]  # a feature of thought 2 that is the value after step 2
    noise = np.random.default_rng(0).normal(size=12)
    activations = pd.concat(
        [
            pd.DataFrame(
                {"feature_id": "thought.2.hook_hidden/0", "problem_id": [p.id for p in problems], "activation": own}
            ),
            pd.DataFrame(
                {"feature_id": "thought.1.hook_hidden/5", "problem_id": [p.id for p in problems], "activation": noise}
            ),
        ]
    )
    table = value_encoding(activations, problems).set_index("feature_id")
    assert table.loc["thought.2.hook_hidden/0", "rho_own"] == pytest.approx(1.0)
    assert (
        table.loc["thought.2.hook_hidden/0", "best_step"] == 2 and table.loc["thought.2.hook_hidden/0", "encodes_own"]
    )
    expected = scipy.stats.spearmanr(noise, [p.intermediates[0] for p in problems])
    assert table.loc["thought.1.hook_hidden/5", "rho_own"] == pytest.approx(expected.statistic)
    assert table.loc["thought.1.hook_hidden/5", "p_own"] == pytest.approx(expected.pvalue)
    moved = shuffled_problems(activations, seed=1)
    for fid, group in moved.groupby("feature_id"):
        original = activations[activations["feature_id"] == fid]
        assert sorted(group["activation"]) == sorted(original["activation"])
        assert (group["problem_id"].to_numpy() != original["problem_id"].to_numpy()).any()
    shares = own_step_shares(table.reset_index(), value_encoding(moved, problems), ["thought.2.hook_hidden/0"])
    assert shares["causal"]["share"] == 1.0 and shares["causal"]["n"] == 1


def test_the_feature_pipeline_joins_on_feature_ids_with_no_orphans(sae_dir, tmp_path):
    """screen -> pathways for chosen targets -> token association of the same features -> the report."""
    from experiments import feature_pathways, feature_report, feature_screen, sae_features

    common = ["--saes", str(sae_dir), "--limit", "24"]
    feature_screen.main([*common, "--top-frequent", "4", "--max-new-tokens", "8", "--out", str(tmp_path / "screen")])
    summary = pd.read_parquet(tmp_path / "screen" / "summary.parquet")
    targets = summary[summary["site"] == "blocks.1.hook_resid_post@3"]
    targets = targets.assign(strength=targets["cohens_d"].abs()).sort_values("strength").tail(2)["feature_id"].tolist()
    feature_pathways.main(
        [*common, "--targets", ",".join(targets), "--candidates", "3", "--out", str(tmp_path / "paths")]
    )
    chosen = ["--intervene-features", ",".join(targets), "--max-new-tokens", "8"]
    sae_features.main([*common, *chosen, "--top-features", "3", "--out", str(tmp_path / "features")])
    folders = ["--screen", str(tmp_path / "screen"), "--pathways", str(tmp_path / "paths")]
    result = feature_report.main(
        [*folders, "--features", str(tmp_path / "features"), "--saes", str(sae_dir), "--out", str(tmp_path / "report")]
    )
    assert result["orphan_ids"] == 0 and pd.read_parquet(tmp_path / "report" / "audit.parquet").empty
    table = pd.read_parquet(tmp_path / "report" / "results.parquet")
    screened = pd.read_parquet(tmp_path / "screen" / "features.parquet")
    assert set(table["feature_id"]) == set(screened.loc[screened["screened"], "feature_id"])
    tokens = pd.read_parquet(tmp_path / "features" / "token_association" / "results.parquet")
    assert set(tokens["feature_id"]) == set(targets)
    assert table.set_index("feature_id").loc[targets, "upstream_validated"].notna().all()
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Causal screen" in html and "Feature id audit" in html and "Plotly" in html
    with pytest.raises(FlagError, match="--targets: .*no SAE at site thought.9.hook_hidden"):
        feature_pathways.main([*common, "--targets", "thought.9.hook_hidden/1", "--out", str(tmp_path / "bad")])
