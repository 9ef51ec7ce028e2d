"""Which earlier features drive a feature of a later thought? Gradient attribution through the latent
loop, checked by replaying each candidate's ablation.

    python -m experiments.feature_pathways [--saes results/train_saes] [--target SAE_ID]
        [--target-feature F] [--sources ID,...] [--data toy-chain:test] [--limit 200] [--candidates 20] [--out DIR]

The target is a feature of one SAE (default: the SAE computed last in the loop among ``--saes``, and its
most frequent feature on these problems); the sources are the features of SAEs computed before it
(default: all the others that are; ``codi_lens.pathways.site_order``), through the feedback loop when
they sit at earlier thoughts. With every SAE spliced in with its error term (the model's own run),
one backward pass gives each active source feature's attribution ``-activation * gradient``, the
linear estimate of the target's change if that feature were ablated, per problem. The
``--candidates`` sources with the largest mean |attribution| are then ablated for real, one at a
time, and the target's actual change is measured; the Pearson correlation of predicted and actual
changes over (candidate, problem) pairs is reported with a 95% bootstrap CI over problems.

Writes to ``--out`` (default ``results/feature_pathways``): ``run.json``, ``attributions.parquet`` (every
active source feature x problem), ``candidates.parquet``, ``parts/`` and ``results.parquet`` (one row per
candidate x problem: ``problem_id, source_site, source_feature, predicted, actual``), ``summary.json``
and ``pathways.html``. The replays resume after a kill.
"""

from __future__ import annotations

from pathlib import Path

from codi_lens.pathways import choose_pathway, pathway_study
from codi_lens.reports.saes import write_pathways
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run
from codi_lens.saes import load_saes


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/feature_pathways", batch_size=16, limit=200)
    parser.add_argument("--saes", default="results/train_saes", help="folder of SAELens folders (train_saes --out)")
    parser.add_argument("--target", default=None, help="SAE id of the target (default: the last-computed site)")
    parser.add_argument("--target-feature", type=int, default=None, help="default: its most frequent feature")
    parser.add_argument("--sources", default=None, help="comma-separated SAE ids (default: all earlier ones)")
    parser.add_argument("--candidates", type=int, default=20, help="source features replayed")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)
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


if __name__ == "__main__":
    run_main(main)
