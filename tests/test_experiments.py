"""The experiment entry points run end to end and write tidy results, figures and the model card."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
import pytest

from codi_lens.core.errors import FlagError
from codi_lens.loading import DEFAULT_MODEL, PRETRAINED
from codi_lens.reports import model_card
from codi_lens.training import recipes
from codi_lens.training.config import BOOKKEEPING_FIELDS, TrainConfig
from experiments import toy_model_report, train_toy_codi


def test_train_then_report_then_card(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "SHIPPED_SPLITS", {"seed": 0, "n_train": 256, "n_val": 16, "n_test": 24})
    export = train_toy_codi.main(
        [
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--d-model",
            "32",
            "--d-mlp",
            "64",
            "--prj-dim",
            "32",
            "--val-every",
            "3",
            "--val-size",
            "8",
            "--threads",
            "1",
        ]
    )
    training = json.loads((export / "training.json").read_text())
    assert training["steps"] == 3 and (export / "data" / "test.jsonl").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val_accuracy" in log[-1]

    out = tmp_path / "report"
    summary = toy_model_report.main(
        [
            "--checkpoint",
            str(export),
            "--base",
            str(export),
            "--data",
            str(export / "data" / "test.jsonl"),
            "--limit",
            "12",
            "--batch-size",
            "11",
            "--max-new-tokens",
            "4",
            "--baseline",
            str(export),
            "--out",
            str(out),
            "--write-card",
        ]
    )
    predictions = pd.read_parquet(out / "results.parquet")
    assert set(predictions["condition"]) == {
        "latents",
        "zero_all_thoughts",
        "zero_all_thoughts_16_tokens",
        "teacher_explicit_cot",
        "no_cot_baseline",
    }
    assert predictions.groupby("condition").size().eq(12).all()
    accuracy = pd.read_parquet(out / "accuracy.parquet")
    overall = accuracy[accuracy["group"] == "all"].set_index("condition")
    recomputed = predictions.groupby("condition")["correct"].mean()
    assert (overall["accuracy"] - recomputed).abs().max() < 1e-12
    lens = pd.read_parquet(out / "logit_lens.parquet")
    intermediates = pd.read_json(export / "data" / "test.jsonl", lines=True)["intermediates"][:12]
    n_values = sum(len(v) for v in intermediates)
    assert (~lens["control"]).sum() == n_values
    # The control reads the next problem's values (the last problem reads the first's), so its row
    # count is the same and its values are another problem's, even for a last batch of one problem.
    control = lens[lens["control"]]
    assert len(control) == n_values
    assert list(control[control["id"] == control["id"].iloc[-1]]["value"]) == list(intermediates[0])
    assert (out / "accuracy.html").stat().st_size > 1000 and (out / "logit_lens.html").stat().st_size > 1000
    card = (export / "MODEL_CARD.md").read_text()
    assert "| all |" in card and "python -m experiments.train_toy_codi" in card
    assert json.loads((export / "card.json").read_text())["summary"] == summary


def test_card_names_the_objective_and_data_variants_of_its_training_json():
    """The card's prose follows ``training.json``: the upstream objective unless a chain loss was on,
    the answer-carrying note only with ``chain_carry_answer``, and one clause per data variant."""
    config = asdict(TrainConfig())
    upstream = model_card.objective_text(config)
    assert "chain logit distillation" not in upstream and "*chain distillation*" not in upstream
    logits = model_card.objective_text({**config, "chain_logit_weight": 0.5})
    assert "chain logit distillation" in logits and "(weight 0.5)" in logits and model_card.CARRY_NOTE not in logits
    carried = model_card.objective_text({**config, "chain_logit_weight": 0.5, "chain_carry_answer": True})
    assert model_card.CARRY_NOTE in carried
    states = model_card.objective_text({**config, "chain_distill_weight": 10.0})
    assert "*chain distillation*" in states and "(weight 10.0)" in states
    assert model_card.initialisation_text(config) == ""
    fourier = model_card.initialisation_text({**config, "number_fourier_scale": 0.25})
    assert "Fourier code of their value (amplitude 0.25, periods 2, 5, 10, 16, 32, 64;" in fourier
    assert model_card.data_variants_text({"shuffle": False}) == ""
    both = model_card.data_variants_text({"shuffle": True, "halve_odd": True})
    assert both.startswith("\nThe day sentences come in random order") and "`<<7//2=3>>`" in both


def test_training_on_a_data_variant_records_it(tmp_path, monkeypatch):
    """``--halve-odd --shuffle-days`` train on the harder generator variants, with their vocabulary."""
    monkeypatch.setattr(recipes, "SHIPPED_SPLITS", {"seed": 0, "n_train": 64, "n_val": 8, "n_test": 40})
    tiny = ["--steps", "1", "--batch-size", "4", "--d-model", "16", "--d-mlp", "32", "--prj-dim", "16"]
    export = train_toy_codi.main(
        ["--out", str(tmp_path / "run"), "--halve-odd", "--shuffle-days", "--val-size", "4", "--threads", "1", *tiny]
    )
    data = json.loads((export / "training.json").read_text())["data"]
    assert data["halve_odd"] is True and data["shuffle"] is True
    test_text = (export / "data" / "test.jsonl").read_text()
    assert "//" in test_text and "rounding" in test_text
    assert "rounding" in json.loads((export / "tokenizer.json").read_text())["model"]["vocab"]


def test_chain_recipe_trains_with_day_labelled_chains_and_the_chain_loss(tmp_path, monkeypatch):
    """``--recipe toy-chain`` draws long chains, gives the teacher day-labelled solutions and adds the
    chain logit distillation (logged, nonzero); a flag still overrides the recipe."""
    monkeypatch.setattr(recipes, "SHIPPED_SPLITS", {"seed": 0, "n_train": 64, "n_val": 8, "n_test": 8})
    tiny = ["--steps", "1", "--batch-size", "4", "--d-model", "16", "--d-mlp", "32", "--prj-dim", "16"]
    out = tmp_path / "run"
    export = train_toy_codi.main(
        ["--recipe", "toy-chain", "--out", str(out), "--val-size", "4", "--threads", "1", *tiny]
    )
    training = json.loads((export / "training.json").read_text())
    assert training["data"]["step_mix"] == "long" and training["data"]["cot_days"] is True
    assert training["config"]["chain_logit_weight"] > 0 and training["config"]["cot_text"] == "solution"
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["chain_logits"] > 0 and "chain" not in log
    assert "Monday <<" in (export / "data" / "test.jsonl").read_text()
    args = train_toy_codi.parse_args(["--recipe", "toy-chain", "--chain-logit-weight", "0", "--no-cot-days"])
    assert args.chain_logit_weight == 0 and args.cot_days is False


@pytest.mark.parametrize("recipe", sorted(set(recipes.RECIPES) & set(PRETRAINED)))
def test_recipes_train_the_shipped_models(recipe):
    """``python -m experiments.train_toy_codi --recipe NAME`` must train what ``training.json`` of the
    shipped model NAME records (config, model shape, data), and no flags the default model's recipe;
    the no-CoT baseline differs only where it must."""
    assert recipes.DEFAULT_RECIPE == DEFAULT_MODEL
    shipped = json.loads((PRETRAINED[recipe] / "training.json").read_text())
    args = train_toy_codi.parse_args(["--recipe", recipe] if recipe != DEFAULT_MODEL else [])
    config = asdict(train_toy_codi.train_config(args))
    assert config == {**asdict(TrainConfig()), **shipped["config"]}  # fields added since default to off
    assert {k: getattr(args, k) for k in recipes.MODEL_SHAPE} == shipped["model_shape"]
    assert shipped["data"] == {**recipes.SHIPPED_SPLITS, **recipes.RECIPES[recipe].data}

    if config["method"] != "codi":  # a no-CoT baseline is the same for every method: its CODI recipe's
        with pytest.raises(FlagError, match="--no-cot with --recipe"):
            train_toy_codi.train_config(train_toy_codi.parse_args(["--recipe", recipe, "--no-cot"]))
        return
    no_cot = train_toy_codi.train_config(train_toy_codi.parse_args(["--recipe", recipe, "--no-cot"]))
    changed = {k for k, v in asdict(no_cot).items() if v != config[k] and k not in BOOKKEEPING_FIELDS}
    assert changed == {"use_teacher", "n_latents", "student_weight"}
    assert no_cot.student_weight == 1.0 and no_cot.n_latents == 0
