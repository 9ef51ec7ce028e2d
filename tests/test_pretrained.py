"""The shipped toy models: strict loading, size, and their cards' numbers on a test subset."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from codi_lens import load_pretrained
from codi_lens.data import load_problems
from codi_lens.interventions import zero_thoughts
from codi_lens.loading import PRETRAINED
from codi_lens.loading.architectures import describe_base
from codi_lens.loading.checkpoint import detect_layout, read_tensor_info, validate_checkpoint

#: Each shipped model and the name of its test split.
TEST_SPLITS = {"toy-arith": "toy:test", "toy-chain": "toy-chain:test", "toy-coconut": "toy-chain:test"}
SUBSET = 300
#: Greedy decoding is deterministic; only float rounding (another thread count or CPU) can flip a
#: near-tie, so at most this many of the subset's predictions may differ from the card's run.
MAX_CHANGED = 2


def test_every_shipped_model_has_a_test_split():
    assert set(TEST_SPLITS) == set(PRETRAINED)


@pytest.mark.parametrize("name", sorted(TEST_SPLITS))
def test_shipped_files_and_size(name):
    directory = PRETRAINED[name]
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    for file in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "MODEL_CARD.md",
        "card.json",
        "predictions.parquet",
        "data/test.jsonl",
    ):
        assert (directory / file).is_file(), file
    assert "/" not in json.loads((directory / "card.json").read_text())["summary"]["checkpoint"]  # no build path


@pytest.mark.parametrize("name", sorted(TEST_SPLITS))
def test_loads_through_the_strict_loader(name):
    model = load_pretrained(name)
    info = read_tensor_info(PRETRAINED[name] / "model.safetensors")
    layout = validate_checkpoint(info, describe_base(PRETRAINED[name]))
    assert layout == detect_layout(info) and not layout.uses_lora and layout.family == "llama"
    assert model.cfg.n_key_value_heads is not None  # GQA
    assert model.cfg.normalization_type == "RMS" and model.cfg.positional_embedding_type == "rotary"


@pytest.mark.parametrize("name", sorted(TEST_SPLITS))
@pytest.mark.parametrize("condition", ["latents", "zero_all_thoughts"])
def test_reproduces_the_cards_predictions_problem_by_problem(name, condition):
    """The card's run stored every prediction; a rerun of the first problems must give the same ones
    (a broken loop, a wrong budget or a shifted hook changes many)."""
    directory = PRETRAINED[name]
    card = json.loads((directory / "card.json").read_text())
    model = load_pretrained(name)
    problems = load_problems(TEST_SPLITS[name], limit=SUBSET)
    hooks = zero_thoughts(range(1, 7)) if condition == "zero_all_thoughts" else ()
    budget = card["summary"]["max_new_tokens"]
    predicted = []
    for start in range(0, SUBSET, 100):
        batch = problems[start : start + 100]
        predicted += model.run_codi([p.question for p in batch], max_new_tokens=budget, fwd_hooks=hooks).prediction
    stored = pd.read_parquet(directory / "predictions.parquet")
    stored = stored[stored["condition"] == condition].set_index("problem_id").loc[[p.id for p in problems]]
    expected = [None if pd.isna(x) else x for x in stored["prediction"]]
    changed = sum(a != b for a, b in zip(predicted, expected))
    assert changed <= MAX_CHANGED, f"{changed} of {SUBSET} predictions differ from the card's run"
    n_correct = sum(pred == p.gold for pred, p in zip(predicted, problems))
    assert abs(n_correct - int(stored["correct"].sum())) <= MAX_CHANGED
    # The stored predictions are the ones the card's figures were computed from.
    every = pd.read_parquet(directory / "predictions.parquet")
    assert every[every["condition"] == condition]["correct"].mean() == card["summary"]["accuracy"][condition]
