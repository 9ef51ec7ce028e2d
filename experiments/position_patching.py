"""Where does the changed number's information travel? Activation patching inside the latent loop.

    python -m experiments.position_patching [--checkpoint toy-chain] [--data toy-chain:test] [--limit 100]
        [--pairs FILE] [--hooks resid_post,thought_input] [--generate] [--method exact|attribution]
        [--compare] [--out DIR]

For each clean/corrupted pair (made from ``--data`` with ``codi_lens.data.pairs``, or read from a
``pairs.parquet`` written by ``experiments.make_pairs``), the clean run's activation at each (hook,
position) cell is written into the corrupted run, whose loop then goes on from the patched state.
Positions: the changed number's tokens, the last question token, BOT, thoughts 1..n, EOT, every
thought at once and BOT with every thought at once (``thoughts`` and ``latents``: layer-only);
``thought_input`` patches the fed thought itself (position-only).
Metrics at the answer number, teacher-forced on the clean answer's prefix: logit difference,
normalised recovery, KL(clean || patched); with ``--generate`` also the generated answer's class.
Only pairs whose clean question the model answers right, whose two answers start with different
tokens, and whose corrupted run prefers its own answer's first token to the clean one, enter the
metrics; the others are counted by reason.

``--method attribution`` estimates every cell from one corrupted forward and one backward pass per
batch (attribution patching through the unrolled loop, ``codi_lens.patching.attribution``;
``kl`` is then NaN); ``--compare`` also runs the other method into ``OUT/<method>`` and reports in
``summary.json`` how well attribution ranks the cells against exact patching (Spearman, top-10
overlap).

Writes to ``--out`` (default ``results/position_patching``): ``pairs.parquet`` (the pairs used),
``run.json``, ``parts/``, ``results.parquet`` (``pair_id, hook, layer, thought, position, recovery,
logit_diff, kl``, ...), ``cells.parquet`` (mean and 95% CI per cell), ``summary.json`` and the figures
``heatmap.html`` (layer x position per hook kind, hover: n, mean, CI), ``layer_only.html`` and
``position_only.html``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from codi_lens.core.errors import FlagError
from codi_lens.patching import METHODS, PATCH_KINDS, patch_sweep, rank_agreement, sweep_sites
from codi_lens.reports.patching import report_lines, write_position_patching
from codi_lens.run.cli import add_pair_args, command_parser, parse_common_args, run_main, start_run
from codi_lens.run.outcome import stop_if_nothing_measured


@dataclass
class PositionPatchingConfig:
    """What the command measures (checked on creation, naming the flag)."""

    kinds: list[str]
    method: str = "exact"
    generate: bool = False
    compare: bool = False

    def __post_init__(self) -> None:
        PATCH_KINDS.check(self.kinds, "--hooks")
        METHODS[self.method]
        if self.generate and self.method == "attribution":
            raise FlagError("--generate needs --method exact: attribution estimates metrics, it generates nothing")

    @property
    def other_method(self) -> str:
        return "attribution" if self.method == "exact" else "exact"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_args(parser)
    parser.add_argument("--hooks", default="resid_post,thought_input", help=f"comma-separated: {PATCH_KINDS.help()}")
    parser.add_argument("--generate", action="store_true", help="also generate each patched answer (slower)")
    parser.add_argument("--max-rows", type=int, default=256, help="at most this many rows (sites x pairs) a forward")
    parser.add_argument(
        "--method",
        choices=METHODS.names(),
        default="exact",
        help="exact: patch every site; attribution: one forward and one backward pass per batch estimate them all",
    )
    parser.add_argument(
        "--compare", action="store_true", help="also run the other method (into OUT/<method>) and compare rankings"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/position_patching")
    add_arguments(parser)
    args = parse_common_args(parser, argv)
    kinds = PATCH_KINDS.parse_list(args.hooks, "--hooks")
    config = PositionPatchingConfig(kinds, args.method, args.generate, args.compare)
    run = start_run(args)
    pairs = run.pairs()
    arch = run.architecture
    sites = sweep_sites(arch.n_layers, args.n_latents, kinds=kinds, n_heads=arch.n_heads, layer_only=True)
    model = run.model
    sweep = dict(
        sites=sites,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
        metric=args.metric,
        answer_from=args.answer_from,
        settings=run.settings(pairs_file=args.pairs),
        overwrite=args.overwrite,
        executor=run.executor,
    )
    rows, store = patch_sweep(model, pairs, run.out, generate=config.generate, method=config.method, **sweep)
    stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs", extra={"method": config.method})
    agreement = None
    if config.compare:
        other = config.other_method
        other_rows, other_store = patch_sweep(model, pairs, run.out / other, method=other, **sweep)
        other_store.finish(other_rows, {"method": other})
        agreement = rank_agreement(*((rows, other_rows) if config.method == "exact" else (other_rows, rows)))
    pairs.to_parquet(run.out / "pairs.parquet", index=False)
    summary, _ = write_position_patching(rows, run.out, kinds, args.n_latents)
    summary |= {
        "method": config.method,
        "attribution_vs_exact": agreement,
        "wall_seconds_this_invocation": run.elapsed(),
    }
    store.finish(rows, summary)
    print(report_lines(summary))
    return summary


if __name__ == "__main__":
    run_main(main)
