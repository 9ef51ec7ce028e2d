"""The shipped toy-arith model: strict loading, size, and its card's numbers on a test subset."""

from __future__ import annotations

import json

import pytest

from codi_lens import load_pretrained
from codi_lens.checkpoint import read_tensor_info, validate_checkpoint
from codi_lens.data import load_problems
from codi_lens.evaluate import codi_runner, evaluate
from codi_lens.interventions import zero_thoughts
from codi_lens.loading import PRETRAINED

DIRECTORY = PRETRAINED["toy-arith"]
SUBSET = 300
#: Accuracy on a 300-problem subset vs the card's 1,000-problem figure: binomial sd <= 2.9 points,
#: so 8 points is ~2.8 sd.
TOLERANCE = 0.08


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((DIRECTORY / "card.json").read_text())


def test_shipped_files_and_size():
    total = sum(p.stat().st_size for p in DIRECTORY.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    for name in ("model.safetensors", "config.json", "tokenizer.json", "MODEL_CARD.md", "card.json", "data/test.jsonl"):
        assert (DIRECTORY / name).is_file(), name


def test_loads_through_the_strict_loader():
    model = load_pretrained("toy-arith")
    layout = validate_checkpoint(read_tensor_info(DIRECTORY / "model.safetensors"), model.architecture)
    assert layout == model.layout and not layout.uses_lora and layout.family == "llama"
    assert model.cfg.n_key_value_heads is not None  # GQA
    assert model.cfg.normalization_type == "RMS" and model.cfg.positional_embedding_type == "rotary"


def test_reaches_its_card_accuracy_on_a_test_subset(card, tmp_path):
    model = load_pretrained("toy-arith")
    problems = load_problems(DIRECTORY / "data" / "test.jsonl", limit=SUBSET)
    with_thoughts = evaluate(
        codi_runner(model, max_new_tokens=12), problems, tmp_path / "a.jsonl", batch_size=100, progress=False
    )["correct"].mean()
    ablated = evaluate(
        codi_runner(model, max_new_tokens=12, fwd_hooks=zero_thoughts(range(1, 7))),
        problems,
        tmp_path / "b.jsonl",
        batch_size=100,
        progress=False,
    )["correct"].mean()
    reported = card["summary"]["accuracy"]
    assert abs(with_thoughts - reported["latents"]) <= TOLERANCE
    assert abs(ablated - reported["zero_all_thoughts"]) <= TOLERANCE
