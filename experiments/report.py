"""The whole battery on one checkpoint, within a time budget, as one offline page.

    python -m experiments.report [--checkpoint toy-chain] [--base DIR] [--budget 15m | --limit N]
        [--parts accuracy,step_importance,...] [--baseline NO_COT_CHECKPOINT] [--saes DIR] [--out results/report]

Parts (``--parts``, default all): accuracy with and without the thoughts (and a no-CoT ``--baseline``); step
importance (zero, mean, swap; single and cumulative); attention to the thoughts against their importance;
minimal-pair patching; route patching (recurrence or attention, with another problem's run as control); chained vs
parallel patching; the thoughts read out (logit and tuned lens, probes, early answers, value-matched patching);
value-matched patching on the templates of Cywinski, Bussmann et al. (``template``: when the tokenizer can write
them); and the causal screen of SAE features (``features``: with ``--saes``). A part that cannot run is listed in
the plan as skipped, with the reason.

``--budget 15m`` (or ``90s``, ``1h``) times every part on a few units first, shares the budget between the parts,
prints the plan (units and estimated minutes per part) and stays within it; ``--limit N`` runs every part on N
problems or pairs instead. Each part runs in ``--out/parts/<part>/`` (the files its own command writes) and is
resumable: killed and rerun with the same flags, the report continues and ends with the same numbers.

Writes ``report.html`` (offline: the plan with estimated and actual minutes, published findings on CODI beside this
checkpoint's, then per part its figure, a reading generated from the numbers and a table with 95% CIs over
problems or pairs), ``report.json`` (every headline number and reading), ``results.parquet`` (every headline number
as a row: ``section, number, value, low, high``), ``plan.json``, ``pilot/`` and ``parts/``.
"""

from __future__ import annotations

import re

from codi_lens.core.errors import FlagError
from codi_lens.data.pairs import make_pairs
from codi_lens.data.synthetic import value_limit
from codi_lens.loading import load_codi
from codi_lens.reports.battery import PARTS, ReportInputs
from codi_lens.reports.report import run_report
from codi_lens.run.cli import command_parser, model_settings, parse_common_args, run_main, start_run
from codi_lens.saes import load_saes
from codi_lens.saes.ids import saes_by_site

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str | None) -> float | None:
    """``"15m"`` -> 900.0 seconds (``s``, ``m`` or ``h``; a bare number is minutes)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise FlagError(f"--budget {text!r}: give a time such as 90s, 15m or 1h")
    return float(match[1]) * UNITS[match[2] or "m"]


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/report", batch_size=16, limit=None, max_new_tokens=64)
    parser.add_argument("--budget", default=None, help="time for the whole report: 90s, 15m, 1h (default: --limit)")
    parser.add_argument("--parts", default=",".join(PARTS.names()), help=f"comma-separated: {PARTS.help()}")
    parser.add_argument("--baseline", default=None, help="a no-CoT twin of the checkpoint (0 latents) to compare")
    parser.add_argument(
        "--problems", type=int, default=300, help="problems read from --data (pairs are made from them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of swaps, splits and controls")
    parser.add_argument(
        "--saes", default=None, help="a folder of SAEs on the thoughts (train_saes --out): part features"
    )
    parser.add_argument("--sae-ids", default=None, help="comma-separated SAE ids (default: all; one per site)")
    args = parse_common_args(parser, argv)
    budget = parse_budget(args.budget)
    if budget is None and args.limit is None:
        raise FlagError("give --budget (e.g. 15m) or --limit N")
    parts = PARTS.parse_list(args.parts, "--parts")
    part_limit = args.limit if budget is None else None
    args.limit = args.problems  # the problems read; each part takes its first --limit (or what the budget allows)
    run = start_run(args)
    problems = run.problems()
    pairs, _ = make_pairs(problems, max_value=value_limit(problems))
    baseline = load_codi(args.baseline, args.baseline, device=args.device) if args.baseline else None
    ids = [i.strip() for i in args.sae_ids.split(",")] if args.sae_ids else None
    saes = saes_by_site(load_saes(args.saes, ids, device=args.device)) if args.saes else None
    inputs = ReportInputs(
        run.model,
        problems,
        pairs,
        {**model_settings(run.model, args), "data_source": args.data, "saes": args.saes},
        run.executor,
        baseline=baseline,
        saes=saes,
        n_latents=run.model.latent_loop.n_latents,  # the method's own (PCCoT: its checkpoint's)
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    record = run_report(
        inputs,
        run.out,
        parts=[PARTS[p] for p in parts],
        budget_s=budget,
        limit=part_limit,
        title=str(args.checkpoint),
        overwrite=args.overwrite,
    )
    for title, lines in record["readings"].items():
        print(f"{title}: {' '.join(lines)}")
    print(f"report: {run.out / 'report.html'} ({run.elapsed() / 60:.1f} min)")
    return record


if __name__ == "__main__":
    run_main(main)
