"""By which route does each thought's content reach the answer? The recurrence against attention, per step.

    python -m experiments.route_patching [--checkpoint toy-chain] [--data toy-chain:test] [--limit 100]
        [--pairs FILE] [--spans bot,1,2,3,4,5,6] [--no-layers] [--kv-heads] [--no-control] [--out DIR]

In CODI a step's content travels on by two routes: the recurrence (``h_k`` through the projection head is fed
as thought k + 1) and attention (every later position reads step k's keys and values from the cache). For each
clean/corrupted pair and each step (``--spans``: steps, BOT, or ranges such as ``1-3``), the clean run's
contribution is patched into the corrupted run through the recurrence alone (the fed ``z_{k+1}``), the
attention route alone (the step's keys and values at every layer, the fed thought pinned at the corrupted
run's), and both; the attention route is also patched one layer at a time (unless ``--no-layers``) and, with
``--kv-heads``, one key/value head at a time. Metrics at the answer number, teacher-forced on the clean answer:
logit difference, normalised recovery, KL. Unless ``--no-control``, the same patches are taken from another
problem's clean run (the control: a route that recovers the answer because it carries *this* problem's
values recovers nothing from another's), into ``OUT/other``.

Statistics: 95% bootstrap CIs over pairs; a sign-flip permutation p-value per cell with the
Benjamini-Hochberg correction within each grid; per step, the recurrence minus the attention route on the
same pairs (bootstrap CI, Cohen's d_z, Wilcoxon with the correction across steps) and the interaction
``both - (recurrence + attention)``.

Writes to ``--out`` (default ``results/route_patching``): ``pairs.parquet``, ``run.json``, ``parts/``,
``results.parquet`` (``pair_id, target, thought, first_thought, route, layer`` (-1: every layer)``, head,
recovery, logit_diff, kl, donor``, ...; both donors), ``cells.parquet``, ``contrasts.parquet``,
``interactions.parquet``, ``summary.json`` and the figures ``routes.html`` and ``attention_by_layer.html``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pandas as pd

from codi_lens.core.errors import FlagError
from codi_lens.patching import Span, route_patches, route_sweep
from codi_lens.reports.patching import route_report_lines, write_route_patching
from codi_lens.run.cli import add_pair_args, command_parser, parse_common_args, run_main, start_run
from codi_lens.run.outcome import stop_if_nothing_measured


@dataclass
class RoutePatchingConfig:
    """What the command measures (checked on creation, naming the flag)."""

    spans: list[Span] | None
    by_layer: bool = True
    kv_heads: bool = False
    control: bool = True

    @classmethod
    def parse_spans(cls, text: str | None, n_latents: int) -> list[Span] | None:
        if text is None:
            return None
        spans = []
        for item in (part for part in text.split(",") if part.strip()):
            try:
                span = Span.parse(item)
            except ValueError as error:
                raise FlagError(f"--spans: {error}") from None
            if span.last > n_latents:
                raise FlagError(f"--spans: {item!r} is outside a run with {n_latents} thoughts (--n-latents)")
            spans.append(span)
        if not spans:
            raise FlagError("--spans: give at least one step, e.g. bot,1,2 or 1-3")
        return spans


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_args(parser)
    parser.add_argument("--spans", help="comma-separated steps or ranges: bot,1,...,6 (default) or e.g. 1-3,4-6")
    parser.add_argument("--no-layers", action="store_true", help="do not patch the attention route layer by layer")
    parser.add_argument("--kv-heads", action="store_true", help="also patch each key/value head of each layer")
    parser.add_argument("--no-control", action="store_true", help="skip the other-problem control")
    parser.add_argument("--max-rows", type=int, default=256, help="at most this many rows (patches x pairs) a forward")


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/route_patching")
    add_arguments(parser)
    args = parse_common_args(parser, argv)
    config = RoutePatchingConfig(
        RoutePatchingConfig.parse_spans(args.spans, args.n_latents),
        by_layer=not args.no_layers,
        kv_heads=args.kv_heads,
        control=not args.no_control,
    )
    run = start_run(args)
    pairs = run.pairs()
    arch = run.architecture
    patches = route_patches(
        arch.n_layers,
        args.n_latents,
        config.spans,
        by_layer=config.by_layer,
        n_kv_heads=arch.n_kv_heads if config.kv_heads else None,
    )
    sweep = dict(patches=patches, max_rows=args.max_rows, **run.pair_options())
    rows, store = route_sweep(run.model, pairs, run.out, **sweep)
    stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs")  # before running the control
    every = rows
    if config.control:
        other, other_store = route_sweep(run.model, pairs, run.out / "other", donor="other", **sweep)
        other_store.finish(other, {"donor": "other"})
        every = pd.concat([rows, other], ignore_index=True)
    return run.finish_pairs(every, store, pairs, lambda r: write_route_patching(r, run.out), route_report_lines)


if __name__ == "__main__":
    run_main(main)
