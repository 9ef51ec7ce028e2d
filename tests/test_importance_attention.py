"""Attention to thoughts against a full HF pass, step importance resumed after a kill, and the experiments."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_hooks import _hf_sequence_embeds, _question_ids

from codi_lens import load_codi
from codi_lens.attention import attention_to_thoughts, correlation_by_layer, pattern_hook_names, thought_to_thought
from codi_lens.data import load_problems
from codi_lens.importance import ablation_grid, importance_rows, importance_table, step_importance
from codi_lens.loading import DEFAULT_MODEL
from experiments import ablation_attention, make_pairs
from experiments import step_importance as step_importance_cli


def test_attention_to_thoughts_reads_the_right_positions(tiny_checkpoint, questions):
    ckpt = tiny_checkpoint("llama")
    model, ref = load_codi(ckpt.checkpoint_dir, ckpt.base_dir), ckpt.reference()
    result, cache = model.run_codi_with_cache(
        questions, names_filter=pattern_hook_names(model.cfg.n_layers), max_new_tokens=3
    )
    ids = [f"q{i}" for i in range(len(questions))]
    frame = attention_to_thoughts(cache, result.positions, ids, n_kv_heads=model.cfg.n_key_value_heads)
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert (frame["kv_head"] == frame["head"] // group).all()
    for i, question in enumerate(questions):
        q_ids = _question_ids(model, question)
        with torch.no_grad():
            out = ref.model(
                inputs_embeds=_hf_sequence_embeds(ref, q_ids, result.thought_embeds[i], result.answer_tokens[i][:-1]),
                output_attentions=True,
            )
        bot = len(q_ids)  # positions in the unpadded sequence: BOT, thoughts bot + k, EOT bot + 7, answer:0 bot + 8
        for source, query in (("eot", bot + 7), ("answer:0", bot + 8)):
            for layer, attentions in enumerate(out.attentions):
                rows = frame[(frame.problem_id == ids[i]) & (frame.layer == layer) & (frame.source == source)]
                ours = torch.tensor(rows.sort_values(["head", "thought"])["weight"].to_numpy()).view(-1, 7)
                expected = attentions[0, :, query, bot : bot + 7]
                assert (ours - expected).abs().max() <= 1e-5
        # Rows of the thought-to-thought matrix are causal and, with the rest of the sequence, sum to 1.
    matrix = thought_to_thought(cache, result.positions, ids)
    assert (matrix[matrix.key_thought > matrix.query_thought]["weight"] == 0).all()
    pattern = cache["blocks.0.attn.hook_pattern"]
    for i in range(len(questions)):
        start = result.positions.n_pad[i]
        visible = pattern[i, :, start:, start:]
        assert torch.allclose(visible.sum(-1), torch.ones(1), atol=1e-5)


def test_correlation_by_layer_matches_scipy_and_its_ci_covers_it():
    from scipy import stats

    rng = torch.Generator().manual_seed(0)
    x = torch.rand(40 * 6, generator=rng).numpy()
    frame = pd.DataFrame(
        {"problem_id": [f"p{i // 6}" for i in range(240)], "layer": 0, "attention": x, "kl": x + 0.3 * (x**2)}
    )
    table = correlation_by_layer(frame, "attention", "kl", n_resamples=200).iloc[0]
    assert table.spearman == pytest.approx(1.0) and table.n_problems == 40
    assert table.pearson == pytest.approx(stats.pearsonr(frame.attention, frame.kl)[0])
    assert table.pearson_low <= table.pearson <= table.pearson_high
    noisy = frame.assign(kl=frame.kl + torch.rand(240, generator=rng).numpy())
    table = correlation_by_layer(noisy, "attention", "kl", n_resamples=200).iloc[0]
    assert table.spearman == pytest.approx(stats.spearmanr(noisy.attention, noisy.kl)[0])
    assert table.spearman_low < table.spearman < table.spearman_high


@pytest.fixture(scope="module")
def toy():
    return load_codi("toy-arith"), load_problems("toy:test", limit=6)


def test_step_importance_resumes_after_a_kill_to_the_uninterrupted_table(toy, tmp_path, monkeypatch):
    model, problems = toy
    kwargs = dict(
        interventions=["zero", "noise", "swap", "shuffle"],
        scopes=["single", "all"],
        batch_size=2,
        max_new_tokens=24,
        progress=False,
    )
    whole, _ = step_importance(model, problems, tmp_path / "whole", **kwargs)
    assert len(whole) == len(problems) * len(ablation_grid(kwargs["interventions"], kwargs["scopes"]))
    assert {
        "problem_id",
        "n_steps",
        "intervention",
        "scope",
        "thought",
        "baseline_correct",
        "correct",
        "prediction",
        "kl",
    } <= set(whole.columns)

    import codi_lens.importance as importance

    calls = {"n": 0}
    real = importance.importance_rows

    def dies_on_the_second_batch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kw)

    monkeypatch.setattr(importance, "importance_rows", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        step_importance(model, problems, tmp_path / "killed", **kwargs)
    monkeypatch.setattr(importance, "importance_rows", real)
    resumed, _ = step_importance(model, problems, tmp_path / "killed", **kwargs)
    pd.testing.assert_frame_equal(resumed, whole)


def test_importance_rows_against_the_reference(toy, toy_arith_reference):
    """Zeroing thought k, against the HF reference fed a zero vector at thought k: the baseline's and the
    ablated run's predictions, and KL(baseline || ablated) in nats at the position predicting the baseline
    answer's number (the toy answer ends 'is : N' then EOS), written out from the two distributions."""
    model, problems = toy
    reference = toy_arith_reference
    ablations = ablation_grid(["zero"], ["single"], n_latents=6)
    from codi_lens.interventions import AblationInputs

    rows = importance_rows(
        model,
        problems,
        ablations,
        lambda b: AblationInputs(b.thought_embeds, None, None, [0] * 6, 0),
        max_new_tokens=24,
    )
    assert len(rows) == len(problems) * 6
    zero = torch.zeros(model.cfg.d_model)
    for problem in problems:
        base = reference.run(problem.question, max_new_tokens=24)
        number = base["answer_tokens"][:-1]  # up to and with the number, EOS dropped
        assert base["answer_tokens"][-1] == reference.eos_id
        assert reference.tokenizer.decode([number[-1]]) == base["answer_text"].split()[-1]
        p = reference.teacher_forced_logits(problem.question, number)[len(number) - 1].double().log_softmax(-1)
        for k in range(1, 7):
            row = rows[(rows.problem_id == problem.id) & (rows.thought == k)].iloc[0]
            assert row["baseline_prediction"] == float(base["answer_text"].split()[-1])
            ablated = reference.run(problem.question, max_new_tokens=24, replace={k: zero})
            assert row["prediction"] == float(ablated["answer_text"].split()[-1])
            q = reference.teacher_forced_logits(problem.question, number, replace={k: zero})[len(number) - 1]
            kl = float((p.exp() * (p - q.double().log_softmax(-1))).sum())
            assert row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6), (problem.id, k)
            change = float(q.double().log_softmax(-1)[number[-1]] - p[number[-1]])  # the number is one token here
            assert row["logprob_change"] == pytest.approx(change, abs=1e-4), (problem.id, k)
    assert rows["kl"].max() > 0.01  # toy-arith answers mostly from the question; still no comparison of zeros


def test_importance_table_by_hand():
    """Per condition: the share right at baseline and wrong after, the accuracy drop, the share of changed
    answers (two missing answers are the same answer) and the mean KL, each with its percentile bootstrap CI;
    for a 0/1 share that CI follows Binomial(n, share) / n (its 2.5% / 97.5% quantiles, within one step)."""
    from scipy import stats

    n = 100
    breaks = np.arange(n) < 30  # baseline right, ablated wrong on the first 30 problems
    frame = pd.DataFrame(
        {
            "problem_id": [f"p{i}" for i in range(n)],
            "intervention": "zero",
            "scope": "single",
            "thought": 1,
            "baseline_correct": np.arange(n) < 80,
            "correct": (np.arange(n) >= 30) & (np.arange(n) < 90),  # 10 problems go from wrong to right
            "baseline_prediction": np.where(np.arange(n) < 95, 1.0, np.nan),
            # problems 90-94 lose their answer under the ablation (a change); 95-99 have none in either run
            "prediction": np.where(breaks, 2.0, np.where(np.arange(n) < 90, 1.0, np.nan)),
            "kl": np.arange(n) / 100,
        }
    )
    # conditions given out of order come back sorted
    table = importance_table(pd.concat([frame.assign(thought=2, correct=frame["baseline_correct"]), frame]))
    assert table["thought"].tolist() == [1, 2]
    first = table[table.thought == 1].iloc[0]
    assert first["n"] == n and first["importance"] == 0.3 and first["accuracy_drop"] == pytest.approx(0.8 - 0.6)
    assert first["answer_changed"] == 0.35 and first["kl"] == pytest.approx(0.495)
    low, high = stats.binom.ppf([0.025, 0.975], n, 0.3) / n
    assert abs(first["importance_low"] - low) <= 0.01 + 1e-12 and abs(first["importance_high"] - high) <= 0.01 + 1e-12
    second = table[table.thought == 2].iloc[0]
    assert second["importance"] == 0 and second["importance_low"] == second["importance_high"] == 0
    assert second["accuracy_drop"] == 0 and second["answer_changed"] == 0.35


def test_experiments_run_end_to_end(tmp_path):
    summary = step_importance_cli.main(
        [
            "--limit",
            "6",
            "--interventions",
            "zero,shuffle",
            "--scopes",
            "single,all",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "24",
            "--out",
            str(tmp_path / "si"),
        ]
    )
    results = pd.read_parquet(tmp_path / "si" / "results.parquet")
    assert len(results) == 6 * (6 + 1 + 1) and set(summary["zero_single"]) == {1, 2, 3, 4, 5, 6}
    for figure in ("importance.html", "kl.html", "heatmap.html", "difficulty.html"):
        html = (tmp_path / "si" / figure).read_text()
        assert '<script src="https://cdn' not in html and "Plotly.newPlot" in html and len(html) > 1_000_000
    run = json.loads((tmp_path / "si" / "run.json").read_text())
    assert run["settings"]["checkpoint_sha256"] == load_codi(DEFAULT_MODEL).checkpoint_sha256  # no flags: the default
    assert run["settings"]["data_source"] == "toy-chain:test"  # ... and its own test split

    summary = ablation_attention.main(["--limit", "6", "--max-new-tokens", "24", "--out", str(tmp_path / "aa")])
    rows = pd.read_parquet(tmp_path / "aa" / "results.parquet")
    assert {"attention_eot", "attention_answer", "kl", "flipped", "layer", "head", "thought"} <= set(rows.columns)
    assert set(summary["correlation_by_layer"]) == {0, 1}

    summary = make_pairs.main(["--limit", "60", "--out", str(tmp_path / "mp")])
    pairs = pd.read_parquet(tmp_path / "mp" / "pairs.parquet")
    assert summary["n_pairs"] == len(pairs) > 30
    assert {
        "pair_id",
        "clean_id",
        "clean_question",
        "corrupted_question",
        "clean_answer",
        "corrupted_answer",
        "changed_from",
        "changed_to",
    } <= set(pairs.columns)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(
            [
                {
                    "pair_id": "x",
                    "clean_question": pairs.clean_question[0],
                    "corrupted_question": pairs.corrupted_question[0],
                    "corrupted_answer": pairs.corrupted_answer[0] + 1,
                }
            ]
        )
    )
    make_pairs.main(["--import", str(foreign), "--data", "toy-chain:test", "--out", str(tmp_path / "imp")])
    report = pd.read_parquet(tmp_path / "imp" / "import_report.parquet")
    assert (
        report.status.tolist() == ["disagrees"] and report.recomputed_corrupted_answer[0] == pairs.corrupted_answer[0]
    )


def test_question_to_thought_sums_the_pattern_over_each_numbers_tokens(llama_model, questions):
    """The mass a latent step puts on a question number is the pattern summed at that number's absolute positions
    (its token indices plus the example's left padding); numbers and the other question tokens together hold
    all the attention the step gives the question (1 minus what it gives BOT and the thoughts)."""
    from codi_lens.attention import question_to_thought
    from codi_lens.core.answers import clean_question
    from codi_lens.data.pairs import question_numbers
    from codi_lens.patching import number_tokens

    model = llama_model
    run = model.run_latents(questions, names_filter=pattern_hook_names(model.cfg.n_layers))
    numbers = [[number_tokens(model, q, m) for m in range(len(question_numbers(clean_question(q))))] for q in questions]
    assert all(len(n) >= 2 for n in numbers)
    frame = question_to_thought(run.cache, run.positions, ["a", "b", "c"], numbers)
    pattern = run.cache["blocks.1.attn.hook_pattern"]
    for i, problem_id in enumerate("abc"):
        query = run.positions.bot + 3  # thought 3
        keys = [run.positions.n_pad[i] + j for j in numbers[i][1]]
        expected = float(pattern[i, 2, query, keys].sum())
        rows = frame[(frame["problem_id"] == problem_id) & (frame["layer"] == 1) & (frame["head"] == 2)]
        rows = rows[rows["thought"] == 3].set_index("target")["weight"]
        assert rows["number:2"] == pytest.approx(expected, abs=1e-6)
        latent = float(pattern[i, 2, query, run.positions.bot : query + 1].sum())
        assert rows.sum() == pytest.approx(1 - latent, abs=1e-5)
