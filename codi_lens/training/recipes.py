"""The recipes of the shipped toy models, and a toy model trained from one (``python -m experiments.train_toy_codi``).

A recipe says where a shipped model's training departs from ``TrainConfig()`` and from the synthetic
generator's defaults. :func:`train_toy_model` builds the data and a from-scratch LLaMA-architecture model,
trains it (resumable in its work dir) and exports it in upstream's layout with its test split and a
``training.json`` that records the config, the model's shape and the data (which ``codi_lens.data`` reads to
regenerate the train and validation splits).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codi_lens.core.registry import Registry
from codi_lens.data.synthetic import MAX_VALUE, SHIPPED_SPLITS, build_tokenizer, make_splits, save_jsonl
from codi_lens.training.coconut import ANSWER_SYMBOLS, CoconutModule
from codi_lens.training.config import TrainConfig
from codi_lens.training.export import export_codi
from codi_lens.training.module import CODIModule, add_codi_tokens, build_llama_lm, fourier_number_embeddings
from codi_lens.training.trainer import Trainer

#: The shipped models' shape (``build_llama_lm``'s arguments).
MODEL_SHAPE = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 512}


@dataclass(frozen=True)
class Recipe:
    """Where a shipped model's training departs from ``TrainConfig()`` and from the generator's defaults.

    Attributes:
        config: ``TrainConfig`` fields; data: ``make_splits`` arguments beyond :data:`SHIPPED_SPLITS`;
        dataset: the name its data's problem ids start with (``"toy:test"``, ``"toy-chain:test"``).
    """

    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    dataset: str = "toy"


RECIPES: Registry[Recipe] = Registry("training recipe")
RECIPES.add("toy-arith", Recipe(config={"student_weight": 4.0, "micro_batches": 2}))
RECIPES.add(
    "toy-chain",
    Recipe(
        config={
            "student_weight": 4.0,
            "micro_batches": 2,
            "chain_logit_weight": 1.0,
            "number_fourier_scale": 0.25,
            "steps": 5000,
            "chain_carry_answer": True,
            "drop_last_cot_step": False,
            "cot_text": "solution",
            "val_every": 500,
        },
        data={"step_mix": "long", "cot_days": True, "shuffle": True, "halve_odd": True},
        dataset="toy-chain",
    ),
)
RECIPES.add(
    "toy-coconut",
    Recipe(
        config={
            "method": "coconut",
            "stage_steps": 750,
            "steps": 7500,
            "micro_batches": 2,
            "number_fourier_scale": 0.25,
            "drop_last_cot_step": False,
            "cot_text": "solution",
            "val_every": 750,
        },
        data={"step_mix": "long", "cot_days": True, "shuffle": True, "halve_odd": True},
        dataset="toy-chain",
    ),
)
#: The recipe of the default shipped model (``codi_lens.loading.DEFAULT_MODEL``).
DEFAULT_RECIPE = "toy-chain"


def train_toy_model(
    cfg: TrainConfig,
    data: dict[str, Any],
    shape: dict[str, int],
    *,
    dataset: str,
    workdir: str | Path,
    export: str | Path | None = None,
    stop_at: int | None = None,
) -> Path | None:
    """Train a toy CODI or Coconut model (``cfg.method``) on the synthetic splits ``make_splits(**data)`` (ids
    named after ``dataset``), resumable in ``workdir``; at the end export it (to ``export``, default
    ``workdir/export``) with its test split and ``training.json``. Returns the export folder, or None when
    stopped at ``stop_at`` first."""
    workdir = Path(workdir)
    splits = make_splits(**data, name=dataset)
    coconut = cfg.method == "coconut"
    tokenizer = build_tokenizer(data.get("halve_odd", False), ANSWER_SYMBOLS if coconut else ())
    lm = build_llama_lm(len(tokenizer), seed=cfg.seed, **shape)
    if cfg.number_fourier_scale:
        numbers = list(range(MAX_VALUE + 1))
        ids = tokenizer.convert_tokens_to_ids([str(v) for v in numbers])
        fourier_number_embeddings(lm, ids, numbers, cfg.number_fourier_scale)
    base_vocab = add_codi_tokens(lm)  # CODI's pad/BOT/EOT rows, or Coconut's start/end/latent rows
    model = (
        CoconutModule(lm)
        if coconut
        else CODIModule(lm, cfg.prj_dim, cfg.prj_layernorm, cfg.prj_gain_matches_embeddings)
    )
    trainer = Trainer(model, tokenizer, base_vocab, cfg, splits["train"], splits["validation"], workdir=workdir)
    start = time.perf_counter()
    trainer.fit(stop_at=stop_at)
    wall = time.perf_counter() - start
    if trainer.step < cfg.steps:
        return None
    export_dir = Path(export) if export else workdir / "export"
    export_codi(model, tokenizer, export_dir)
    save_jsonl(splits["test"], export_dir / "data" / "test.jsonl")
    record = {
        "config": asdict(cfg),
        "model_shape": shape,
        "data": data,
        "wall_seconds_this_invocation": round(wall, 1),
        "wall_seconds_total": round(trainer.wall_seconds, 1),
        "steps": trainer.step,
    }
    (export_dir / "training.json").write_text(json.dumps(record, indent=2))
    return export_dir


def run_data(**variants: Any) -> dict[str, Any]:
    """The generator arguments of a run: :data:`SHIPPED_SPLITS` and the data variants it turns on, in the order
    given (``shuffle``, ``halve_odd``, ``cot_days``: when True; ``step_mix``: when not the default)."""
    data = dict(SHIPPED_SPLITS)
    for name, value in variants.items():
        if value and value != "default":
            data[name] = value
    return data
