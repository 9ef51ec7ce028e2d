"""Train a shipped toy model from scratch, CODI or Coconut (or a variant of it).

    python -m experiments.train_toy_codi [--recipe toy-chain|toy-arith|toy-coconut] [--out DIR] [--steps N]
        [--export DIR]

With no flags this trains the default shipped model, ``toy-chain`` (``codi_lens/pretrained/toy_chain``),
whose thoughts carry the chain; ``--recipe toy-arith`` trains the earlier default, ``toy-arith``
(``codi_lens/pretrained/toy_arith``), which answers mostly from the question; ``--recipe toy-coconut`` trains
``toy-chain``'s Coconut twin (``codi_lens/pretrained/toy_coconut``). A recipe is where the
run departs from ``TrainConfig()`` and from the generator's defaults (``RECIPES``); any flag
overrides it.

- ``toy-arith``: data from ``codi_lens.data.synthetic`` (1-5 steps), the upstream CODI objective with the
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
- ``toy-coconut``: ``toy-chain``'s data, architecture and number initialisation, trained with Coconut's
  curriculum (``--method coconut``, ``codi_lens.training.coconut``): stage s writes the chain without its
  first s steps, which s latents replace (``--stage-steps`` steps per stage, ``--thoughts-per-step`` latents
  per step), cross-entropy on the rest and on ``### N``; every step a latent from stage 6 on.

The run resumes from ``--out/train_state.pt`` if killed. ``--no-cot`` trains the same architecture
on question -> answer only (no teacher, no distillation, 0 latents, student weight 1): the no-CoT
baseline. ``--halve-odd`` / ``--shuffle-days`` / ``--step-mix`` choose variants of the generator
(see ``codi_lens.data.synthetic``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

from codi_lens.core.errors import FlagError
from codi_lens.data.synthetic import STEP_MIXES
from codi_lens.training.config import TrainConfig
from codi_lens.training.recipes import DEFAULT_RECIPE, MODEL_SHAPE, RECIPES, run_data, train_toy_model


def add_variant_args(parser: argparse.ArgumentParser, data: dict) -> None:
    """The data variants, defaulting to the recipe's."""
    parser.add_argument(
        "--shuffle-days",
        action="store_true",
        default=data.get("shuffle", False),
        help="data variant: day sentences in random order",
    )
    parser.add_argument(
        "--halve-odd",
        action="store_true",
        default=data.get("halve_odd", False),
        help="data variant: halve odd values too, rounding down",
    )
    parser.add_argument(
        "--cot-days",
        action=argparse.BooleanOptionalAction,
        default=data.get("cot_days", False),
        help="data variant: each equation of the solution preceded by its day",
    )
    parser.add_argument(
        "--step-mix",
        default=data.get("step_mix", "default"),
        choices=sorted(STEP_MIXES),
        help="data: share of problems per chain length",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", choices=RECIPES.names(), default=DEFAULT_RECIPE)
    recipe = RECIPES[recipe_parser.parse_known_args(argv)[0].recipe]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[recipe_parser]
    )
    parser.add_argument("--out", default=None, help="work dir: resume state, log, export (default runs/<recipe>)")
    parser.add_argument("--export", default=None, help="also export the final model here")
    parser.add_argument("--no-cot", action="store_true", help="train the no-CoT baseline instead")
    parser.add_argument("--stop-at", type=int, default=None, help="stop at that step (resume later); no export")
    add_variant_args(parser, recipe.data)
    for name, value in asdict(replace(TrainConfig(), **recipe.config)).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    for name, value in MODEL_SHAPE.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    return parser.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the parsed flags. The no-CoT baseline (``--no-cot``) has no teacher (so
    no distillation), 0 latents and answer CE weight 1; everything else as given."""
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    if args.no_cot and cfg.method != "codi":
        raise FlagError(
            f"--no-cot with --recipe {args.recipe}: a no-CoT baseline has no latents, so it is the same for every "
            "method; train it with the CODI recipe of the same data (--recipe toy-chain --no-cot)"
        )
    return replace(cfg, use_teacher=False, n_latents=0, student_weight=1.0) if args.no_cot else cfg


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = train_config(args)
    out = Path(args.out or f"runs/{args.recipe.replace('-', '_')}{'_no_cot' if args.no_cot else ''}")
    data = run_data(shuffle=args.shuffle_days, halve_odd=args.halve_odd, step_mix=args.step_mix, cot_days=args.cot_days)
    shape = {k: getattr(args, k) for k in MODEL_SHAPE}
    export_dir = train_toy_model(
        cfg, data, shape, dataset=RECIPES[args.recipe].dataset, workdir=out, export=args.export, stop_at=args.stop_at
    )
    if export_dir is None:
        print(f"stopped at step {args.stop_at}/{cfg.steps}; rerun the same command to resume")
        return out
    print(f"exported to {export_dir}")
    return export_dir


if __name__ == "__main__":
    main()
