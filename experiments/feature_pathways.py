"""Which earlier features drive a feature of a later thought? Gradient attribution through the latent
loop, checked by replaying each candidate's ablation.

    python -m experiments.feature_pathways [--saes results/train_saes] [--target SAE_ID]
        [--target-feature F] [--sources ID,...] [--data toy-chain:test] [--limit 200] [--candidates 20] [--out DIR]
    python -m experiments.feature_pathways --targets causal [--screen results/feature_screen] [--adjacent]
        [--candidates 10] [--threshold 0.0] [--saes ...] [--out DIR]
    python -m experiments.feature_pathways --targets thought.5.hook_hidden/17,thought.4.hook_hidden/3 ...

The target is a feature of one SAE (default: the SAE computed last in the loop among ``--saes``, and its
most frequent feature on these problems); the sources are the features of SAEs computed before it
(default: all the others that are; ``codi_lens.pathways.site_order``), through the feedback loop when
they sit at earlier thoughts. With every SAE spliced in with its error term (the model's own run),
one backward pass gives each active source feature's attribution ``-activation * gradient``, the
linear estimate of the target's change if that feature were ablated, per problem. The
``--candidates`` sources with the largest mean |attribution| are then ablated for real, one at a
time, and the target's actual change is measured; the Pearson correlation of predicted and actual
changes over (candidate, problem) pairs is reported with a 95% bootstrap CI over problems.

Many targets (``--targets causal``: every feature ``experiments.feature_screen`` selected, read from
``--screen``'s ``causal.parquet``; ``strongest:N``: per site, the screen's N largest effects, passing or
not; or a list of feature ids ``site/feature``): one forward per batch of problems with every SAE spliced in,
one backward pass per target over the kept graph; per target the ``--candidates``
sources with the largest mean |attribution| of at least ``--threshold`` (``--adjacent``: only sources at the
thought just before the target's); one replay per distinct candidate source measures every target at once.
Per pathway (target, source): predicted and replayed mean change, the replayed 95% bootstrap CI over
problems, and "validated" when that CI excludes 0 with the predicted sign; agreement (Pearson over
(candidate, problem) pairs) per target and pooled, with CIs. Writes ``attributions.parquet`` (with
``target_id``), ``candidates.parquet``, ``results.parquet`` (``target_id, source_id, problem_id, predicted,
actual``), ``pathways.parquet``, ``agreement.parquet``, ``summary.json`` and ``pathways.html``; one SAE per site.

Writes to ``--out`` (default ``results/feature_pathways``): ``run.json``, ``attributions.parquet`` (every
active source feature x problem), ``candidates.parquet``, ``parts/`` and ``results.parquet`` (one row per
candidate x problem: ``problem_id, source_site, source_feature, predicted, actual``), ``summary.json``
and ``pathways.html``. The replays resume after a kill.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from codi_lens.core.errors import FlagError
from codi_lens.feature_screen import named_features
from codi_lens.pathways import choose_pathway, pathway_study, study_pathways
from codi_lens.reports.saes import write_pathway_study, write_pathways
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run
from codi_lens.saes import SAEError, load_saes
from codi_lens.saes.ids import audit_feature_ids, saes_by_site


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/feature_pathways", batch_size=16, limit=200)
    parser.add_argument("--saes", default="results/train_saes", help="folder of SAELens folders (train_saes --out)")
    parser.add_argument("--target", default=None, help="SAE id of the target (default: the last-computed site)")
    parser.add_argument("--target-feature", type=int, default=None, help="default: its most frequent feature")
    parser.add_argument("--sources", default=None, help="comma-separated SAE ids (default: all earlier ones)")
    parser.add_argument(
        "--targets",
        default=None,
        help="'causal' (the screen's selection), 'strongest:N' (per site), or feature ids site/f,...",
    )
    parser.add_argument("--screen", default="results/feature_screen", help="feature_screen --out, for --targets causal")
    parser.add_argument("--sae-ids", default=None, help="with --targets: SAE ids to load (one per site)")
    parser.add_argument("--adjacent", action="store_true", help="with --targets: sources at the previous thought only")
    parser.add_argument("--threshold", type=float, default=0.0, help="with --targets: least mean |attribution|")
    parser.add_argument("--candidates", type=int, default=20, help="source features replayed (per target)")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)
    if args.targets is not None:
        return many_targets(args)
    run = start_run(args)
    problems = run.problems()
    sources = [s.strip() for s in args.sources.split(",")] if args.sources else None
    choice = choose_pathway(load_saes(args.saes, device=args.device), args.target, sources)  # before the model
    settings = run.settings(
        saes=str(Path(args.saes)),
        target=choice.target_id,
        sources=choice.source_ids,
        candidates=args.candidates,
        n_latents=args.n_latents,
    )
    joined, agreement, candidates, store = pathway_study(
        run.model,
        problems,
        choice,
        run.out,
        target_feature=args.target_feature,
        n_candidates=args.candidates,
        n_latents=args.n_latents,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
    )
    summary = {"target": choice.target_id, "sources": choice.source_ids, "n_problems": len(problems)}
    summary |= {"n_candidates": len(candidates), **write_pathways(joined, agreement, run.out)}
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(joined, summary)
    pearson, low, high, n_pairs = (agreement[k] for k in ("pearson", "low", "high", "n_pairs"))
    print(
        f"target {choice.target_id} feature {agreement['target_feature']}: predicted vs replayed change, "
        f"Pearson {pearson:.3f} [{low:.3f}, {high:.3f}] over {n_pairs} pairs"
    )
    return summary


def many_targets(args) -> dict:
    """``--targets``: pathways to many target features in one study."""
    try:
        targets = named_features(args.targets, args.screen)
    except SAEError as error:
        raise FlagError(f"--targets: {error}") from None
    ids = [i.strip() for i in args.sae_ids.split(",")] if args.sae_ids else None
    run = start_run(args)
    problems = run.problems()
    saes = saes_by_site(load_saes(args.saes, ids, device=args.device))
    orphans = audit_feature_ids({"--targets": pd.DataFrame({"feature_id": targets})}, saes)
    if len(orphans):
        first = orphans.iloc[0]
        raise FlagError(f"--targets: {first['feature_id']}: {first['reason']} in --saes {args.saes}")
    settings = run.settings(
        saes=str(Path(args.saes)),
        sites=list(saes),
        candidates=args.candidates,
        threshold=args.threshold,
        adjacent=args.adjacent,
        n_latents=args.n_latents,
    )
    study, store = study_pathways(
        run.model,
        problems,
        saes,
        targets,
        run.out,
        n_candidates=args.candidates,
        threshold=args.threshold,
        adjacent=args.adjacent,
        n_latents=args.n_latents,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
    )
    summary = {"n_problems": len(problems), **write_pathway_study(study, run.out)}
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(study.joined, summary)
    print(
        f"{summary['n_validated']} of {summary['n_pathways']} pathways to {summary['n_targets']} targets validated; "
        f"pooled Pearson {summary['pooled_pearson']} {summary['pooled_pearson_ci95']}"
    )
    return summary


if __name__ == "__main__":
    run_main(main)
