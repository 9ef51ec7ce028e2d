"""Are later thoughts computed from earlier ones? Chained against parallel patching in the latent loop.

    python -m experiments.iterative_patching [--checkpoint toy-chain] [--data toy-chain:test] [--limit 100]
        [--pairs FILE] [--layers 0,1] [--out DIR]

For each pair, layer L and start thought k: *chained* writes the clean ``blocks.L.hook_resid_post``
into thought k only and lets the corrupted run's own loop compute thoughts k+1.. from it; *parallel*
writes the clean activation into every thought k..n at once. At each later thought: the cosine of
the patched run's layer-L activation, and of the fed thought, with the clean and with the corrupted
run; and the final recovery and KL at the answer (see ``codi_lens.patching``). Where chained comes
close to parallel, later thoughts follow from earlier ones; where it stays near the corrupted run,
each thought re-reads the question.

Writes to ``--out`` (default ``results/iterative_patching``): ``pairs.parquet``, ``run.json``,
``parts/``, ``results.parquet`` (``pair_id, layer, start_thought, mode, thought, cos_clean,
cos_corrupted, fed_cos_clean, fed_cos_corrupted, recovery, kl``), ``summary.json`` (mean final
recovery per layer, start and mode, and chained minus parallel, with 95% bootstrap CIs over pairs)
and the figures ``trajectories.html`` and ``fed_trajectories.html``.
"""

from __future__ import annotations

from codi_lens.core.errors import FlagError
from codi_lens.patching import trajectory_sweep
from codi_lens.reports.patching import write_iterative_patching
from codi_lens.run.cli import add_pair_args, command_parser, parse_common_args, run_main, start_run
from codi_lens.run.outcome import stop_if_nothing_measured


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """``--layers``: comma-separated block indices (default: every block)."""
    if text is None:
        return list(range(n_layers))
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlagError(f"--layers: {text!r} is not a comma-separated list of layers") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise FlagError(f"--layers: layer {bad[0] if bad else '(none)'} is outside 0..{n_layers - 1}")
    return layers


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/iterative_patching")
    add_pair_args(parser)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    args = parse_common_args(parser, argv)
    run = start_run(args)
    layers = parse_layers(args.layers, run.architecture.n_layers)
    pairs = run.pairs()
    rows, store = trajectory_sweep(
        run.model,
        pairs,
        layers,
        run.out,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        metric=args.metric,
        answer_from=args.answer_from,
        settings=run.settings(pairs_file=args.pairs),
        overwrite=args.overwrite,
        executor=run.executor,
    )
    stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs")
    pairs.to_parquet(run.out / "pairs.parquet", index=False)
    summary = write_iterative_patching(rows, run.out)
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(rows, summary)
    for key, entry in summary["final_recovery"].items():
        difference = entry["chained_minus_parallel"]
        print(
            f"{key}: chained {entry['chained'][0]:.3f}, parallel {entry['parallel'][0]:.3f}, "
            f"difference {difference[0]:.3f} [{difference[1]:.3f}, {difference[2]:.3f}]"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
