"""Attention to thoughts against a full HF pass, step importance resumed after a kill, and the experiments."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_hooks import _hf_sequence_embeds, _question_ids

from codi_lens import load_codi
from codi_lens.attention import attention_to_thoughts, correlation_by_layer, pattern_hook_names, thought_to_thought
from codi_lens.data import load_problems
from codi_lens.importance import ablation_grid, importance_rows, step_importance
from codi_lens.loading import DEFAULT_MODEL
from codi_lens.metrics import importance_table
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


def test_importance_rows_baseline_and_kl(toy):
    model, problems = toy
    ablations = ablation_grid(["zero"], ["single"], n_latents=6)
    from codi_lens.importance import AblationInputs

    rows = importance_rows(
        model,
        problems,
        ablations,
        lambda b: AblationInputs(b.thought_embeds, None, None, [0] * 6, 0),
        max_new_tokens=24,
    )
    baseline = model.run_codi([p.question for p in problems], max_new_tokens=24)
    first = rows.drop_duplicates("problem_id")
    assert first["baseline_prediction"].tolist() == baseline.prediction
    zero_k = model.run_codi(
        [p.question for p in problems],
        max_new_tokens=24,
        fwd_hooks=[("thought.4.hook_input", lambda z, hook: torch.zeros_like(z))],
    )
    assert rows[rows.thought == 4]["prediction"].tolist() == zero_k.prediction
    assert (rows["kl"] >= 0).all()
    table = importance_table(rows)
    assert (
        len(table) == 6
        and ((table.importance_low <= table.importance) & (table.importance <= table.importance_high)).all()
    )


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
