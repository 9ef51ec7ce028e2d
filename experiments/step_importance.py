"""Which continuous thoughts matter? Every thought x intervention x scope on each problem.

    python -m experiments.step_importance [--checkpoint toy-chain] [--data toy-chain:test] [--limit 300]
        [--interventions zero,mean,noise,swap,shuffle] [--scopes single,cumulative,all] [--out DIR]

For each problem: the baseline run, then each ablation of the fed-back thoughts (zero, mean over a
reference set, noise of the thought's norm, another problem's thought, shuffled order; over one
thought, thoughts 1..k, or all), generated with upstream's 256-token budget and teacher-forced on
the baseline's answer up to its number, where KL(baseline || ablated) is taken (nats). See
``codi_lens.importance``.

Writes to ``--out`` (default ``results/step_importance``): ``run.json``, ``parts/`` (resumable after
a kill), ``results.parquet`` (one row per problem x ablation: ``problem_id, n_steps, intervention,
scope, thought, baseline_correct, correct, prediction, kl, ...``), ``importance.parquet`` (per
ablation, with 95% bootstrap CIs over problems), ``importance_by_difficulty.parquet``,
``summary.json`` and the figures ``importance.html`` (importance and KL by thought per
intervention, with CIs), ``heatmap.html`` (problems x thoughts, zero ablation) and
``difficulty.html``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.data import load_problems, stratified_sample
from codi_lens.importance import INTERVENTIONS, step_importance
from codi_lens.interventions import SCOPES
from codi_lens.metrics import importance_table
from codi_lens.plotting import importance_by_difficulty, importance_by_thought, problems_by_thought_heatmap, write_html


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    """``--stratified N`` (a seeded sample per difficulty bucket) and ``--seed``."""
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, shuffles and samples")
    parser.add_argument(
        "--stratified", type=int, default=None, help="N problems per difficulty bucket (<=2, 3, 4, 5+), seeded"
    )


def select_problems(args: argparse.Namespace):
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    return stratified_sample(problems, args.stratified, seed=args.seed) if args.stratified else problems


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in allowed]
    if unknown or not names:
        raise KeyError(f"{flag}: unknown {unknown[0] if unknown else '(empty)'!r}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/step_importance", batch_size=32)
    add_selection_args(parser)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument("--interventions", default=",".join(INTERVENTIONS), help="comma-separated")
    parser.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated")
    parser.add_argument("--reference", default=None, help="data whose mean thoughts 'mean' feeds (default: --data)")
    parser.add_argument("--reference-limit", type=int, default=None, help="first N records of --reference")
    parser.set_defaults(limit=300)
    args = parse_common_args(parser, argv)
    interventions = _names(args.interventions, INTERVENTIONS, "--interventions")
    scopes = _names(args.scopes, SCOPES, "--scopes")

    started = time.perf_counter()
    model = load_model(args)
    problems = select_problems(args)
    reference = load_problems(args.reference, limit=args.reference_limit) if args.reference else None
    settings = {
        **model_settings(model, args),
        "data_source": args.data,
        "limit": args.limit,
        "stratified": args.stratified,
        "reference_source": args.reference,
    }
    rows, store = step_importance(
        model,
        problems,
        args.out,
        interventions=interventions,
        scopes=scopes,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        reference=reference,
        seed=args.seed,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
        executor=executor_from_args(args),
    )
    out = Path(args.out)
    table = importance_table(rows)
    table.to_parquet(out / "importance.parquet", index=False)
    first = interventions[0]
    single = rows[(rows["intervention"] == first) & (rows["scope"] == (scopes[0]))]
    by_difficulty = importance_table(single, by=("difficulty", "thought"))
    by_difficulty.to_parquet(out / "importance_by_difficulty.parquet", index=False)

    write_html(importance_by_thought(table, "importance"), out / "importance.html")
    write_html(importance_by_thought(table, "kl"), out / "kl.html")
    write_html(
        problems_by_thought_heatmap(single, title=f"KL(baseline || {first}) per problem and thought ({scopes[0]})"),
        out / "heatmap.html",
    )
    write_html(importance_by_difficulty(by_difficulty), out / "difficulty.html")

    elapsed = time.perf_counter() - started
    headline = table[(table["intervention"] == first) & (table["scope"] == scopes[0])]
    summary = {
        "n_problems": len(problems),
        "n_rows": len(rows),
        "baseline_accuracy": float(rows.drop_duplicates("problem_id")["baseline_correct"].mean()),
        "problems_without_answer_number": int(rows.drop_duplicates("problem_id")["kl"].isna().sum()),
        f"{first}_{scopes[0]}": {
            int(r.thought): {
                "importance": [round(r.importance, 4), round(r.importance_low, 4), round(r.importance_high, 4)],
                "kl": [round(r.kl, 4), round(r.kl_low, 4), round(r.kl_high, 4)],
            }
            for r in headline.itertuples()
        },
        "wall_seconds_this_invocation": round(elapsed, 1),
        "problems_per_hour_this_invocation": round(3600 * len(problems) / elapsed, 1),
    }
    store.finish(rows, summary)
    print(f"wrote {out / 'results.parquet'} ({len(rows)} rows, {len(problems)} problems)")
    return summary


if __name__ == "__main__":
    run_main(main)
