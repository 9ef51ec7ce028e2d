"""Train sparse autoencoders on the continuous thoughts, one per (site, architecture), and evaluate them.

    python -m experiments.train_saes [--sites thought.1.hook_hidden,...] [--architectures topk]
        [--d-sae 512] [--k 16] [--l1 1.0] [--training-samples 300000] [--train-data toy-chain:train]
        [--train-limit 4000] [--data toy-chain:test] [--limit 500] [--splice-limit 200] [--out DIR]

A site is a thought hook (``thought.3.hook_hidden``: h_3, what the projection reads) or a hook with a
position axis read at one thought (``blocks.1.hook_resid_post@3``; thought 0 = BOT). Each SAE sees
its own site's activations only. Training problems (``--train-data``, the first ``--train-limit``)
and held-out problems (``--data``, the first ``--limit``) must not share an id.

Stages, each resumable after a kill: thought activations of both problem sets (``activations/``,
``codi_lens.activations``); one SAE per site x architecture with SAELens' trainer
(``work/<sae_id>/checkpoints`` while training, then ``saes/<sae_id>/`` in SAELens format with the
site in its metadata); held-out evaluation: explained variance (``1 - sum Var(x - x_hat) / sum
Var(x)``, 95% bootstrap CI over problems), L0, dead and dense fractions, cosine, MSE, and the answer
with the reconstruction spliced into the loop, with and without the error term, on the first
``--splice-limit`` held-out problems (accuracy and KL(plain || spliced) at the answer number).

Writes to ``--out`` (default ``results/train_saes``): ``run.json``, ``parts/``, ``results.parquet``
(one row per SAE: ``sae_id, hook, thought, site, architecture, d_sae, k, explained_variance`` (+ CI),
``l0, dead_fraction, dense_fraction, cosine, mse, n_train, n_heldout``, and per splice condition
``accuracy_*``, ``kl_*``, ``changed_*``), ``splice.parquet`` (one row per SAE x condition x problem),
``train_problems.json``, ``summary.json``, ``sae_quality.html`` and ``sae_splice.html``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace

from codi_lens.core.errors import FlagError
from codi_lens.core.sites import Site
from codi_lens.data import load_problems
from codi_lens.loading import default_data
from codi_lens.reports.saes import write_sae_suite
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run
from codi_lens.run.store import UNIT_COLUMN
from codi_lens.saes import SAE_ARCHITECTURES, SAERecipe, recipe_dict
from codi_lens.saes.suite import train_sae_suite
from codi_lens.saes.train import check_training_rows

DEFAULT_SITES = ",".join(f"thought.{k}.hook_hidden" for k in range(1, 7))


def parse_sites(text: str) -> list[Site]:
    """``--sites``: comma-separated sites, ``hook`` (a thought hook) or ``hook@thought``."""
    try:
        return [Site.parse(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise FlagError(f"--sites: {exc}") from None


@dataclass
class TrainSAEsConfig:
    """What the command trains (checked on creation, naming the flag)."""

    sites: list[Site]
    architectures: list[str]
    recipe: SAERecipe

    def __post_init__(self) -> None:
        if not self.sites:
            raise FlagError("--sites is empty")
        SAE_ARCHITECTURES.check(self.architectures, "--architectures")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSAEsConfig:
        architectures = SAE_ARCHITECTURES.parse_list(args.architectures, "--architectures")
        recipe = SAERecipe(
            architecture=architectures[0],
            d_sae=args.d_sae,
            k=args.k,
            l1_coefficient=args.l1,
            lr=args.lr,
            batch_size=args.sae_batch_size,
            training_samples=args.training_samples,
            seed=args.seed,
        )
        return cls(parse_sites(args.sites), architectures, recipe)

    def settings(self) -> dict:
        """What ``run.json`` records of the SAEs: the sites, architectures and each one's recipe."""
        recipes = {a: recipe_dict(replace(self.recipe, architecture=a)) for a in self.architectures}
        return {"sites": [s.id for s in self.sites], "architectures": self.architectures, "recipes": recipes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", default=DEFAULT_SITES, help="comma-separated sites (hook or hook@thought)")
    parser.add_argument("--architectures", default="topk", help=f"comma-separated: {SAE_ARCHITECTURES.help()}")
    parser.add_argument("--d-sae", type=int, default=512, help="features per SAE")
    parser.add_argument("--k", type=int, default=16, help="active features of the TopK family")
    parser.add_argument("--l1", type=float, default=1.0, help="L1 coefficient of the standard SAE")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sae-batch-size", type=int, default=256, help="activations per SAE training step")
    parser.add_argument("--training-samples", type=int, default=300_000, help="activations each SAE trains on")
    parser.add_argument(
        "--train-data",
        default=None,
        help="problems whose thoughts train the SAEs (default: the "
        "checkpoint's own training split, toy-chain:train for toy-chain)",
    )
    parser.add_argument("--train-limit", type=int, default=4000, help="the first N training problems")
    parser.add_argument("--splice-limit", type=int, default=200, help="held-out problems of the splice test")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/train_saes", batch_size=100, limit=500)
    add_arguments(parser)
    args = parse_common_args(parser, argv)
    args.train_data = args.train_data or default_data(args.checkpoint, "train")
    config = TrainSAEsConfig.from_args(args)
    run = start_run(args)
    run.check_sites(config.sites, "--sites")
    train = load_problems(args.train_data, limit=args.train_limit)
    check_training_rows(len(train), config.recipe.batch_size)
    heldout = run.problems()
    settings = run.settings(
        train_data=args.train_data,
        train_limit=args.train_limit,
        splice_limit=args.splice_limit,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        **config.settings(),
    )
    results, splice, store = train_sae_suite(
        run.model,
        train,
        heldout,
        config.sites,
        config.recipe,
        config.architectures,
        run.out,
        splice_limit=args.splice_limit,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        model_name=str(args.checkpoint),
        device=args.device,
        settings=settings,
        overwrite=args.overwrite,
        executor=run.executor,
    )
    (run.out / "train_problems.json").write_text(json.dumps([p.id for p in train]))
    summary = write_sae_suite(results, splice, run.out)
    summary |= {
        "n_train_problems": len(train),
        "n_heldout_problems": len(heldout),
        "wall_seconds_this_invocation": run.elapsed(),
    }
    store.finish(results.drop(columns=UNIT_COLUMN), summary)
    ev = results["explained_variance"]
    print(
        f"wrote {len(results)} SAEs to {run.out / 'saes'}; explained variance {ev.min():.3f}-{ev.max():.3f} "
        f"on {len(heldout)} held-out problems"
    )
    return summary


if __name__ == "__main__":
    run_main(main)
