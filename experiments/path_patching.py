"""Through which paths does the answer depend on each part of the loop? Path patching inside the latent loop.

    python -m experiments.path_patching [--checkpoint toy-chain] [--data toy-chain:test] [--limit 100]
        [--pairs FILE] [--groups direct,head_to_last_mlp,thought_to_heads,recurrence] [--out DIR]

For each clean/corrupted pair, a sender (a head or an MLP at the compared answer row, or a thought's fed input)
is written with the clean run's value and reaches the answer only through chosen receivers, every other head,
MLP and fed thought frozen at the corrupted run (``codi_lens.patching.paths``). The default paths: each head and
each MLP at the answer row straight to the logits; each thought to the answer through the heads at the answer
row; each thought into the next thought's input (the recurrence). Metrics at the answer number, teacher-forced
on the clean answer: logit difference and normalised recovery, with 95% bootstrap CIs over pairs and a
sign-flip permutation test per path, Benjamini-Hochberg corrected across paths.

Writes to ``--out`` (default ``results/path_patching``): ``pairs.parquet``, ``run.json``, ``parts/``,
``results.parquet`` (``pair_id, path, group, logit_diff, recovery``, ...), ``paths.parquet``, ``summary.json``
and the figure ``paths.html``.
"""

from __future__ import annotations

from codi_lens.core.errors import FlagError
from codi_lens.logit_attribution import LOGIT_DIFFERENCE_METRICS
from codi_lens.patching.paths import PATH_GROUPS, default_paths, path_sweep
from codi_lens.reports.circuits import path_report_lines, write_path_patching
from codi_lens.run.cli import add_pair_args, command_parser, parse_common_args, run_main, start_run


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/path_patching")
    add_pair_args(parser)
    parser.add_argument(
        "--groups", default=",".join(PATH_GROUPS), help=f"comma-separated kinds of path: {PATH_GROUPS.help()}"
    )
    args = parse_common_args(parser, argv)
    groups = PATH_GROUPS.parse_list(args.groups, "--groups")
    if args.metric not in LOGIT_DIFFERENCE_METRICS:
        raise FlagError(f"--metric: path patching reads one logit difference; use one of {LOGIT_DIFFERENCE_METRICS}")
    run = start_run(args)
    pairs = run.pairs()
    arch = run.architecture
    paths = default_paths(arch.n_layers, arch.n_heads, args.n_latents, groups)
    rows, store = path_sweep(run.model, pairs, run.out, paths=paths, **run.pair_options())
    return run.finish_pairs(rows, store, pairs, lambda r: write_path_patching(r, run.out), path_report_lines)


if __name__ == "__main__":
    run_main(main)
