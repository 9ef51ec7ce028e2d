"""Patching inside the latent loop: the two ends of the recovery scale, chained versus parallel,
positions matched by name across lengths, and the batched sweep against pair-by-pair runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from codi_lens import Site, load_codi, replace_at_positions
from codi_lens.data import load_problems
from codi_lens.data.pairs import make_pairs
from codi_lens.interventions import replace_at, replace_thoughts
from codi_lens.metrics import forced_answers, logit_difference, logits_at_answer, normalised_recovery
from codi_lens.patching import (
    NO_CORRUPTED_PREFERENCE,
    PairBatch,
    chained,
    clean_thought_activations,
    number_tokens,
    parallel,
    patch_hooks,
    patch_rows,
    patch_start,
    patched_logits,
    prepare_pairs,
    sweep_sites,
)


@pytest.fixture(scope="module")
def toy():
    model = load_codi("toy-arith")
    pairs, _ = make_pairs(load_problems("toy:test", limit=12), max_value=40)
    return model, pairs


def _reference_ld(reference, question: str, answer_tokens: list[int], clean: int, corrupted: int) -> float:
    """HF + peft: ``logit[clean] - logit[corrupted]`` predicting the last of ``answer_tokens``, teacher-forced."""
    logits = reference.teacher_forced_logits(question, answer_tokens)[len(answer_tokens) - 1]
    return float(logits[clean] - logits[corrupted])


def _single_token(tokenizer, value: float) -> int:
    ids = tokenizer(f"{value:g}", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1  # the toy vocabulary writes every number 0..40 as one word
    return ids[0]


def test_recovery_is_zero_unpatched_and_one_with_every_position_patched(toy, toy_arith_reference):
    """The two ends of the scale against the HF + peft reference: the logit differences prepare_pairs measures
    are the reference's on the clean and the corrupted question (so an unpatched run recovers 0), and writing
    the clean layer-0 residual at every position of the corrupted run gives the reference's clean logits."""
    model, pairs = toy
    reference = toy_arith_reference
    name = "blocks.0.hook_resid_post"
    batch, kept, _ = prepare_pairs(model, pairs, [name], max_new_tokens=24)
    assert len(kept) >= 6
    ld_clean, ld_corrupted = [], []
    for i, row in enumerate(kept.itertuples()):
        forced = [*batch.clean_numbers[i].prefix, batch.clean_numbers[i].token]
        clean, corrupted = (_single_token(model.tokenizer, v) for v in (row.clean_answer, row.corrupted_answer))
        assert forced[-1] == clean and int(batch.corrupted_tokens[i]) == corrupted
        ld_clean.append(_reference_ld(reference, row.clean_question, forced, clean, corrupted))
        ld_corrupted.append(_reference_ld(reference, row.corrupted_question, forced, clean, corrupted))
    np.testing.assert_allclose(batch.ld_clean.numpy(), ld_clean, atol=1e-4)
    np.testing.assert_allclose(batch.ld_corrupted.numpy(), ld_corrupted, atol=1e-4)
    unpatched = normalised_recovery(np.array(ld_corrupted), batch.ld_corrupted, batch.ld_clean)
    np.testing.assert_allclose(unpatched, 0, atol=1e-4)
    # Toy numbers are one token each, so clean and corrupted sequences align position by position: writing the
    # clean layer-0 residual at every position (question, BOT, thoughts, EOT, the answer prefix) gives the clean run.
    corrupted = kept["corrupted_question"].tolist()
    index = {n.index for n in batch.clean_numbers}
    assert len(index) == 1  # "The answer is :" before every number
    last = batch.clean_positions.eot + index.pop()
    values = batch.clean_cache[name][:, : last + 1]
    hook = [(name, replace_at_positions(model, list(range(last + 1)), values))]
    logits = logits_at_answer(model, corrupted, batch.clean_numbers, fwd_hooks=hook)
    for i, row in enumerate(kept.itertuples()):
        forced = [*batch.clean_numbers[i].prefix, batch.clean_numbers[i].token]
        expected = reference.teacher_forced_logits(row.clean_question, forced)[len(forced) - 1]
        # float32: the corrupted batch's padding differs, so matmuls round differently (logits of size ~20)
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=5e-5)
    clean_tok = torch.tensor([n.token for n in batch.clean_numbers])
    ld = logit_difference(logits, clean_tok, batch.corrupted_tokens)
    np.testing.assert_allclose(normalised_recovery(ld, np.array(ld_corrupted), np.array(ld_clean)), 1, atol=1e-4)


def test_the_corrupted_run_must_prefer_its_own_answer(toy, toy_arith_reference):
    """Which pairs prepare_pairs keeps, against the HF reference: a pair is used exactly when the reference
    answers its clean question right and, teacher-forced on the clean answer's prefix, its corrupted run gives
    the corrupted answer's token a higher logit than the clean one's (else its recovery divides by a gap near
    or below zero). Three degenerate pairs, whose 'corrupted' question is the clean one, must be skipped."""
    model, pairs = toy
    reference = toy_arith_reference
    degenerate = pairs.iloc[:3].assign(
        corrupted_question=pairs["clean_question"].iloc[:3].values, pair_id=[f"same-{i}" for i in range(3)]
    )
    mixed = pd.concat([pairs, degenerate], ignore_index=True)
    _, kept, skipped = prepare_pairs(model, mixed, ["blocks.0.hook_resid_post"], max_new_tokens=24)
    expected = {}
    for row in mixed.itertuples():
        run = reference.run(row.clean_question, max_new_tokens=24)
        if float(run["answer_text"].split()[-1]) != row.clean_answer:
            expected[row.pair_id] = "the model answers the clean question wrong"
            continue
        forced = run["answer_tokens"][:-1]  # the clean answer up to its number (the toy answer ends there)
        clean, corrupted = (_single_token(model.tokenizer, v) for v in (row.clean_answer, row.corrupted_answer))
        ld = _reference_ld(reference, row.corrupted_question, forced, clean, corrupted)
        expected[row.pair_id] = "" if ld < 0 else NO_CORRUPTED_PREFERENCE
    found = {**dict.fromkeys(kept["pair_id"], ""), **dict(zip(skipped["pair_id"], skipped["reason"]))}
    assert found == expected
    assert all(expected[f"same-{i}"] for i in range(3)) and list(expected.values()).count("") >= 6


def test_chained_last_equals_parallel_last_and_leaves_earlier_thoughts(toy):
    model, pairs = toy
    clean_q, corrupted_q = pairs["clean_question"].tolist()[:4], pairs["corrupted_question"].tolist()[:4]
    clean_acts = clean_thought_activations(model, clean_q, 1)
    base = model.run_codi(corrupted_q, max_new_tokens=8)
    last = model.run_codi(corrupted_q, max_new_tokens=8, fwd_hooks=chained(model, 1, 6, clean_acts))
    together = model.run_codi(corrupted_q, max_new_tokens=8, fwd_hooks=parallel(model, 1, [6], clean_acts))
    assert torch.equal(last.latent_states, together.latent_states) and last.answer_tokens == together.answer_tokens
    for k in (2, 4):
        patched = model.run_codi(corrupted_q, max_new_tokens=8, fwd_hooks=chained(model, 0, k, clean_acts))
        assert torch.equal(patched.latent_states[:, :k], base.latent_states[:, :k])
        assert torch.equal(patched.thought_embeds[:, :k], base.thought_embeds[:, :k])
    # Parallel over every thought at the last layer fixes each h_k to the clean one's image under the final norm.
    full = model.run_codi(corrupted_q, max_new_tokens=8, fwd_hooks=parallel(model, 1, range(1, 7), clean_acts))
    clean = model.run_codi(clean_q, max_new_tokens=8)
    assert (full.latent_states[:, 1:] - clean.latent_states[:, 1:]).abs().max() <= 1e-4


def test_questions_of_different_lengths_patch_the_same_thought(llama_model, questions):
    llama = llama_model
    model = llama
    name = "blocks.0.hook_resid_post"
    clean_q = [questions[0], questions[1]]  # short and median, as clean runs
    corrupted_q = [questions[2], questions[0]]  # the long one padded beside a short one
    clean, cache = model.run_codi_with_cache(clean_q, names_filter=name, max_new_tokens=1)
    batch = PairBatch(
        metric="first_difference",
        contrasts=[],
        clean_numbers=[None, None],
        corrupted_tokens=torch.tensor([]),
        changed_tokens=[],
        clean_logits=None,
        corrupted_logits=None,
        ld_clean=None,
        ld_corrupted=None,
        clean_cache={name: cache[name]},
        clean_thoughts=clean.thought_embeds,
        clean_positions=clean.positions,
    )
    patched = model.run_codi(
        corrupted_q, max_new_tokens=3, fwd_hooks=patch_hooks(model, Site.of("resid_post", 0, "thought:2"), batch)
    )
    # Reference: each corrupted question alone (no padding), with the clean value written at absolute positions
    # computed by hand: thought 2 sits at (number of question tokens) + 2 in an unpadded sequence.
    clean_width = model.tokenize_questions(clean_q)[0].shape[1]  # the clean batch is padded to this width
    for i, question in enumerate(corrupted_q):
        clean_at = clean_width + 2
        value = cache[name][i, clean_at][None, None]
        own_tokens, _ = model.tokenize_questions([question])
        alone = model.run_codi(
            [question],
            max_new_tokens=3,
            fwd_hooks=[(name, replace_at_positions(model, [own_tokens.shape[1] + 2], value))],
        )
        assert (patched.latent_states[i] - alone.latent_states[0]).abs().max() <= 1e-5
        assert patched.answer_tokens[i] == alone.answer_tokens[0]


def test_changed_number_tokens(toy):
    model, pairs = toy
    row = pairs.iloc[0]
    index = number_tokens(model, row.clean_question, 0)
    tokens, _ = model.tokenize_questions([row.clean_question])
    assert model.tokenizer.decode(tokens[0, index]) == str(int(row.changed_from))


def test_batched_sweep_equals_pair_by_pair(toy):
    model, pairs = toy
    cells = sweep_sites(model.cfg.n_layers, kinds=("resid_post", "thought_input"), layer_only=True)
    together = patch_rows(model, pairs.head(5), cells, max_new_tokens=24)
    alone = pd.concat([patch_rows(model, pairs.iloc[[i]], cells, max_new_tokens=24) for i in range(5)])
    key = ["pair_id", "hook", "position"]
    a = together.sort_values(key).reset_index(drop=True)
    b = alone.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == 5 * len(cells) - (a["reason"] != "").sum() * (len(cells) - 1)
    pd.testing.assert_frame_equal(a[key], b[key])
    for column in ("recovery", "kl", "logit_diff"):  # float32: batch shapes change the summation order
        assert np.allclose(a[column], b[column], rtol=1e-5, atol=1e-5, equal_nan=True)
    # Patching BOT's last-layer residual is patching the fed thought 1 (h_0 is BOT's final state).
    bot = a[(a.hook == "blocks.1.hook_resid_post") & (a.position == "bot")]["recovery"].to_numpy()
    fed = a[(a.hook == "thought.1.hook_input")]["recovery"].to_numpy()
    assert abs(bot - fed).max() <= 1e-5


def test_the_other_problem_control_patches_each_pair_with_the_next_pairs_clean_run(toy):
    """donor='other' on distinct pairs: each pair's row equals patching its corrupted run directly (a plain
    run_codi loop, no branching) with the *next* used pair's clean activations (the last takes the first's),
    measured against the pair's own clean and corrupted answers; and it differs from the pair's own donor.
    'changed' cells and a batch of one usable pair are refused."""
    model, pairs = toy
    cells = [
        Site.of("resid_post", 0, "latents"),
        Site.of("resid_post", 1, "thought:2"),
        Site.of("thought_input", None, "thought:3"),
    ]
    subset = pairs.head(6)
    own = patch_rows(model, subset, cells, max_new_tokens=24)
    other = patch_rows(model, subset, cells, max_new_tokens=24, donor="other")
    assert set(own["donor"]) == {"clean"} and set(other["donor"]) == {"other"}
    used = other[other["reason"] == ""]
    order = list(dict.fromkeys(used["pair_id"]))  # the used pairs, in batch order
    assert len(order) >= 3 and len(used) == len(order) * len(cells)
    batch, kept, _ = prepare_pairs(
        model, subset, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], max_new_tokens=24
    )
    assert kept["pair_id"].tolist() == order
    clean_tok = torch.tensor([n.token for n in batch.clean_numbers])
    for i, pair_id in enumerate(order):
        donor = (i + 1) % len(order)
        donor_run, donor_cache = model.run_codi_with_cache(
            [kept["clean_question"].iloc[donor]], names_filter=lambda n: n.endswith("hook_resid_post"), max_new_tokens=1
        )
        names = {"latents": ["bot", *[f"thought:{k}" for k in range(1, 7)]], "thought:2": ["thought:2"]}
        for cell in cells:
            if cell.kind == "thought_input":
                hooks = replace_thoughts({3: donor_run.thought_embeds[:, 2]})
            else:
                where = donor_run.positions.resolve(names[cell.position])[0]
                hooks = replace_at(model, cell.hook, names[cell.position], donor_cache[cell.hook][:, where])
            logits = logits_at_answer(
                model, [kept["corrupted_question"].iloc[i]], [batch.clean_numbers[i]], fwd_hooks=hooks
            )
            ld = logit_difference(logits, clean_tok[i : i + 1], batch.corrupted_tokens[i : i + 1])
            expected = normalised_recovery(ld, batch.ld_corrupted[i], batch.ld_clean[i])[0]
            row = used[(used["pair_id"] == pair_id) & (used["hook"] == cell.hook) & (used["position"] == cell.position)]
            assert len(row) == 1 and abs(row["recovery"].iloc[0] - expected) <= 1e-4, (pair_id, cell)
    merged = own.merge(other, on=["pair_id", "hook", "position"], suffixes=("_own", "_other"))
    assert (merged["recovery_own"] - merged["recovery_other"]).abs().max() > 0.1
    with pytest.raises(ValueError, match="changed"):
        patch_rows(model, subset, [Site.of("resid_post", 0, "changed")], donor="other")
    alone = patch_rows(model, pairs.iloc[[0]], cells, max_new_tokens=24, donor="other")
    assert alone["reason"].str.contains("no other usable pair").all()


def test_patching_experiments_run_end_to_end(tmp_path):
    from experiments import iterative_patching, position_patching

    summary = position_patching.main(["--limit", "8", "--max-new-tokens", "24", "--out", str(tmp_path / "pp")])
    rows = pd.read_parquet(tmp_path / "pp" / "results.parquet")
    assert {"pair_id", "hook", "layer", "thought", "position", "recovery", "logit_diff", "kl"} <= set(rows.columns)
    assert len(pd.read_parquet(tmp_path / "pp" / "pairs.parquet")) == summary["n_pairs"]
    used = rows[rows.reason == ""]
    assert set(used.position) == {
        "changed",
        "question:-1",
        "bot",
        "eot",
        "thoughts",
        "latents",
        *[f"thought:{k}" for k in range(1, 7)],
    }
    assert summary["n_pairs_used"] + sum(summary["skipped_by_reason"].values()) == summary["n_pairs"]
    for figure in ("heatmap.html", "layer_only.html", "position_only.html"):
        assert "Plotly.newPlot" in (tmp_path / "pp" / figure).read_text()
    cells = pd.read_parquet(tmp_path / "pp" / "cells.parquet")
    tested = cells.dropna(subset=["p"])
    assert (tested["q"] >= tested["p"] - 1e-12).all() and set(cells["significant"]) <= {True, False}
    # Patching every thought at once brings the answer back on every pair: a mean far from 0 survives BH.
    assert cells[(cells["position"] == "thoughts") & (cells["kind"] == "resid_post")]["significant"].all()

    summary = iterative_patching.main(
        ["--limit", "8", "--max-new-tokens", "24", "--layers", "1", "--out", str(tmp_path / "ip")]
    )
    rows = pd.read_parquet(tmp_path / "ip" / "results.parquet")
    assert {
        "pair_id",
        "layer",
        "start_thought",
        "mode",
        "thought",
        "cos_clean",
        "cos_corrupted",
        "recovery",
        "kl",
    } <= set(rows.columns)
    used = rows[rows.reason == ""]
    # Parallel patching writes the clean activation at every thought from the start on: cosine 1 there.
    parallel_rows = used[used["mode"] == "parallel"]
    assert np.allclose(parallel_rows["cos_clean"], 1.0, atol=1e-5)
    assert set(summary["final_recovery"]) == {f"layer 1 from thought {k}" for k in range(1, 7)}


def test_cells_branching_off_the_corrupted_run_equal_one_run_per_cell(toy):
    model, pairs = toy
    cells = sweep_sites(model.cfg.n_layers, kinds=("resid_post", "thought_input"), layer_only=True)
    hooks = sorted({c.hook for c in cells if c.kind != "thought_input"})
    batch, kept, _ = prepare_pairs(model, pairs, hooks, max_new_tokens=24)
    questions = kept["corrupted_question"].tolist()
    batched = patched_logits(model, batch, questions, cells, max_rows=3 * len(kept))
    assert {patch_start(c, 6) for c in cells} == {-1, 0, 1, 2, 3, 4, 5, 6, 7}
    for cell, logits in zip(cells, batched):
        one = logits_at_answer(model, questions, batch.clean_numbers, fwd_hooks=patch_hooks(model, cell, batch))
        assert (logits - one).abs().max() <= 1e-5, cell


def test_attribution_is_the_derivative_through_the_loop_along_clean_minus_corrupted():
    """For every kind of cell, the attribution estimate equals a central finite difference of the
    logit difference when the corrupted activation moves a step eps towards the clean one (float64):
    the gradient reaches earlier thoughts through the feedback loop, EOT through the teacher-forced
    chunk, one head of z (at a thought and at the changed tokens), the fed thoughts and the changed question
    tokens."""
    from codi_lens.interventions import replace_at, replace_thoughts
    from codi_lens.patching import replace_question_tokens, site_attributions

    model = load_codi("toy-arith", dtype=torch.float64)
    pairs, _ = make_pairs(load_problems("toy:test", limit=8), max_value=40)
    cells = [
        Site.of("resid_post", 0, "thought:2"),
        Site.of("resid_post", 1, "bot"),
        Site.of("resid_pre", 1, "thoughts"),
        Site.of("resid_post", 0, "latents"),
        Site.of("mlp_out", 0, "eot"),
        Site.of("z", 0, "thought:1", head=1),
        Site.of("attn_out", 0, "question:-1"),
        Site.of("resid_post", 0, "changed"),
        Site.of("z", 0, "changed", head=0),
        Site.of("thought_input", None, "thought:3"),
    ]
    hooks = sorted({c.hook for c in cells if c.kind != "thought_input"})
    batch, kept, _ = prepare_pairs(model, pairs, hooks, max_new_tokens=24)
    questions = kept["corrupted_question"].tolist()
    estimates = site_attributions(model, batch, questions, cells)
    corrupted, cache = model.run_codi_with_cache(questions, names_filter=hooks, max_new_tokens=1)
    clean_tok = batch.clean_tokens
    eps = 1e-4

    def moved_hooks(cell: Site, step: float):
        if cell.kind == "thought_input":
            k = cell.thought - 1
            corr = corrupted.thought_embeds[:, k]
            return replace_thoughts({cell.thought: corr + step * (batch.clean_thoughts[:, k] - corr)})
        acts = cache[cell.hook]
        if cell.position == "changed":
            values, index = [], []
            for i, (a, b) in enumerate(batch.changed_tokens):
                corr = acts[i, torch.tensor(b) + corrupted.positions.n_pad[i]]
                clean = batch.clean_cache[cell.hook][i, torch.tensor(a) + batch.clean_positions.n_pad[i]]
                moved = corr + step * (clean - corr)
                if cell.head is not None:  # [tokens, head, d_head]: only that head moves
                    moved = corr.clone()
                    moved[:, cell.head] += step * (clean - corr)[:, cell.head]
                values.append(moved)
                index.append(b)
            return replace_question_tokens(model, cell.hook, index, values)
        spans = {
            "thoughts": [f"thought:{k}" for k in range(1, 7)],
            "latents": ["bot"] + [f"thought:{k}" for k in range(1, 7)],
        }
        names = spans.get(cell.position, [cell.position])
        where_corr, where_clean = corrupted.positions.resolve(names), batch.clean_positions.resolve(names)
        corr = torch.stack([acts[i, where_corr[i]] for i in range(len(questions))])
        clean = torch.stack([batch.clean_cache[cell.hook][i, where_clean[i]] for i in range(len(questions))])
        moved = corr + step * (clean - corr)
        if cell.head is not None:
            moved = corr.clone()
            moved[:, :, cell.head] += step * (clean - corr)[:, :, cell.head]
        return replace_at(model, cell.hook, names, moved)

    assert all(x is not None for x in batch.changed_tokens)
    answers = forced_answers(batch.clean_numbers)
    rows, index = torch.arange(len(questions)), torch.tensor([n.index for n in batch.clean_numbers])
    for cell, estimate in zip(cells, estimates):
        ld = [  # in float64 throughout (logits_at_answer would round to float32)
            logit_difference(
                model.score_answers(questions, answers, fwd_hooks=moved_hooks(cell, s)).logits[rows, index],
                clean_tok,
                batch.corrupted_tokens,
            )
            for s in (eps, -eps)
        ]
        derivative = (ld[0] - ld[1]) / (2 * eps)
        assert estimate.abs().max() > 1e-3, cell  # a cell that moves nothing would pass trivially
        assert torch.allclose(estimate, derivative, rtol=1e-6, atol=1e-7), (cell, estimate, derivative)
    # Without question-token cells the graph starts at BOT (the question's keys are constants): same estimates.
    late = [i for i, c in enumerate(cells) if c.position not in ("changed", "question:-1")]
    late_estimates = site_attributions(model, batch, questions, [cells[i] for i in late])
    for i, estimate in zip(late, late_estimates):
        assert torch.allclose(estimate, estimates[i], rtol=1e-9, atol=1e-12), cells[i]


def test_sweeps_branch_off_the_batchs_corrupted_run(toy, monkeypatch):
    """prepare_pairs grows the corrupted run once and keeps it in the batch: an exact sweep and attribution
    afterwards run no question pass of their own, and give what a freshly grown corrupted run gives (float32,
    1e-5). A subset of the pairs in another order (``PairBatch.rows``: its trunk rows keep the batch's padding)
    gives those pairs' numbers (1e-4, as any two batchings: another batch sums in another order)."""
    from dataclasses import replace

    from codi_lens.core import loop
    from codi_lens.patching import site_attributions

    model, pairs = toy
    cells = [Site.of("resid_post", 0, "thought:2"), Site.of("resid_post", 1, "eot"), Site.of("z", 0, "bot", head=1)]
    cells.append(Site.of("resid_post", 1, "thoughts"))  # a span: attribution's extra pass with held positions
    hooks = sorted({c.hook for c in cells})
    batch, kept, _ = prepare_pairs(model, pairs, hooks, max_new_tokens=24)
    questions = kept["corrupted_question"].tolist()
    assert batch.corrupted_trunk is not None and len(kept) >= 4
    fresh = replace(batch, corrupted_trunk=None)
    expected_exact = patched_logits(model, fresh, questions, cells)
    expected_attribution = site_attributions(model, fresh, questions, cells)

    prompts = []
    run_prompt = loop.run_prompt
    monkeypatch.setattr(loop, "run_prompt", lambda *a, **k: (prompts.append(1), run_prompt(*a, **k))[1])
    exact = patched_logits(model, batch, questions, cells)
    attribution = site_attributions(model, batch, questions, cells)
    assert prompts == []  # no question pass: both branched off the batch's corrupted run
    for got, want in zip(exact + attribution, expected_exact + expected_attribution):
        assert (got - want).abs().max() <= 1e-5
    rows = [3, 0, 2]
    subset = patched_logits(model, batch.rows(rows), [questions[i] for i in rows], cells)
    assert prompts == []
    for got, want in zip(subset, expected_exact):
        assert (got - want[rows]).abs().max() <= 1e-4
