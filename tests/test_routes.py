"""Route patching: the recurrence and the attention route of a step, against independent patches of the same
run (the residual everywhere, the fed thought), the keys and values a patch leaves in the run, and the
interaction's arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from codi_lens import Site, load_codi
from codi_lens.core.branching import grow_trunk
from codi_lens.core.names import act_name
from codi_lens.data import load_problems
from codi_lens.data.pairs import make_pairs
from codi_lens.interventions import replace_thoughts
from codi_lens.metrics import logit_difference, logits_at_answer
from codi_lens.patching import PairBatch, patch_hooks, prepare_pairs
from codi_lens.patching.routes import (
    EVERY_LAYER,
    RoutePatch,
    Span,
    interactions,
    kv_hook_names,
    route_hooks,
    route_patches,
    route_rows,
)


def _clean_batch(model, clean_q: list[str], names: list[str]) -> PairBatch:
    """A batch holding only what route and residual patches read: the clean run's cache, thoughts, positions."""
    clean, cache = model.run_codi_with_cache(clean_q, names_filter=names, max_new_tokens=1)
    return PairBatch(
        metric="first_difference",
        contrasts=[],
        clean_numbers=[None] * len(clean_q),
        corrupted_tokens=torch.tensor([]),
        changed_tokens=[],
        clean_logits=None,
        corrupted_logits=None,
        ld_clean=None,
        ld_corrupted=None,
        clean_cache={name: cache[name] for name in names},
        clean_thoughts=clean.thought_embeds,
        clean_positions=clean.positions,
    )


@pytest.fixture(scope="module")
def lengths(llama_model, questions):
    """Clean and corrupted questions of different lengths (each batch padded differently) on the tiny LLaMA."""
    model = llama_model
    clean_q, corrupted_q = [questions[0], questions[1]], [questions[2], questions[0]]
    n = model.cfg.n_layers
    names = kv_hook_names(n) + [act_name("resid_pre", layer) for layer in range(n)] + [act_name("resid_post", n - 1)]
    return model, clean_q, corrupted_q, _clean_batch(model, clean_q, names), grow_trunk(model, corrupted_q)


@pytest.mark.parametrize("span", [Span.step(0), Span.step(2), Span(1, 3), Span.step(6)])
def test_both_routes_at_every_layer_are_the_steps_residual_patched_everywhere(lengths, span):
    """Every layer's keys and values and the fed input after the span, clean: the span's steps are the clean run's,
    so the run equals one whose residual at those steps is written clean at every layer (before each block and
    after the last), positions matched by name across different question lengths."""
    model, _, corrupted_q, batch, trunk = lengths
    n = model.cfg.n_layers
    route = "both" if span.last < 6 else "attention"  # the last thought feeds nothing
    hooks = route_hooks(model, RoutePatch(span, route), batch, trunk)
    residual = []
    for position in span.positions:
        sites = [Site.of("resid_pre", layer, position) for layer in range(n)] + [Site.of("resid_post", n - 1, position)]
        residual += [hook for site in sites for hook in patch_hooks(model, site, batch)]
    routed = model.run_codi(corrupted_q, max_new_tokens=4, fwd_hooks=hooks, return_logits=True)
    patched = model.run_codi(corrupted_q, max_new_tokens=4, fwd_hooks=residual, return_logits=True)
    # The span's own h_k are not patched by the routes (only what leaves the span is): compare what follows it.
    after = slice(span.last + 1, None)
    assert span.last == 6 or (routed.latent_states[:, after] - patched.latent_states[:, after]).abs().max() <= 1e-5
    answer = slice(7, None)  # the logits of the answer tokens (steps 0..6 come first)
    assert (routed.step_logits[:, answer] - patched.step_logits[:, answer]).abs().max() <= 1e-4
    assert routed.answer_tokens == patched.answer_tokens
    unpatched = model.run_codi(corrupted_q, max_new_tokens=4, return_logits=True)
    assert (routed.step_logits[:, answer] - unpatched.step_logits[:, answer]).abs().max() > 1e-2  # it does something


def test_a_route_patch_leaves_exactly_its_keys_values_and_fed_thought(lengths):
    """The attention route at layer 0, key/value head 0, of thought 2: in the patched run thought 2's keys and
    values are the clean run's at that head and layer only, the corrupted run's everywhere else (pinned: the clean
    head changes thought 2's own residual above layer 0, hence its keys and values at layer 1), and thought 3 is
    fed the corrupted z_3."""
    model, clean_q, corrupted_q, batch, trunk = lengths
    names = kv_hook_names(model.cfg.n_layers)
    patch = RoutePatch(Span.step(2), "attention", layer=0, head=0)
    run, cache = model.run_codi_with_cache(
        corrupted_q, names_filter=names, max_new_tokens=1, fwd_hooks=route_hooks(model, patch, batch, trunk)
    )
    _, base_cache = model.run_codi_with_cache(corrupted_q, names_filter=names, max_new_tokens=1)
    here = run.positions.resolve(["thought:2"])[:, 0]
    there = batch.clean_positions.resolve(["thought:2"])[:, 0]
    rows = torch.arange(len(corrupted_q))
    for name in names:
        patched, unpatched = cache[name][rows, here], base_cache[name][rows, here]
        if name.startswith("blocks.0."):
            assert torch.equal(patched[:, 0], batch.clean_cache[name][rows, there][:, 0]), name
            assert torch.equal(patched[:, 1], unpatched[:, 1]), name
        else:
            assert torch.equal(patched, unpatched), name
        before = run.positions.bot + 2
        assert torch.equal(cache[name][:, :before], base_cache[name][:, :before]), name
    assert torch.equal(run.thought_embeds[:, 2], trunk.thought_inputs[:, 2])


@pytest.fixture(scope="module")
def toy_chain_pairs():
    model = load_codi("toy-chain")
    pairs, _ = make_pairs(load_problems("toy-chain:test", limit=16))
    return model, pairs


def test_the_recurrence_alone_is_the_fed_thought_patched(toy_chain_pairs):
    """The recurrence route of step k is the clean z_{k+1} fed at thought k + 1 and nothing else: its logit
    difference equals one whole run of the corrupted questions with that thought replaced (thoughts taken from
    a separate clean run)."""
    model, pairs = toy_chain_pairs
    patches = [RoutePatch(Span.step(k), "recurrence") for k in (0, 2, 5)]
    rows = route_rows(model, pairs, patches, max_new_tokens=32)
    used = rows[rows["reason"] == ""]
    kept = pairs[pairs["pair_id"].isin(used["pair_id"])].set_index("pair_id").loc[used["pair_id"].unique()]
    clean = model.run_codi(kept["clean_question"].tolist(), max_new_tokens=32)
    batch_rows = used.drop_duplicates("pair_id")
    assert len(batch_rows) >= 6
    batch, _, _ = prepare_pairs(model, kept.reset_index(), [], max_new_tokens=32)
    for patch in patches:
        k = patch.span.last
        hooks = replace_thoughts({k + 1: clean.thought_embeds[:, k]})
        logits = logits_at_answer(model, kept["corrupted_question"].tolist(), batch.clean_numbers, fwd_hooks=hooks)
        expected = logit_difference(logits, batch.clean_tokens, batch.corrupted_tokens).numpy()
        found = used[used["thought"] == k].set_index("pair_id").loc[kept.index, "logit_diff"].to_numpy()
        np.testing.assert_allclose(found, expected, atol=1e-4)


def test_interactions_vanish_when_the_recurrence_carries_nothing():
    """With the projection head's output layer zeroed every fed thought is the same vector (its LayerNorm's bias)
    in every run, so the recurrence route moves nothing (logit difference of the corrupted run), both routes
    equal the attention route, and the interaction is zero; on the intact model it is not."""
    model = load_codi("toy-chain")
    pairs, _ = make_pairs(load_problems("toy-chain:test", limit=10))
    patches = route_patches(model.cfg.n_layers, 6, [Span.step(1), Span.step(4), Span(2, 3)], by_layer=False)
    intact = interactions(route_rows(model, pairs, patches, max_new_tokens=32, answer_from="gold"))
    with torch.no_grad():
        model.prj.fc_out.weight.zero_()
        model.prj.fc_out.bias.zero_()
    rows = route_rows(model, pairs, patches, max_new_tokens=32, answer_from="gold")
    used = rows[rows["reason"] == ""]
    recurrence = used[used["route"] == "recurrence"]
    np.testing.assert_allclose(recurrence["logit_diff"], recurrence["ld_corrupted"], atol=1e-5)
    wide = used.pivot_table(index=["pair_id", "target"], columns="route", values="logit_diff")
    np.testing.assert_allclose(wide["both"], wide["attention"], atol=1e-5)
    zeroed = interactions(rows)
    assert len(zeroed) == 3 * used["pair_id"].nunique()
    np.testing.assert_allclose(zeroed["logit_diff"], 0, atol=1e-4)
    assert intact["logit_diff"].abs().max() > 1e-3


def test_route_patches_and_spans():
    patches = route_patches(2, 6, [Span.step(0), Span.step(6), Span(1, 3)], n_kv_heads=2)
    names = {(p.span.name, p.route, p.layer, p.head) for p in patches}
    assert ("bot", "recurrence", EVERY_LAYER, None) in names
    assert ("thought:6", "recurrence", EVERY_LAYER, None) not in names  # prj(h_6) is never fed
    assert ("thoughts:1-3", "attention", 1, 1) in names
    assert len(patches) == 3 * 3 - 2 + 3 * 2 + 3 * 4  # thought 6: attention only
    assert Span.parse("bot") == Span.step(0) and Span.parse("2-4") == Span(2, 4)
    with pytest.raises(ValueError, match="recurrence route has no layer"):
        RoutePatch(Span.step(1), "recurrence", layer=0)
    with pytest.raises(ValueError, match="outside a run with 6 thoughts"):
        route_patches(2, 6, [Span(5, 7)])
    frame = pd.DataFrame(
        {
            "pair_id": ["a"] * 3,
            "target": ["thought:1"] * 3,
            "thought": [1] * 3,
            "route": ["recurrence", "attention", "both"],
            "layer": [EVERY_LAYER] * 3,
            "head": [np.nan] * 3,
            "recovery": [0.5, 0.25, 0.9],
            "logit_diff": [1.0, 0.0, 2.5],
            "ld_corrupted": [-1.0] * 3,
            "reason": [""] * 3,
        }
    )
    # by hand: 0.9 - 0.5 - 0.25; (2.5 + 1) - (1 + 1) - (0 + 1)
    np.testing.assert_allclose(interactions(frame)[["recovery", "logit_diff"]].to_numpy(), [[0.15, 0.5]])


def test_route_patching_experiment_writes_its_contract(tmp_path):
    from codi_lens.core.errors import FlagError
    from experiments import route_patching

    out = tmp_path / "rp"
    summary = route_patching.main(
        ["--limit", "24", "--max-new-tokens", "32", "--spans", "bot,2,5,6,1-3", "--out", str(out)]
    )
    rows = pd.read_parquet(out / "results.parquet")
    assert {"pair_id", "thought", "route", "layer", "recovery", "logit_diff", "kl"} <= set(rows.columns)
    used = rows[rows["reason"] == ""]
    assert set(used["route"]) == {"recurrence", "attention", "both"} and set(used["donor"]) == {"clean", "other"}
    assert set(used["layer"]) == {EVERY_LAYER, 0, 1}
    assert set(used["target"]) == {"bot", "thought:2", "thought:5", "thought:6", "thoughts:1-3"}
    assert len(pd.read_parquet(out / "pairs.parquet")) == summary["n_pairs"]
    for name in ("routes.html", "attention_by_layer.html"):
        assert "Plotly.newPlot" in (out / name).read_text()
    cells = pd.read_parquet(out / "cells.parquet")
    tested = cells.dropna(subset=["p"])  # a cell that moves no pair at all (BOT's layer-0 keys) has nothing to test
    assert tested["q"].between(0, 1).all() and (tested["q"] >= tested["p"] - 1e-12).all()
    assert cells[cells["p"].isna()]["mean"].abs().max() <= 1e-6 if cells["p"].isna().any() else True
    own = cells[(cells["donor"] == "clean") & (cells["target"] == "thought:2") & (cells["layer"] == EVERY_LAYER)]
    other = used[(used["donor"] == "other") & (used["target"] == "thought:2") & (used["route"] == "both")]
    both = own[own["route"] == "both"].iloc[0]
    assert both["control_mean"] == pytest.approx(other["recovery"].mean(), abs=1e-9)
    assert both["own_minus_control"] == pytest.approx(both["mean"] - both["control_mean"], abs=1e-12)
    # Each reported estimate is the mean of its rows.
    mean = used[(used["donor"] == "clean") & (used["target"] == "thought:2") & (used["route"] == "both")]["recovery"]
    assert summary["steps"]["thought:2"]["both"][0] == pytest.approx(mean.mean(), abs=1e-4)
    assert summary["steps"]["thought:2"]["recurrence_minus_attention"]["carried_by"] in (
        "recurrence",
        "attention",
        "not distinguishable",
    )
    with pytest.raises(FlagError, match="--spans"):
        route_patching.main(["--limit", "4", "--spans", "2-9", "--out", str(tmp_path / "bad")])


def test_with_the_corrupted_run_as_donor_nothing_changes(lengths):
    """Route patches whose 'clean' values are the corrupted run's own (a batch made from the corrupted questions)
    write back what the run computes: every route, at every layer or one, leaves the corrupted run as it was."""
    model, _, corrupted_q, _, trunk = lengths
    names = kv_hook_names(model.cfg.n_layers)
    own = _clean_batch(model, corrupted_q, names)
    unpatched = model.run_codi(corrupted_q, max_new_tokens=4, return_logits=True)
    for patch in (
        RoutePatch(Span.step(2), "both"),
        RoutePatch(Span(1, 3), "attention", 1),
        RoutePatch(Span.step(0), "recurrence"),
    ):
        run = model.run_codi(
            corrupted_q, max_new_tokens=4, fwd_hooks=route_hooks(model, patch, own, trunk), return_logits=True
        )
        assert (run.step_logits - unpatched.step_logits).abs().max() <= 1e-4, patch
        assert run.answer_tokens == unpatched.answer_tokens
