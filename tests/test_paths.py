"""Path patching in the loop: its two ends (no sender is the corrupted run, every component at every position is
the clean run) and two paths computed by hand from recorded activations (a direct path to the logits, and a
path through the recurrence into the next thought)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_lens import Site, load_codi
from codi_lens.core.recording import ActivationRecorder
from codi_lens.data import load_problems
from codi_lens.data.pairs import make_pairs
from codi_lens.interventions import replace_thoughts
from codi_lens.metrics import logit_difference, logits_at_answer
from codi_lens.patching import batch_readings, prepare_pairs
from codi_lens.patching.paths import ANSWER_ROW, check_sender, path_patch, record_runs


@pytest.fixture(scope="module")
def toy():
    model = load_codi("toy-chain")
    pairs, _ = make_pairs(load_problems("toy-chain:test", limit=16))
    batch, kept, _ = prepare_pairs(model, pairs, [], max_new_tokens=32)
    runs = record_runs(model, batch, kept["clean_question"].tolist(), kept["corrupted_question"].tolist())
    return model, batch, kept, runs


def _recorded(model, questions, answers, names):
    recorder = ActivationRecorder(model.chunk_scope)
    scores = model.score_answers(questions, answers, fwd_hooks=[(n, recorder) for n in names])
    return recorder.tensors(), scores.positions


def test_no_sender_is_the_corrupted_run_and_every_sender_the_clean_run(toy):
    """Toy numbers are one token each, so a pair's two questions have the same layout and every absolute position
    is its own counterpart: sending every component (embedding, each head, each MLP) at every position up to the
    compared row gives the clean run; sending nothing, through the answer or through receivers, the corrupted."""
    model, batch, _, runs = toy
    assert len(batch.clean_numbers) >= 6
    np.testing.assert_allclose(path_patch(model, batch, runs, []).numpy(), batch.ld_corrupted.numpy(), atol=1e-5)
    receivers = [Site("blocks.1.hook_mlp_out", ANSWER_ROW), Site("thought.4.hook_input")]
    nothing = path_patch(model, batch, runs, [], receivers)
    np.testing.assert_allclose(nothing.numpy(), batch.ld_corrupted.numpy(), atol=1e-5)
    # Thought 3 reaches thought 5's input only through thought 4's input or through heads, all frozen: nothing.
    sender = Site("blocks.0.hook_mlp_out", "thought:3")
    skipped = path_patch(model, batch, runs, [sender], [Site("thought.5.hook_input")])
    np.testing.assert_allclose(skipped.numpy(), batch.ld_corrupted.numpy(), atol=1e-5)
    clean, corrupted = runs
    assert clean.positions.n_pad == corrupted.positions.n_pad
    last = corrupted.positions.eot + max(corrupted.answer_rows)
    every = [Site("hook_embed", p) for p in range(last + 1)]
    for layer in range(model.cfg.n_layers):
        every += [Site(f"blocks.{layer}.attn.hook_z", p, head=h) for p in range(last + 1) for h in range(4)]
        every += [Site(f"blocks.{layer}.hook_mlp_out", p) for p in range(last + 1)]
    np.testing.assert_allclose(path_patch(model, batch, runs, every).numpy(), batch.ld_clean.numpy(), atol=1e-4)


def test_a_direct_path_to_the_answer_by_hand(toy):
    """Layer 1's MLP at the compared row, straight to the logits: the final residual there is the corrupted run's
    plus (clean - corrupted) MLP output, then the final norm and the unembedding."""
    model, batch, kept, runs = toy
    answers, rows = batch_readings(batch)[0].answers, batch_readings(batch)[0].rows
    names = ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    clean, clean_positions = _recorded(model, kept["clean_question"].tolist(), answers, names)
    corrupted, positions = _recorded(model, kept["corrupted_question"].tolist(), answers, names)
    i = torch.arange(len(rows))
    at = torch.tensor([positions.eot + r for r in rows])
    at_clean = torch.tensor([clean_positions.eot + r for r in rows])
    final = corrupted[names[1]][i, at] + clean[names[0]][i, at_clean] - corrupted[names[0]][i, at]
    logits = model.unembed(model.ln_final(final[:, None]))[:, 0]
    expected = logit_difference(logits, batch.clean_tokens, batch.corrupted_tokens)
    found = path_patch(model, batch, runs, [Site("blocks.1.hook_mlp_out", ANSWER_ROW)])
    np.testing.assert_allclose(found.numpy(), expected.detach().numpy(), atol=1e-4)
    assert (found - batch.ld_corrupted).abs().max() > 0.5  # the path carries something


def test_a_path_through_the_recurrence_by_hand(toy):
    """Thought 5's input (its embedding) to thought 6's input: with every component frozen, h_5 is the corrupted
    final residual at thought 5 plus (clean - corrupted) thought 5; thought 6 is fed prj(norm(that)) and the run
    goes on freely."""
    model, batch, kept, runs = toy
    answers = batch_readings(batch)[0].answers
    names = ["hook_embed", "blocks.1.hook_resid_post"]
    clean, clean_positions = _recorded(model, kept["clean_question"].tolist(), answers, names)
    corrupted, positions = _recorded(model, kept["corrupted_question"].tolist(), answers, names)
    t5, t5_clean = positions.thoughts[4], clean_positions.thoughts[4]
    residual = corrupted[names[1]][:, t5] + clean[names[0]][:, t5_clean] - corrupted[names[0]][:, t5]
    fed = model.prj(model.ln_final(residual[:, None])[:, 0])
    hooks = replace_thoughts({6: fed.detach()})
    logits = logits_at_answer(model, kept["corrupted_question"].tolist(), batch.clean_numbers, fwd_hooks=hooks)
    expected = logit_difference(logits, batch.clean_tokens, batch.corrupted_tokens)
    found = path_patch(model, batch, runs, [Site("hook_embed", "thought:5")], [Site("thought.6.hook_input")])
    np.testing.assert_allclose(found.numpy(), expected.numpy(), atol=1e-4)
    assert (found - batch.ld_corrupted).abs().max() > 0.5


def test_senders_are_components():
    with pytest.raises(ValueError, match="one head"):
        check_sender(Site("blocks.0.attn.hook_z", "eot"))
    with pytest.raises(ValueError, match="a sender is"):
        check_sender(Site("blocks.0.hook_resid_post", "eot"))


def test_path_patching_experiment_writes_its_table(tmp_path):
    import pandas as pd

    from experiments import path_patching

    out = tmp_path / "pp"
    summary = path_patching.main(["--limit", "16", "--max-new-tokens", "32", "--out", str(out)])
    rows = pd.read_parquet(out / "results.parquet")
    used = rows[rows["reason"] == ""]
    assert {"pair_id", "path", "group", "logit_diff", "recovery"} <= set(rows.columns)
    assert set(used["group"]) == {"direct", "head_to_last_mlp", "thought_to_heads", "recurrence"}
    only = path_patching.main(
        ["--limit", "8", "--max-new-tokens", "32", "--groups", "recurrence", "--out", str(tmp_path / "r")]
    )
    assert set(only["paths"]) == {f"thought {k} -> thought {k + 1}" for k in range(1, 6)}
    assert "Plotly.newPlot" in (out / "paths.html").read_text()
    mlp = used[used["path"] == "mlp1 -> answer"]["recovery"]
    assert summary["paths"]["mlp1 -> answer"]["recovery"][0] == pytest.approx(mlp.mean(), abs=1e-4)
