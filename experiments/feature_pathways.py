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

import argparse
import time
from pathlib import Path

import pandas as pd

from codi_lens.cli import add_common_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.data import load_problems
from codi_lens.pathways import (
    feature_attributions,
    pathway_agreement,
    replay,
    site_order,
    target_activation,
    top_candidates,
)
from codi_lens.plotting import pathway_scatter, write_html
from codi_lens.runner import UNIT_COLUMN, ResultStore
from codi_lens.saes import SAEError, load_saes, sae_site


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/feature_pathways", batch_size=200)
    parser.add_argument("--saes", default="results/train_saes", help="folder of SAELens folders (train_saes --out)")
    parser.add_argument("--target", default=None, help="SAE id of the target (default: the last-computed site)")
    parser.add_argument("--target-feature", type=int, default=None, help="default: its most frequent feature")
    parser.add_argument("--sources", default=None, help="comma-separated SAE ids (default: all earlier ones)")
    parser.add_argument("--candidates", type=int, default=20, help="source features replayed")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.set_defaults(limit=200)
    args = parse_common_args(parser, argv)

    started = time.perf_counter()
    model = load_model(args)
    saes = load_saes(args.saes, device=args.device)
    target_id = args.target or max(saes, key=lambda i: site_order(sae_site(saes[i])))
    if target_id not in saes:
        raise SAEError(f"--target {target_id!r} is not among the SAEs of {args.saes}: {sorted(saes)}")
    target = saes[target_id]
    earlier = [i for i in saes if site_order(sae_site(saes[i])) < site_order(sae_site(target))]
    source_ids = [s.strip() for s in args.sources.split(",")] if args.sources else earlier
    late = [i for i in source_ids if i not in earlier]
    if late or not source_ids:
        raise SAEError(f"--sources: {late or 'none'} are not SAEs computed before {target_id} (those are {earlier})")
    # One SAE per hook: of two architectures at one site, keep the first id.
    by_hook: dict[str, str] = {}
    for i in source_ids:
        by_hook.setdefault(sae_site(saes[i]).hook, i)
    sources = [saes[i] for i in by_hook.values()]
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    questions = [p.question for p in problems]
    all_saes = [*sources, target]
    # Every target feature on every problem, unablated: picks the default feature and is the replays' baseline.
    every = target_activation(model, questions, target, None, all_saes, n_latents=args.n_latents)
    feature = args.target_feature if args.target_feature is not None else int((every > 0).mean(axis=0).argmax())
    out = Path(args.out)
    settings = {
        **model_settings(model, args),
        "saes": str(Path(args.saes)),
        "target": target_id,
        "target_feature": feature,
        "sources": list(by_hook.values()),
        "data_source": args.data,
        "limit": args.limit,
        "candidates": args.candidates,
        "n_latents": args.n_latents,
    }
    store = ResultStore(out, settings, overwrite=args.overwrite)
    attributions_file = out / "attributions.parquet"
    if attributions_file.exists():
        attributions = pd.read_parquet(attributions_file)
    else:
        attributions, _ = feature_attributions(model, questions, target, feature, sources, n_latents=args.n_latents)
        attributions.to_parquet(attributions_file, index=False)
    candidates = top_candidates(attributions, len(problems), args.candidates)
    candidates.to_parquet(out / "candidates.parquet", index=False)

    def work(batch: list[tuple[str, int]]) -> pd.DataFrame:
        chosen = candidates.set_index(["source_site", "source_feature"]).loc[batch].reset_index()
        rows = replay(
            model, questions, target, feature, sources, chosen, clean=every[:, feature], n_latents=args.n_latents
        )
        return rows.assign(**{UNIT_COLUMN: rows["source_site"] + "/" + rows["source_feature"].astype(str)})

    units = list(zip(candidates["source_site"], candidates["source_feature"].astype(int)))
    replayed = store.run(units, work, unit_id=lambda u: f"{u[0]}/{u[1]}", batch_size=1, desc="replays")
    joined, agreement = pathway_agreement(attributions, replayed.drop(columns=UNIT_COLUMN))
    joined["problem_id"] = [problems[i].id for i in joined["problem"]]
    write_html(pathway_scatter(joined, agreement), out / "pathways.html")
    summary = {
        "target": target_id,
        "target_feature": feature,
        "sources": list(by_hook.values()),
        "n_problems": len(problems),
        "n_candidates": len(candidates),
        "pearson": agreement["pearson"],
        "pearson_ci95": [agreement["low"], agreement["high"]],
        "n_pairs": agreement["n_pairs"],
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    store.finish(joined, summary)
    print(
        f"target {target_id} feature {feature}: predicted vs replayed change, Pearson {agreement['pearson']:.3f} "
        f"[{agreement['low']:.3f}, {agreement['high']:.3f}] over {agreement['n_pairs']} pairs"
    )
    return summary


if __name__ == "__main__":
    run_main(main)
