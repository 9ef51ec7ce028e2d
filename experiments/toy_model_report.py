"""Do the shipped model's thoughts matter, and can we read intermediate values from them?

    python -m experiments.toy_model_report [--checkpoint toy-chain] [--data PATH] [--limit N] [--out DIR]

1. Accuracy with the 6 continuous thoughts, and with all 6 fed-back thoughts zero-ablated, per number
   of steps (resumable: predictions are appended per batch and skipped on a rerun).
   Also the explicit-CoT teacher mode and, with ``--baseline``, a no-CoT model of the same size.
2. Logit lens on every latent state: for each intermediate value of each problem, the latent steps
   where its token is top-1 / top-5.

Writes to ``--out``: ``run.json`` (settings and checkpoint hashes), ``parts/`` and
``results.parquet`` (one row per problem and condition, written as batches finish: a rerun after a
kill continues), ``accuracy.parquet``, ``logit_lens.parquet``, ``summary.json``, and the figures
``accuracy.html`` and ``logit_lens.html``. Answers get upstream's 256-token budget unless
``--max-new-tokens`` says otherwise: with a thought zeroed the model often writes an explicit chain
first, and a short budget cuts those answers off and scores them wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from codi_lens.accuracy import accuracy_table, evaluate_conditions
from codi_lens.lens import latent_value_readout
from codi_lens.loading import load_codi
from codi_lens.reports.model_card import write_model_card
from codi_lens.reports.model_report import model_conditions, patching_with_both_donors, write_model_report
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run

N_LATENTS = 6


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/toy_model_report")
    parser.add_argument("--baseline", default=None, help="a no-CoT baseline export (0 latents) to compare")
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="write MODEL_CARD.md and card.json next to the checkpoint (needs training.json there)",
    )
    args = parse_common_args(parser, argv)
    run = start_run(args)
    problems = run.problems()
    model, budget = run.model, args.max_new_tokens
    baseline = load_codi(args.baseline, args.baseline, device=args.device) if args.baseline else None
    conditions = model_conditions(
        model, n_latents=N_LATENTS, budget=budget, short_budget=args.write_card, baseline=baseline
    )
    predictions, store = evaluate_conditions(
        conditions,
        problems,
        run.out,
        batch_size=args.batch_size,
        settings=run.settings(),
        overwrite=args.overwrite,
        executor=run.executor,
    )
    accuracy = accuracy_table(predictions)
    lens = latent_value_readout(model, problems, n_latents=N_LATENTS, batch_size=args.batch_size)
    patch_rows = patching_with_both_donors(
        model,
        problems,
        run.out,
        n_latents=N_LATENTS,
        max_new_tokens=budget,
        overwrite=args.overwrite,
        settings={"checkpoint": str(args.checkpoint), "data_source": args.data},
        executor=run.executor,
    )
    summary = {
        "checkpoint": Path(str(args.checkpoint)).name,
        "checkpoint_sha256": model.checkpoint_sha256,
        "n_problems": len(problems),
        "max_new_tokens": budget,
        **write_model_report(accuracy, lens, patch_rows, run.out, title=str(args.checkpoint), n_latents=N_LATENTS),
        "conditions": {c.name: c.settings() for c in conditions},
    }
    store.finish(predictions, summary)
    if args.write_card:
        write_model_card(Path(model.checkpoint_file).parent, summary, accuracy, lens, predictions, args.data)
    print(accuracy.to_string(index=False))
    print(json.dumps(summary["logit_lens"]))
    print(f"ablation drop: {summary['ablation_drop_points']} points; results in {run.out}")
    return summary


if __name__ == "__main__":
    run_main(main)
