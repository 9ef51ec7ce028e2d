"""Which continuous thoughts matter? Every thought x intervention x scope on each problem.

    python -m experiments.step_importance [--checkpoint toy-chain] [--data toy-chain:test] [--limit 300]
        [--interventions zero,mean,noise,swap,shuffle] [--scopes single,cumulative,all,pairs,triples]
        [--donors N] [--site blocks.L.hook_resid_post] [--out DIR]

For each problem: the baseline run, then each ablation of the fed-back thoughts (zero, mean over a
reference set, noise of the thought's norm, another problem's thought, shuffled order; over one
thought, thoughts 1..k, or all), generated with upstream's 256-token budget and teacher-forced on
the baseline's answer up to its number, where KL(baseline || ablated) is taken (nats). See
``codi_lens.importance``.

Writes to ``--out`` (default ``results/step_importance``): ``run.json``, ``parts/`` (resumable after
a kill), ``results.parquet`` (one row per problem x ablation: ``problem_id, n_steps, intervention,
scope, thought, baseline_correct, correct, prediction, kl, ...``), ``importance.parquet`` (per
ablation, with 95% bootstrap CIs over problems), ``importance_by_difficulty.parquet``,
``summary.json`` and the figures ``importance.html`` (importance and KL by thought per
intervention, with CIs), ``heatmap.html`` (problems x thoughts, zero ablation) and
``difficulty.html``.
"""

from __future__ import annotations

from dataclasses import dataclass

from codi_lens.core.errors import FlagError
from codi_lens.data import load_problems
from codi_lens.importance import step_importance
from codi_lens.interventions import DEFAULT_SCOPES, INTERVENTIONS, SCOPES
from codi_lens.interventions.steps import StepSite
from codi_lens.reports.importance import write_step_importance
from codi_lens.run.cli import add_selection_args, command_parser, parse_common_args, run_main, start_run


@dataclass
class StepImportanceConfig:
    """What the command measures (checked on creation: an unknown name is refused by its flag)."""

    interventions: list[str]
    scopes: list[str]
    n_latents: int = 6
    reference: str | None = None
    reference_limit: int | None = None
    donors: int = 1
    site: str | None = None

    def __post_init__(self) -> None:
        INTERVENTIONS.check(self.interventions, "--interventions")
        SCOPES.check(self.scopes, "--scopes")
        if any(SCOPES[s].set_size for s in self.scopes) and "single" not in self.scopes:
            raise FlagError("--scopes: pairs and triples are compared with each thought alone; add single")
        if self.n_latents < 1:
            raise FlagError(f"--n-latents must be at least 1, got {self.n_latents}")
        if self.donors < 1:
            raise FlagError(f"--donors must be at least 1, got {self.donors}")
        if self.site is not None:
            try:
                StepSite(self.site)
            except ValueError as error:
                raise FlagError(f"--site: {error}") from None


def add_arguments(parser) -> None:
    add_selection_args(parser)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument(
        "--interventions", default=",".join(INTERVENTIONS), help=f"comma-separated: {INTERVENTIONS.help()}"
    )
    parser.add_argument(
        "--scopes",
        default=",".join(DEFAULT_SCOPES),
        help=f"comma-separated: {SCOPES.help()} (pairs, triples: every set of 2 or 3 thoughts ablated together, with "
        "the interaction against single; add single)",
    )
    parser.add_argument(
        "--donors",
        type=int,
        default=1,
        help="draws per problem of swap (other problems' thoughts) and noise (other seeds); tables average a "
        "problem's draws, CIs rest on problems",
    )
    parser.add_argument(
        "--site",
        default=None,
        help="act on this activation at thought k instead of the fed thought, e.g. blocks.8.hook_resid_post "
        "(mean, swap and shuffle values are read there too)",
    )
    parser.add_argument("--reference", default=None, help="data whose mean thoughts 'mean' feeds (default: --data)")
    parser.add_argument("--reference-limit", type=int, default=None, help="first N records of --reference")


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/step_importance", batch_size=32, limit=300)
    add_arguments(parser)
    args = parse_common_args(parser, argv)
    config = StepImportanceConfig(
        INTERVENTIONS.parse_list(args.interventions, "--interventions"),
        SCOPES.parse_list(args.scopes, "--scopes"),
        args.n_latents,
        args.reference,
        args.reference_limit,
        args.donors,
        args.site,
    )
    run = start_run(args)
    problems = run.problems()
    if len(problems) < config.donors + 1 and any(INTERVENTIONS[name].needs_donors for name in config.interventions):
        raise FlagError(
            f"--interventions {args.interventions}: swapping thoughts with --donors {config.donors} needs "
            f"{config.donors + 1} problems or more; --data and --limit give {len(problems)}"
        )
    reference = load_problems(config.reference, limit=config.reference_limit) if config.reference else None
    rows, store = step_importance(
        run.model,
        problems,
        run.out,
        interventions=config.interventions,
        scopes=config.scopes,
        n_latents=config.n_latents,
        max_new_tokens=args.max_new_tokens,
        reference=reference,
        seed=args.seed,
        draws=config.donors,
        site=config.site,
        batch_size=args.batch_size,
        settings=run.settings(stratified=args.stratified, reference_source=config.reference),
        overwrite=args.overwrite,
        executor=run.executor,
    )
    headline = next(s for s in [*config.scopes, "single"] if not SCOPES[s].set_size)
    summary = write_step_importance(rows, run.out, config.interventions[0], headline)
    elapsed = run.elapsed()
    summary |= {
        "draws_per_problem": {
            name: config.donors if INTERVENTIONS[name].resampled else 1 for name in config.interventions
        },
        "wall_seconds_this_invocation": elapsed,
        "problems_per_hour_this_invocation": round(3600 * len(problems) / max(elapsed, 1e-9), 1),
    }
    store.finish(rows, summary)
    print(f"wrote {run.out / 'results.parquet'} ({len(rows)} rows, {len(problems)} problems)")
    return summary


if __name__ == "__main__":
    run_main(main)
