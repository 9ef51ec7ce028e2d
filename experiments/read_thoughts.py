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

import argparse
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.data import Problem, load_problems
from codi_lens.early_answers import early_answer_rows
from codi_lens.lens import (
    TUNED_LENS_CONFIG,
    TunedLens,
    readout_anywhere,
    readout_frame,
    readout_rates,
    readout_targets,
    single_token_values,
    thought_states,
    top_decodes,
    train_tuned_lens,
)
from codi_lens.metrics import clustered_bootstrap_ci, mean_ci_table
from codi_lens.plotting import (
    answer_readout_lines,
    early_answer_curves,
    probe_accuracy_lines,
    readout_heatmaps,
    value_patching_bars,
    write_html,
)
from codi_lens.probes import probe_labels, probe_table, selectivity
from codi_lens.runner import UNIT_COLUMN, ResultStore
from codi_lens.value_patching import ValueMeans, value_patching_rows


def split_problems(problems: list[Problem], fit_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the fit and eval problems: ordered by a seeded hash of the id, so a problem's side
    does not depend on which others are in the set's order."""
    if not 0 < fit_fraction < 1:
        raise ValueError(f"--fit-fraction must be between 0 and 1, got {fit_fraction}")
    order = sorted(range(len(problems)), key=lambda i: zlib.crc32(f"{seed}:{problems[i].id}".encode()))
    n_fit = round(fit_fraction * len(problems))
    if n_fit < 4 or len(problems) - n_fit < 2:
        raise ValueError(f"{len(problems)} problems are too few to split into fit and eval problems")
    return sorted(order[:n_fit]), sorted(order[n_fit:])


def _thoughts(text: str, n_latents: int) -> list[int]:
    try:
        chosen = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise KeyError(f"--patch-thoughts: {text!r} is not a comma-separated list of thoughts") from exc
    if not chosen or not all(1 <= k <= n_latents for k in chosen):
        raise KeyError(f"--patch-thoughts: thoughts must lie in 1..{n_latents}, got {text!r}")
    return chosen


def tuned_lens_for(model, residuals, out: Path, args: argparse.Namespace) -> TunedLens:
    """The lens saved in ``out/tuned_lens`` by an earlier invocation, or a freshly trained and saved one."""
    directory = out / "tuned_lens"
    if (directory / TUNED_LENS_CONFIG).exists():
        return TunedLens.load(directory, model)
    lens = train_tuned_lens(model, residuals, steps=args.tuned_lens_steps, seed=args.seed)
    lens.save(directory, checkpoint_sha256=model.checkpoint_sha256, steps=args.tuned_lens_steps, seed=args.seed)
    return lens


def value_patching_summary(rows: pd.DataFrame) -> dict:
    """Per condition, pooled over thoughts and steps: accuracy and (different) moved rate, with 95% CIs
    from a bootstrap over problems."""
    out = {}
    for condition, group in rows.groupby("condition"):
        stats = {"n_rows": len(group)}
        for value in ("correct", "moved"):
            if group[value].notna().any():
                part = group.dropna(subset=[value]).astype({value: float})
                mean, low, high = clustered_bootstrap_ci(part, np.mean, [value])
                stats[value] = [round(mean, 4), round(low, 4), round(high, 4)]
        out[condition] = stats
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/read_thoughts", batch_size=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, controls and the tuned lens")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument("--fit-fraction", type=float, default=0.5, help="share of problems that fit lens and probes")
    parser.add_argument("--top-k", type=int, default=5, help="k of the top-k readout rates")
    parser.add_argument("--tuned-lens-steps", type=int, default=500, help="Adam steps of the tuned lens")
    parser.add_argument("--patch-thoughts", default=None, help="thoughts to patch (comma-separated; default all)")
    parser.add_argument("--min-references", type=int, default=3, help="fit problems a value's mean needs")
    parser.set_defaults(limit=1000)
    args = parse_common_args(parser, argv)
    patch_thoughts = _thoughts(args.patch_thoughts or ",".join(map(str, range(1, args.n_latents + 1))), args.n_latents)

    started = time.perf_counter()
    model = load_model(args)
    executor = executor_from_args(args)
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    fit, evaluated = split_problems(problems, args.fit_fraction, args.seed)
    settings = {
        **model_settings(model, args),
        "data_source": args.data,
        "limit": args.limit,
        "seed": args.seed,
        "n_latents": args.n_latents,
        "fit_fraction": args.fit_fraction,
        "tuned_lens_steps": args.tuned_lens_steps,
        "min_references": args.min_references,
        "patch_thoughts": patch_thoughts,
        "max_new_tokens": args.max_new_tokens,
    }
    out = Path(args.out)
    store = ResultStore(out, settings, overwrite=args.overwrite)
    states = thought_states(
        model, problems, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    lens = tuned_lens_for(model, states.residuals[fit], out, args)
    lenses = {"logit": None, "tuned": lens}

    # Readout: the control pairing is drawn once over every eval problem, so a resumed run pairs alike.
    eval_problems = [problems[i] for i in evaluated]
    targets = readout_targets(eval_problems, seed=args.seed)
    targets["reader"] = np.asarray(evaluated)[targets["reader"].to_numpy()]
    n_values = int((~targets["control"]).sum())
    n_single = int((~single_token_values(model, targets)["control"]).sum())

    def readout_work(batch: list[Problem]) -> pd.DataFrame:
        ids = {p.id for p in batch}
        frame = readout_frame(model, states.residuals, targets[targets["problem_id"].isin(ids)], lenses)
        return frame.assign(**{UNIT_COLUMN: frame["problem_id"]})

    readout = store.run(
        eval_problems,
        readout_work,
        unit_id=lambda p: p.id,
        batch_size=args.batch_size,
        desc="readout",
        executor=executor,
    ).drop(columns=UNIT_COLUMN)
    rates = pd.concat(
        [readout_rates(readout, k=1).assign(k=1), readout_rates(readout, k=args.top_k).assign(k=args.top_k)]
    )
    anywhere = pd.concat(
        [readout_anywhere(readout, k=1).assign(k=1), readout_anywhere(readout, k=args.top_k).assign(k=args.top_k)]
    )
    rates.to_parquet(out / "readout_rates.parquet", index=False)
    anywhere.to_parquet(out / "readout_anywhere.parquet", index=False)
    for name in lenses:
        write_html(readout_heatmaps(rates[rates["k"] == 1], name), out / f"readout_{name}.html")
    write_html(answer_readout_lines(rates[rates["k"] == 1]), out / "answer_readout.html")
    eval_ids = [p.id for p in eval_problems]
    decodes = pd.concat(
        [top_decodes(model, states.residuals[evaluated], eval_ids, lens, k=args.top_k, lens_name=name)
         for name, lens in lenses.items()],
        ignore_index=True,
    )  # fmt: skip
    decodes.to_parquet(out / "decodes.parquet", index=False)

    # Probes: fit problems split into train and validation (last quarter), tested on the eval problems.
    n_val = max(1, len(fit) // 4)
    labels = probe_labels(problems, states.correct)
    probes = probe_table(states.residuals, labels, fit[:-n_val], fit[-n_val:], evaluated, seed=args.seed)
    probes.to_parquet(out / "probes.parquet", index=False)
    if len(probes):
        write_html(probe_accuracy_lines(probes, layer=model.cfg.n_layers), out / "probes.html")

    early_store = ResultStore(out / "early_answers", settings, overwrite=args.overwrite)
    early = early_store.run(
        eval_problems,
        lambda batch: early_answer_rows(model, batch, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens),
        unit_id=lambda p: p.id,
        batch_size=args.batch_size,
        desc="early answers",
        executor=executor,
    )
    early_store.finish(early)
    early_table = pd.concat(
        [
            mean_ci_table(early.assign(group="all"), ["group", "k"], "correct"),
            mean_ci_table(early.assign(group=early["n_steps"].astype(str)), ["group", "k"], "correct"),
        ],
        ignore_index=True,
    )
    early_table.to_parquet(out / "early_answers.parquet", index=False)
    write_html(early_answer_curves(early_table), out / "early_answers.html")

    means = ValueMeans.from_reference([problems[i] for i in fit], states.thought_embeds[fit])
    patch_store = ResultStore(out / "value_patching", settings, overwrite=args.overwrite)
    patched = patch_store.run(
        eval_problems,
        lambda batch: value_patching_rows(
            model,
            batch,
            means,
            thoughts=patch_thoughts,
            n_latents=args.n_latents,
            max_new_tokens=args.max_new_tokens,
            min_count=args.min_references,
            seed=args.seed,
        ),
        unit_id=lambda p: p.id,
        batch_size=args.batch_size,
        desc="value patching",
        executor=executor,
    )
    patch_store.finish(patched)
    if len(patched):
        mean_ci_table(patched, ["condition", "step", "thought"], "correct").to_parquet(
            out / "value_patching.parquet", index=False
        )
        write_html(value_patching_bars(patched, "correct"), out / "value_patching.html")
        different = patched[patched["condition"] == "different"]
        if len(different):
            write_html(value_patching_bars(different, "moved"), out / "value_patching_moved.html")

    elapsed = time.perf_counter() - started
    headline = anywhere[anywhere["target"] == "intermediate"]
    # The cell reported per target is chosen on validation accuracy, not on the test accuracy it reports.
    chosen = probes[probes["task"] == "probe"].sort_values("val_accuracy").groupby("target").tail(1)
    best_probes = selectivity(probes).merge(chosen[["target", "layer", "thought"]], on=["target", "layer", "thought"])
    summary = {
        "n_problems": len(problems),
        "n_fit": len(fit),
        "n_eval": len(evaluated),
        "eval_accuracy": round(float(states.correct[evaluated].mean()), 4),
        "intermediate_values": n_values,
        "single_token_values": n_single,
        "lens_layers": "0 = input of block 0, l = output of block l-1; final norm applied",
        "value_top_k_somewhere": {
            f"{r.lens}/{'control' if r.control else 'own'}/step {int(r.step)}/top{int(r.k)}": [
                round(r.rate, 4),
                round(r.low, 4),
                round(r.high, 4),
            ]
            for r in headline.itertuples()
        },
        "probe_at_best_validation_cell": {
            r.target: {
                "layer": int(r.layer),
                "thought": int(r.thought),
                "probe": round(float(r.probe), 4),
                "control": round(float(r.control), 4),
                "chance": round(float(r.chance), 4),
            }
            for r in best_probes.itertuples()
        },
        "early_answer_accuracy": {
            int(r.k): [round(r.mean, 4), round(r.low, 4), round(r.high, 4)]
            for r in early_table[early_table["group"] == "all"].itertuples()
        },
        "value_patching": value_patching_summary(patched) if len(patched) else {},
        "wall_seconds_this_invocation": round(elapsed, 1),
    }
    store.finish(readout, summary)
    print(f"wrote {out / 'results.parquet'} ({len(readout)} rows, {len(evaluated)} eval problems)")
    return summary


if __name__ == "__main__":
    run_main(main)
