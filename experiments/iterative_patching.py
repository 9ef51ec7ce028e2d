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

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.metrics import bootstrap_ci
from codi_lens.patching import trajectory_rows
from codi_lens.plotting import trajectory_lines, write_html
from codi_lens.runner import ResultStore
from experiments.position_patching import add_pair_args, load_pairs, skipped_counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/iterative_patching")
    add_pair_args(parser)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    args = parse_common_args(parser, argv)

    started = time.perf_counter()
    model = load_model(args)
    layers = list(range(model.cfg.n_layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise KeyError(f"--layers: layer {bad[0]} is outside 0..{model.cfg.n_layers - 1}")
    pairs = load_pairs(args)
    out = Path(args.out)
    settings = {
        **model_settings(model, args),
        "data_source": args.data,
        "limit": args.limit,
        "pairs_file": args.pairs,
        "pairs": sorted(str(p) for p in pairs["pair_id"]),
        "layers": layers,
        "n_latents": args.n_latents,
        "max_new_tokens": args.max_new_tokens,
    }
    store = ResultStore(out, settings, overwrite=args.overwrite)
    rows = store.run(
        pairs.to_dict("records"),
        lambda batch: trajectory_rows(
            model, pd.DataFrame(batch), layers, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens
        ),
        unit_id=lambda r: str(r["pair_id"]),
        batch_size=args.batch_size,
        desc="chained vs parallel",
        executor=executor_from_args(args),
    )
    pairs.to_parquet(out / "pairs.parquet", index=False)
    used = rows[rows["reason"].fillna("") == ""]
    write_html(trajectory_lines(used, "cos_clean"), out / "trajectories.html")
    write_html(
        trajectory_lines(used, "fed_cos_clean", title="Cosine of the fed thought to the clean run's (95% CI)"),
        out / "fed_trajectories.html",
    )

    final = used.drop_duplicates(["pair_id", "layer", "start_thought", "mode"])
    recovery = {}
    for (layer, start), group in final.groupby(["layer", "start_thought"]):
        wide = group.pivot(index="pair_id", columns="mode", values="recovery")
        entry = {}
        for mode in ("chained", "parallel"):
            entry[mode] = [round(x, 4) for x in bootstrap_ci(wide[mode].to_numpy(dtype=float))]
        entry["chained_minus_parallel"] = [
            round(x, 4) for x in bootstrap_ci((wide["chained"] - wide["parallel"]).to_numpy(dtype=float))
        ]
        recovery[f"layer {int(layer)} from thought {int(start)}"] = entry
    summary = {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_counts(rows),
        "final_recovery": recovery,
        "mean_cos_clean_after_start": {
            mode: float(
                np.round(
                    used[(used["mode"] == mode) & (used["thought"] > used["start_thought"])]["cos_clean"].mean(), 4
                )
            )
            for mode in ("chained", "parallel")
        },
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    store.finish(rows, summary)
    for key, entry in recovery.items():
        print(
            f"{key}: chained {entry['chained'][0]:.3f}, parallel {entry['parallel'][0]:.3f}, "
            f"difference {entry['chained_minus_parallel'][0]:.3f} [{entry['chained_minus_parallel'][1]:.3f}, "
            f"{entry['chained_minus_parallel'][2]:.3f}]"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
