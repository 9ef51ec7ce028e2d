"""Which parts of the model write the answer, and from which positions of the loop do the heads bring it?

    python -m experiments.logit_attribution [--checkpoint toy-chain] [--data toy-chain:test] [--limit 100]
        [--pairs FILE] [--out DIR]

For each clean/corrupted pair, at the answer row where the two numbers are compared (teacher-forced on the clean
answer), the logit difference ``logit[clean token] - logit[corrupted token]`` is decomposed, with the final
norm's scale frozen at its value in the run, into the embedding, every layer's attention and MLP outputs (and
the bias terms), every head, and, for every head, every source position it reads through its OV circuit (the
question, the changed number's tokens, BOT, thought 1..n, EOT, the answer so far). Both the clean and the
corrupted question are decomposed. The parts sum to the total to float32 rounding.

Statistics: 95% bootstrap CIs over pairs; per head a sign-flip permutation p-value, Benjamini-Hochberg
corrected across heads.

Writes to ``--out`` (default ``results/logit_attribution``): ``pairs.parquet``, ``run.json``, ``parts/``,
``results.parquet`` (``pair_id, run, component, level, layer, head, source, contribution, bias, total``),
``parts.parquet``, ``heads.parquet``, ``sources.parquet``, ``summary.json`` and the figures ``parts.html``,
``heads.html`` and ``sources.html``.
"""

from __future__ import annotations

import argparse

from codi_lens.core.errors import FlagError
from codi_lens.logit_attribution import LOGIT_DIFFERENCE_METRICS, attribution_sweep
from codi_lens.reports.circuits import attribution_report_lines, write_logit_attribution
from codi_lens.run.cli import add_pair_args, command_parser, parse_common_args, run_main, start_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_args(parser)


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/logit_attribution")
    add_arguments(parser)
    args = parse_common_args(parser, argv)
    if args.metric not in LOGIT_DIFFERENCE_METRICS:
        raise FlagError(
            f"--metric: logit attribution decomposes one logit difference; use one of {LOGIT_DIFFERENCE_METRICS}"
        )
    run = start_run(args)
    pairs = run.pairs()
    arch = run.architecture
    rows, store = attribution_sweep(run.model, pairs, run.out, **run.pair_options())
    return run.finish_pairs(
        rows,
        store,
        pairs,
        lambda r: write_logit_attribution(r, run.out, arch.n_layers, arch.n_heads, args.n_latents),
        attribution_report_lines,
    )


if __name__ == "__main__":
    run_main(main)
