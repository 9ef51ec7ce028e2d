"""What do the thoughts hold? Logit and tuned lens, linear probes, early answers, value-matched patching.

    python -m experiments.read_thoughts [--checkpoint toy-chain] [--data toy-chain:test] [--limit 1000]
        [--fit-fraction 0.5] [--top-k 5] [--tuned-lens-steps 500] [--patch-thoughts 1,2,3,4,5,6] [--out DIR]

The problems are split by id (seeded) into *fit* problems, which train the tuned lens and the probes
and give the reference thoughts of value-matched patching, and *eval* problems, on which everything is
measured. Layers: 0 = input of block 0, l = output of block l - 1; thought 0 = BOT (see
``codi_lens.lens``). The logit lens applies the final norm.

- Readout (``codi_lens.lens``): the rank of every intermediate value (ground truth: the problem's
  calculator spans) and of the answer at each (layer, thought), under the logit and the tuned lens; the
  control reads another problem's values (same number of steps) from the same states.
- Probes (``codi_lens.probes``): value and operation of step j, and whether the final answer is right;
  strength chosen on a validation part of the fit problems; control = shuffled labels.
- Early answers (``codi_lens.early_answers``): the answer when EOT is fed after thought k = 0..n.
- Value-matched patching (``codi_lens.value_patching``): thought k replaced by the mean thought of fit
  problems whose intermediate j is the same value, a different one, or any.

Writes to ``--out`` (default ``results/read_thoughts``): ``run.json``, ``parts/`` and
``results.parquet`` (readout: one row per problem x value x control x lens x layer x thought:
``problem_id, n_steps, target, step, value, control, token, layer, thought, lens, rank``),
``readout_rates.parquet`` (top-1 and top-k rates with 95% CIs), ``readout_anywhere.parquet``,
``decodes.parquet`` (top-k tokens with probabilities at every layer x thought, each lens),
``tuned_lens/`` (the trained lens), ``probes.parquet``, ``early_answers/results.parquet`` and
``early_answers.parquet`` (accuracy by k with CIs), ``value_patching/results.parquet`` and
``value_patching.parquet`` (rates with CIs), ``summary.json``, and the figures
``readout_logit.html``, ``readout_tuned.html``, ``answer_readout.html``, ``probes.html``, ``early_answers.html``,
``value_patching.html`` and ``value_patching_moved.html``. Every stage resumes after a kill.
"""

from __future__ import annotations

from dataclasses import dataclass

from codi_lens.core.errors import FlagError
from codi_lens.reading import read_thoughts
from codi_lens.reports.reading import write_read_thoughts
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run


@dataclass
class ReadThoughtsConfig:
    """What the command measures (checked on creation, naming the flag)."""

    n_latents: int = 6
    fit_fraction: float = 0.5
    top_k: int = 5
    tuned_lens_steps: int = 500
    patch_thoughts: list[int] | None = None
    min_references: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise FlagError(f"--fit-fraction must be between 0 and 1, got {self.fit_fraction}")
        if self.patch_thoughts is None:
            self.patch_thoughts = list(range(1, self.n_latents + 1))
        if not self.patch_thoughts or not all(1 <= k <= self.n_latents for k in self.patch_thoughts):
            raise FlagError(f"--patch-thoughts: thoughts must lie in 1..{self.n_latents}, got {self.patch_thoughts}")


def parse_thoughts(text: str | None) -> list[int] | None:
    """``--patch-thoughts``: comma-separated thoughts (None: every thought)."""
    if text is None:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise FlagError(f"--patch-thoughts: {text!r} is not a comma-separated list of thoughts") from None


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/read_thoughts", batch_size=64, limit=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, controls and the tuned lens")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument("--fit-fraction", type=float, default=0.5, help="share of problems that fit lens and probes")
    parser.add_argument("--top-k", type=int, default=5, help="k of the top-k readout rates")
    parser.add_argument("--tuned-lens-steps", type=int, default=500, help="Adam steps of the tuned lens")
    parser.add_argument("--patch-thoughts", default=None, help="thoughts to patch (comma-separated; default all)")
    parser.add_argument("--min-references", type=int, default=3, help="fit problems a value's mean needs")
    args = parse_common_args(parser, argv)
    config = ReadThoughtsConfig(
        args.n_latents,
        args.fit_fraction,
        args.top_k,
        args.tuned_lens_steps,
        parse_thoughts(args.patch_thoughts),
        args.min_references,
    )
    run = start_run(args)
    problems = run.problems()
    settings = run.settings(
        seed=args.seed,
        n_latents=config.n_latents,
        fit_fraction=config.fit_fraction,
        tuned_lens_steps=config.tuned_lens_steps,
        min_references=config.min_references,
        patch_thoughts=config.patch_thoughts,
        max_new_tokens=args.max_new_tokens,
    )
    reading, store = read_thoughts(
        run.model,
        problems,
        run.out,
        n_latents=config.n_latents,
        fit_fraction=config.fit_fraction,
        top_k=config.top_k,
        tuned_lens_steps=config.tuned_lens_steps,
        patch_thoughts=config.patch_thoughts,
        min_references=config.min_references,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        settings=settings,
        overwrite=args.overwrite,
        executor=run.executor,
    )
    summary = write_read_thoughts(reading, run.out, top_k=config.top_k, n_layers=run.model.cfg.n_layers)
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(reading.readout, summary)
    print(f"wrote {run.out / 'results.parquet'} ({len(reading.readout)} rows, {len(reading.evaluated)} eval problems)")
    return summary


if __name__ == "__main__":
    run_main(main)
