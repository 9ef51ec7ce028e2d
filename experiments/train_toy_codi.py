"""Train a shipped toy CODI model from scratch (or a variant of it).

    python -m experiments.train_toy_codi [--recipe toy-chain|toy-arith] [--out DIR] [--steps N] [--export DIR]

With no flags this trains the default shipped model, ``toy-chain`` (``codi_lens/pretrained/toy_chain``),
whose thoughts carry the chain; ``--recipe toy-arith`` trains the earlier default, ``toy-arith``
(``codi_lens/pretrained/toy_arith``), which answers mostly from the question. A recipe is where the
run departs from ``TrainConfig()`` and from the generator's defaults (``RECIPES``); any flag
overrides it.

- ``toy-arith``: data from ``codi_lens.synthetic`` (1-5 steps), the upstream CODI objective with the
  answer's cross-entropy weighted 4x (it is a mean over the 6 tokens of "The answer is: N <eos>", of
  which only N is hard) and each batch cut into 2 length-grouped micro-batches.
- ``toy-chain``: chains weighted to 4-6 steps (``--step-mix long``), day sentences in random order
  and odd values halved too (``--shuffle-days --halve-odd``: the question alone no longer gives the
  answer away cheaply); the teacher writes the whole chain with each step's day before its equation
  (``--cot-days --cot-text solution --drop-last-cot-step false``); the *chain logit distillation* is
  added (``--chain-logit-weight``): thought ``j``'s next-token distribution is pulled toward the
  teacher's where it is about to write intermediate result ``j``, and thoughts past the last result
  toward the teacher's before the answer number (``--chain-carry-answer``; see
  ``codi_lens.training.chain_logit_loss``); the number tokens' embeddings start with a Fourier code
  of their value (``--number-fourier-scale``, ``codi_lens.training.fourier_number_embeddings``: the
  teacher and the thoughts learn exact arithmetic much sooner). 5,000 steps of 64 (about
  40 minutes on this machine type, which differs in speed by 2x).

The run resumes from ``--out/train_state.pt`` if killed. ``--no-cot`` trains the same architecture
on question -> answer only (no teacher, no distillation, 0 latents, student weight 1): the no-CoT
baseline. ``--halve-odd`` / ``--shuffle-days`` / ``--step-mix`` choose variants of the generator
(see ``codi_lens.synthetic``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from codi_lens.synthetic import MAX_VALUE, SHIPPED_SPLITS, STEP_MIXES, build_tokenizer, make_splits, save_jsonl
from codi_lens.training import (
    CODIModule,
    TrainConfig,
    Trainer,
    add_codi_tokens,
    build_llama_lm,
    export_codi,
    fourier_number_embeddings,
)

MODEL_SHAPE = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 512}
#: Seed and split sizes of every recipe's data.
DATA = SHIPPED_SPLITS


@dataclass(frozen=True)
class Recipe:
    """Where a shipped model's training departs from ``TrainConfig()`` and from the generator's
    defaults (see the module docstring)."""

    config: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    #: The name its data's problem ids start with (``codi_lens.data``: ``"toy:test"``, ``"toy-chain:test"``).
    dataset: str = "toy"


RECIPES = {
    "toy-arith": Recipe(config={"student_weight": 4.0, "micro_batches": 2}),
    "toy-chain": Recipe(
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
}
#: The recipe of the default shipped model (``codi_lens.loading.DEFAULT_MODEL``).
DEFAULT_RECIPE = "toy-chain"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    recipe_name = recipe_parser.parse_known_args(argv)[0].recipe
    recipe = RECIPES[recipe_name]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[recipe_parser]
    )
    parser.add_argument(
        "--out", default=None, help="work dir: resume state, log, export (default runs/<recipe>[_no_cot])"
    )
    parser.add_argument("--export", default=None, help="also export the final model here")
    parser.add_argument("--no-cot", action="store_true", help="train the no-CoT baseline instead")
    parser.add_argument(
        "--shuffle-days",
        action="store_true",
        default=recipe.data.get("shuffle", False),
        help="data variant: day sentences in random order",
    )
    parser.add_argument(
        "--halve-odd",
        action="store_true",
        default=recipe.data.get("halve_odd", False),
        help="data variant: halve odd values too, rounding down",
    )
    parser.add_argument(
        "--cot-days",
        action=argparse.BooleanOptionalAction,
        default=recipe.data.get("cot_days", False),
        help="data variant: each equation of the solution preceded by its day",
    )
    parser.add_argument(
        "--step-mix",
        default=recipe.data.get("step_mix", "default"),
        choices=sorted(STEP_MIXES),
        help="data: share of problems per chain length",
    )
    parser.add_argument(
        "--stop-at", type=int, default=None, help="stop this invocation at that step (resume later); no export"
    )
    defaults = replace(TrainConfig(), **recipe.config)
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    for name, value in MODEL_SHAPE.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    return parser.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the parsed flags. The no-CoT baseline (``--no-cot``) has no teacher (so
    no distillation), 0 latents and answer CE weight 1; everything else as given."""
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    return replace(cfg, use_teacher=False, n_latents=0, student_weight=1.0) if args.no_cot else cfg


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = train_config(args)
    out = Path(args.out or f"runs/{args.recipe.replace('-', '_')}{'_no_cot' if args.no_cot else ''}")
    data = dict(DATA)
    if args.shuffle_days:
        data["shuffle"] = True
    if args.halve_odd:
        data["halve_odd"] = True
    if args.step_mix != "default":
        data["step_mix"] = args.step_mix
    if args.cot_days:
        data["cot_days"] = True
    splits = make_splits(**data, name=RECIPES[args.recipe].dataset)
    tokenizer = build_tokenizer(halve_odd=args.halve_odd)
    lm = build_llama_lm(len(tokenizer), seed=cfg.seed, **{k: getattr(args, k) for k in MODEL_SHAPE})
    if cfg.number_fourier_scale:
        numbers = list(range(MAX_VALUE + 1))
        ids = tokenizer.convert_tokens_to_ids([str(v) for v in numbers])
        fourier_number_embeddings(lm, ids, numbers, cfg.number_fourier_scale)
    base_vocab = add_codi_tokens(lm)
    model = CODIModule(lm, cfg.prj_dim, cfg.prj_layernorm, cfg.prj_gain_matches_embeddings)
    trainer = Trainer(model, tokenizer, base_vocab, cfg, splits["train"], splits["validation"], workdir=out)
    start = time.perf_counter()
    trainer.fit(stop_at=args.stop_at)
    wall = time.perf_counter() - start
    if trainer.step < cfg.steps:
        print(f"stopped at step {trainer.step}/{cfg.steps}; rerun the same command to resume")
        return out
    export_dir = Path(args.export) if args.export else out / "export"
    export_codi(model, tokenizer, export_dir)
    save_jsonl(splits["test"], export_dir / "data" / "test.jsonl")
    (export_dir / "training.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "model_shape": {k: getattr(args, k) for k in MODEL_SHAPE},
                "data": data,
                "wall_seconds_this_invocation": round(wall, 1),
                "wall_seconds_total": round(trainer.wall_seconds, 1),
                "steps": trainer.step,
            },
            indent=2,
        )
    )
    print(f"exported to {export_dir}")
    return export_dir


if __name__ == "__main__":
    main()
