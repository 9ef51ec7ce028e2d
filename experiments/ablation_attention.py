"""Does attention tell us which thoughts matter? Attention and zero-ablation importance on the same problems.

    python -m experiments.ablation_attention [--checkpoint toy-chain] [--data toy-chain:test] [--limit 300] [--out DIR]

For each problem: the baseline run with its attention patterns cached (from EOT and from each fed
answer position to BOT and every thought, per layer and head), and the zero ablation of each single
thought (generated, and KL(baseline || ablated) at the answer number). Then, per layer, the Pearson
and Spearman correlation between attention to thought k (mean over heads, from EOT and answer
positions) and the KL of zeroing it, with 95% bootstrap CIs that resample problems. A control pairs
each problem's attention with another problem's importance (the next problem's), which should
correlate only as much as the thoughts' average profile does.

Writes to ``--out`` (default ``results/ablation_attention``): ``run.json``, ``parts/``,
``results.parquet`` (one row per problem x layer x head x thought: ``attention_eot``,
``attention_answer``, ``kl``, ``flipped``, ...), ``correlations.parquet`` (per layer, and the control),
``correlations_within_thought.parquet`` (per layer and thought, across problems: the profile of
attention over thoughts cannot drive it), ``summary.json``, and the
figures ``attention.html`` (layer x thought, by source), ``attention_heads.html`` (head x thought per
layer) and ``attention_vs_importance.html``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from codi_lens.attention import correlation_by_layer, per_thought
from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.importance import attention_importance
from codi_lens.plotting import attention_by_head, attention_by_layer, attention_vs_importance, write_html
from experiments.step_importance import add_selection_args, select_problems


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/ablation_attention", batch_size=32)
    add_selection_args(parser)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.set_defaults(limit=300)
    args = parse_common_args(parser, argv)

    started = time.perf_counter()
    model = load_model(args)
    problems = select_problems(args)
    settings = {
        **model_settings(model, args),
        "data_source": args.data,
        "limit": args.limit,
        "stratified": args.stratified,
    }
    rows, store = attention_importance(
        model,
        problems,
        args.out,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
        executor=executor_from_args(args),
    )
    out = Path(args.out)
    frame = per_thought(rows)
    correlations = correlation_by_layer(frame, "attention", "kl", seed=args.seed)
    control = correlation_by_layer(frame, "attention", "kl_other", seed=args.seed)
    both = pd.concat([correlations.assign(pairing="same problem"), control.assign(pairing="control: next problem")])
    both.to_parquet(out / "correlations.parquet", index=False)
    # Across problems at a fixed thought: does a problem that attends more to thought k depend more on it?
    # (The per-layer correlation above also reflects the thoughts' average profile, which the control shares.)
    within = correlation_by_layer(frame, "attention", "kl", by=["layer", "thought"], seed=args.seed)
    within.to_parquet(out / "correlations_within_thought.parquet", index=False)

    long = rows.melt(
        id_vars=["problem_id", "layer", "head", "thought"],
        value_vars=["attention_eot", "attention_answer"],
        var_name="source",
        value_name="weight",
    )
    long["source"] = long["source"].str.replace("attention_", "")
    write_html(attention_by_layer(long.dropna(subset=["weight"])), out / "attention.html")
    write_html(attention_by_head(long.dropna(subset=["weight"])), out / "attention_heads.html")
    write_html(attention_vs_importance(frame, correlations), out / "attention_vs_importance.html")

    def ci(r) -> dict:
        return {
            "pearson": [round(r.pearson, 3), round(r.pearson_low, 3), round(r.pearson_high, 3)],
            "spearman": [round(r.spearman, 3), round(r.spearman_low, 3), round(r.spearman_high, 3)],
            "n_problems": int(r.n_problems),
        }

    summary = {
        "n_problems": len(problems),
        "n_rows": len(rows),
        "correlation_by_layer": {int(r.layer): ci(r) for r in correlations.itertuples()},
        "control_next_problem": {int(r.layer): ci(r) for r in control.itertuples()},
        "within_thought": {f"{int(r.layer)}/{int(r.thought)}": ci(r) for r in within.itertuples()},
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    store.finish(rows, summary)
    for r in correlations.itertuples():
        print(
            f"layer {int(r.layer)}: Spearman {r.spearman:.2f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}], "
            f"Pearson {r.pearson:.2f} [{r.pearson_low:.2f}, {r.pearson_high:.2f}]"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
