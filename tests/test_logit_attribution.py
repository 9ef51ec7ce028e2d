"""Direct logit attribution: the parts of the residual stream, the heads and their sources add up, and the total
is the logit difference that patching measures at the same row (an independent teacher-forced run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.data.pairs import make_pairs
from codi_lens.logit_attribution import attribution_rows
from codi_lens.patching import prepare_pairs


def _check_sums(rows: pd.DataFrame, n_layers: int) -> None:
    used = rows[rows["reason"] == ""]
    for (_, _), group in used.groupby(["pair_id", "run"]):
        total = group["total"].iloc[0]
        scale = max(1.0, abs(total))
        layer_rows = group[group["level"] == "layer"]
        assert set(layer_rows["component"]) >= {
            "embed",
            *[f"blocks.{n}.{k}" for n in range(n_layers) for k in ("attn", "mlp")],
        }
        assert abs(layer_rows["contribution"].sum() - total) <= 1e-4 * scale
        for layer in range(n_layers):
            attn = group[group["component"] == f"blocks.{layer}.attn"].iloc[0]
            heads = group[(group["level"] == "head") & (group["layer"] == layer)]
            assert abs(heads["contribution"].sum() - (attn["contribution"] - attn["bias"])) <= 1e-4 * scale
        sources = group[group["level"] == "source"].groupby("component")["contribution"].sum()
        heads = group[group["level"] == "head"].set_index("component")["contribution"]
        np.testing.assert_allclose(sources.loc[heads.index].to_numpy(), heads.to_numpy(), atol=1e-4 * scale)


def _check_total(model, pairs: pd.DataFrame, rows: pd.DataFrame, **prepare) -> None:
    batch, kept, _ = prepare_pairs(model, pairs, [], **prepare)
    used = rows[rows["reason"] == ""].drop_duplicates(["pair_id", "run"]).set_index(["run", "pair_id"])["total"]
    np.testing.assert_allclose(used.loc["clean"].loc[kept["pair_id"]].to_numpy(), batch.ld_clean.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        used.loc["corrupted"].loc[kept["pair_id"]].to_numpy(), batch.ld_corrupted.numpy(), atol=1e-4
    )


def test_the_parts_add_up_to_the_logit_difference_on_toy_chain():
    model = load_codi("toy-chain")
    pairs, _ = make_pairs(load_problems("toy-chain:test", limit=16))
    rows = attribution_rows(model, pairs, max_new_tokens=32)
    assert rows[rows["reason"] == ""]["pair_id"].nunique() >= 6
    _check_sums(rows, model.cfg.n_layers)
    _check_total(model, pairs, rows, max_new_tokens=32)
    sources = set(rows[rows["level"] == "source"]["source"])
    assert sources == {"question", "changed", "bot", "eot", "answer", *[f"thought:{k}" for k in range(1, 7)]}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_parts_add_up_with_layernorm_biases_and_grouped_heads(tiny_checkpoint, family):
    """GPT-2's final LayerNorm centres its input and adds a bias (its own term); the tiny LLaMA's 4 query heads
    share 2 key/value heads. Random weights answer nothing right, so the gold answers are forced."""
    ckpt = tiny_checkpoint(family)
    model = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    pairs, _ = make_pairs(load_problems("gsm8k:test", limit=12))
    rows = attribution_rows(model, pairs, max_new_tokens=1, answer_from="gold")
    used = rows[rows["reason"] == ""]
    assert used["pair_id"].nunique() >= 3
    _check_sums(rows, model.cfg.n_layers)
    _check_total(model, pairs, rows, max_new_tokens=1, answer_from="gold")
    if family == "gpt2":
        assert "ln_final.b" in set(used["component"])


def test_attribution_refuses_a_metric_that_is_not_one_logit_difference():
    model = load_codi("toy-chain")
    pairs, _ = make_pairs(load_problems("toy-chain:test", limit=4))
    with pytest.raises(ValueError, match="answer_logprob"):
        attribution_rows(model, pairs, metric="answer_logprob")


def test_logit_attribution_experiment_writes_its_contract(tmp_path):
    from experiments import logit_attribution

    out = tmp_path / "la"
    summary = logit_attribution.main(["--limit", "24", "--max-new-tokens", "32", "--out", str(out)])
    rows = pd.read_parquet(out / "results.parquet")
    assert {"pair_id", "component", "source", "contribution", "total"} <= set(rows.columns)
    for name in ("parts.html", "heads.html", "sources.html"):
        assert "Plotly.newPlot" in (out / name).read_text()
    clean = rows[(rows["reason"] == "") & (rows["run"] == "clean")].drop_duplicates("pair_id")
    assert summary["total"]["clean"][0] == pytest.approx(clean["total"].mean(), abs=1e-4)
    assert len(summary["top_heads"]) == 6
