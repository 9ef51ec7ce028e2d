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
layer) and ``attention_vs_importance.html``. Attention inside the loop: ``thought_to_thought.html`` and
``.parquet`` (BOT and the thoughts as queries and keys, per layer) and ``question_to_thought.html`` and
``.parquet`` (the mass each latent step puts on each of the question's numbers and on its other tokens), with
95% CIs over problems.
"""

from __future__ import annotations

from codi_lens.importance import attention_importance, attention_maps
from codi_lens.reports.importance import write_ablation_attention, write_attention_maps
from codi_lens.run.cli import add_selection_args, command_parser, parse_common_args, run_main, start_run


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/ablation_attention", batch_size=32, limit=300)
    add_selection_args(parser)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)
    run = start_run(args)
    problems = run.problems()
    rows, store = attention_importance(
        run.model,
        problems,
        run.out,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        settings=run.settings(stratified=args.stratified),
        overwrite=args.overwrite,
        executor=run.executor,
    )
    summary, correlations = write_ablation_attention(rows, run.out, seed=args.seed)
    among, reads = attention_maps(run.model, problems, n_latents=args.n_latents, batch_size=args.batch_size)
    summary["attention_maps"] = write_attention_maps(among, reads, run.out, args.n_latents)
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(rows, summary)
    for r in correlations.itertuples():
        print(
            f"layer {int(r.layer)}: Spearman {r.spearman:.2f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}], "
            f"Pearson {r.pearson:.2f} [{r.pearson_low:.2f}, {r.pearson_high:.2f}]"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
