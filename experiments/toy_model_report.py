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

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from codi_lens import load_codi
from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.data import load_problems
from codi_lens.evaluate import Condition, evaluate_conditions
from codi_lens.interventions import zero_thoughts
from codi_lens.lens import intermediate_readout
from codi_lens.metrics import accuracy_table, mean_ci_table
from codi_lens.pairs import make_pairs
from codi_lens.patching import DONORS, SPAN_STARTS, Cell, patch_sweep
from codi_lens.plotting import accuracy_bars, latent_readout_heatmap, patching_bars, write_html
from codi_lens.synthetic import STEP_MIXES, value_limit
from codi_lens.training import NUMBER_PERIODS

N_LATENTS = 6
#: The budget the v4 card used by mistake; the card reports the ablation at it beside upstream's 256.
SHORT_BUDGET = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/toy_model_report")
    parser.add_argument("--baseline", default=None, help="a no-CoT baseline export (0 latents) to compare")
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="write MODEL_CARD.md and card.json next to the checkpoint (needs training.json there)",
    )
    return parse_common_args(parser, argv)


def logit_lens_frame(model, problems, batch_size: int) -> pd.DataFrame:
    """Intermediate-value readout for every problem (the latent loop only; answers are not needed).

    Rows with ``control=True`` read out the intermediates of *another* problem (the next one in the
    whole list, the last reading the first) from the same latent states: the chance level the real
    readout must beat. With a single problem there is no other problem, and no control row.
    """
    latent_states = []
    for start in tqdm(range(0, len(problems), batch_size), desc="logit lens", unit="batch"):
        batch = problems[start : start + batch_size]
        latent_states.append(
            model.run_codi([p.question for p in batch], n_latents=N_LATENTS, max_new_tokens=1).latent_states
        )
    states = torch.cat(latent_states)
    values = [p.intermediates for p in problems]
    frames = []
    for control, targets in ((False, values), (True, values[1:] + values[:1])):
        if control and len(problems) < 2:
            continue
        frame = intermediate_readout(model, states, targets)
        frame["id"] = [problems[i].id for i in frame["example"]]
        frame["control"] = control
        frames.append(frame.drop(columns="example"))
    return pd.concat(frames, ignore_index=True)


UPSTREAM_OBJECTIVE = (
    "The objective is upstream CODI's: the teacher's cross-entropy on its explicit chain, the student's on\n"
    "the answer, and the distillation of the student's states toward the teacher's at the token before the\n"
    "answer number."
)
CHAIN_OBJECTIVE = (
    "The objective is upstream CODI's (the teacher's cross-entropy on its explicit chain, the student's on\n"
    "the answer, the distillation at the token before the answer number) plus a *chain distillation*\n"
    "(weight {weight}): thought j's states at every layer are pulled toward the teacher's states at the `=`\n"
    "of the j-th equation of its chain, where the teacher is about to write intermediate result j\n"
    "(`codi_lens.training.chain_loss`). The teacher writes the whole chain (the last step is not dropped)."
)
CHAIN_LOGIT_OBJECTIVE = (
    "The objective is upstream CODI's (the teacher's cross-entropy on its explicit chain, the student's on\n"
    "the answer, the distillation at the token before the answer number) plus a *chain logit distillation*\n"
    "(weight {weight}): thought j's next-token distribution (its last state through the tied unembedding)\n"
    "is pulled, by KL, toward the teacher's at the `=` of the j-th equation of its chain, where the teacher\n"
    "is about to write intermediate result j{carry} (`codi_lens.training.chain_logit_loss`). The teacher\n"
    "writes the whole chain (the last step is not dropped)."
)
CARRY_NOTE = "; thoughts past the chain's last result toward the teacher's before the answer number"


def objective_text(cfg: dict) -> str:
    """The card's paragraph on the training objective, from ``training.json``'s config."""
    if cfg.get("chain_logit_weight", 0.0):
        carry = CARRY_NOTE if cfg.get("chain_carry_answer") else ""
        return CHAIN_LOGIT_OBJECTIVE.format(weight=cfg["chain_logit_weight"], carry=carry)
    if cfg.get("chain_distill_weight", 0.0):
        return CHAIN_OBJECTIVE.format(weight=cfg["chain_distill_weight"])
    return UPSTREAM_OBJECTIVE


#: Problems whose minimal pairs the report patches (the issue asks for >= 100 pairs in use).
PATCHING_PROBLEMS = 1000


def patching_cells(n_layers: int) -> list[Cell]:
    """The report's cells: ``resid_post`` of each layer at BOT + every thought (``latents``), every
    thought, and each position alone; and each fed thought (``thought.k.hook_input``)."""
    positions = [*SPAN_STARTS, "bot", *[f"thought:{k}" for k in range(1, N_LATENTS + 1)]]
    cells = [Cell("resid_post", layer, position) for layer in range(n_layers) for position in positions]
    return cells + [Cell("thought_input", None, f"thought:{k}") for k in range(1, N_LATENTS + 1)]


def patching_frame(model, problems, out: Path, args: argparse.Namespace) -> pd.DataFrame:
    """Recovery of the clean answer on minimal pairs of the first ``PATCHING_PROBLEMS`` problems (one
    number changed, answer recomputed; :func:`codi_lens.pairs.make_pairs`), for every cell of
    :func:`patching_cells`, patched from the pair's own clean run (``donor="clean"``) and, the
    control, from another pair's (``donor="other"``). Resumable in ``out/patching_<donor>``."""
    patched = problems[:PATCHING_PROBLEMS]
    pairs, _ = make_pairs(patched, max_value=value_limit(patched))
    frames = []
    for donor in DONORS:
        rows, store = patch_sweep(
            model,
            pairs,
            out / f"patching_{donor}",
            cells=patching_cells(model.cfg.n_layers),
            n_latents=N_LATENTS,
            max_new_tokens=args.max_new_tokens,
            donor=donor,
            settings={"checkpoint": str(args.checkpoint), "data_source": args.data},
            overwrite=args.overwrite,
            executor=executor_from_args(args),
        )
        store.finish(rows, {"donor": donor})
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def patching_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery and its 95% bootstrap CI over pairs, per donor and cell (used pairs only)."""
    used = rows[rows["reason"].fillna("") == ""]
    if used.empty:  # e.g. a model that answers no clean question right
        return pd.DataFrame(columns=["donor", "kind", "layer", "position", "n", "mean", "low", "high"])
    return mean_ci_table(used.fillna({"layer": -1}), ["donor", "kind", "layer", "position"], "recovery")


def readout_rates(lens: pd.DataFrame, n_steps_latent: int) -> pd.DataFrame:
    """Share of intermediate values (by chain position) that are top-5 at each latent step."""
    rows = {}
    for step, group in lens.groupby("step"):
        counts = [sum(s in hits for hits in group["topk_at"]) for s in range(n_steps_latent)]
        rows[f"value {step}"] = [c / len(group) for c in counts]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[str(s) for s in range(n_steps_latent)])


def _accuracy_markdown(accuracy: pd.DataFrame) -> str:
    table = accuracy.pivot(index="group", columns="condition", values="accuracy")
    counts = accuracy[accuracy["condition"] == "latents"].set_index("group")["n"]
    order = [g for g in table.index if g != "all"] + ["all"]
    columns = [
        c
        for c in (
            "latents",
            "zero_all_thoughts",
            f"zero_all_thoughts_{SHORT_BUDGET}_tokens",
            "no_cot_baseline",
            "teacher_explicit_cot",
        )
        if c in table
    ]
    lines = ["| steps | n | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    bounds = accuracy.set_index(["group", "condition"])[["low", "high"]]

    def cell(group: str, condition: str) -> str:
        low, high = bounds.loc[(group, condition)]
        return f"{100 * table.loc[group, condition]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    for group in order:
        lines.append(f"| {group} | {counts[group]} | " + " | ".join(cell(group, c) for c in columns) + " |")
    return "\n".join(lines) + "\n\nEach cell: accuracy [95% bootstrap CI over problems]."


def _lens_markdown(lens: pd.DataFrame) -> str:
    lines = [
        "| value in chain | n | top-1 at some latent | (control) | top-5 at some latent | (control) |"
        " most common top-1 step |",
        "|---|---|---|---|---|---|---|",
    ]
    control = lens[lens["control"]].groupby("step")
    for step, group in lens[~lens["control"]].groupby("step"):
        hits = [s for row in group["top1_at"] for s in row]
        common = max(set(hits), key=hits.count) if hits else "-"
        other = control.get_group(step)
        lines.append(
            f"| {step} | {len(group)} | {100 * group['top1_any'].mean():.1f}% | "
            f"{100 * other['top1_any'].mean():.1f}% | {100 * group['topk_any'].mean():.1f}% | "
            f"{100 * other['topk_any'].mean():.1f}% | {common} |"
        )
    return "\n".join(lines)


def _best_latents_patch(summary: dict) -> dict | None:
    """The layer whose ``resid_post`` at BOT + every thought recovers most, patched from the own run."""
    rows = [
        r
        for r in summary.get("patching", {}).get("recovery", [])
        if r["donor"] == "clean" and r["position"] == "latents"
    ]
    return max(rows, key=lambda r: r["mean"]) if rows else None


def _targets_markdown(summary: dict, wall_minutes: float) -> str:
    """The targets of the issue that asked for the chain-carrying model (issue 15), measured."""
    acc = summary["accuracy"]
    rows = [
        ("training time <= 45 min on this machine", f"{wall_minutes:.1f} min", wall_minutes <= 45),
        ("accuracy with 6 thoughts >= 85%", f"{100 * acc['latents']:.1f}%", acc["latents"] >= 0.85),
        (
            "zero-ablating all thoughts costs >= 50 points",
            f"{summary['ablation_drop_points']} points",
            summary["ablation_drop_points"] >= 50,
        ),
    ]
    no_cot = acc.get("no_cot_baseline", summary.get("no_cot_baseline_carried_over", {}).get("accuracy"))
    if no_cot is not None:
        gap = 100 * (acc["latents"] - no_cot)
        rows.append(
            (
                "CODI beats a no-CoT model of the same size and budget by >= 15 points",
                f"{100 * acc['latents']:.1f}% vs {100 * no_cot:.1f}% ({gap:+.1f})",
                gap >= 15,
            )
        )
    best = _best_latents_patch(summary)
    if best is not None:
        n_used = summary["patching"]["n_pairs_used"]
        rows.append(
            (
                f"clean BOT + thoughts patched into the corrupted run recover >= 50% on >= 100 pairs ({best['hook']})",
                f"{best['mean']:.2f} [{best['ci95'][0]:.2f}, {best['ci95'][1]:.2f}] on {n_used} pairs",
                best["mean"] >= 0.5 and n_used >= 100,
            )
        )
    lens = summary["logit_lens"]
    rows.append(
        (
            "intermediate values top-1 under the logit lens at some latent state >= 50%",
            f"{100 * lens['top1_any']:.1f}% (control {100 * lens['top1_any_control']:.1f}%)",
            lens["top1_any"] >= 0.5,
        )
    )
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    return "\n".join(lines)


def _patching_markdown(summary: dict) -> str:
    """One row per cell: recovery from the own clean run and from another problem's (the control)."""
    rows = summary.get("patching", {}).get("recovery", [])
    if not rows:
        return "(not measured)"
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        by_cell.setdefault((r["hook"], r["position"]), {})[r["donor"]] = r
    lines = [
        "| hook | positions | n | recovery, own clean run [95% CI] | recovery, another problem's run [95% CI] |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda r: "-" if r is None else f"{r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"  # noqa: E731
    for (hook, position), donors in by_cell.items():
        own = donors.get("clean")
        n = own["n"] if own else "-"
        lines.append(f"| `{hook}` | {position} | {n} | {fmt(own)} | {fmt(donors.get('other'))} |")
    return "\n".join(lines)


def _budget_markdown(summary: dict) -> str:
    short = summary["accuracy"].get(f"zero_all_thoughts_{SHORT_BUDGET}_tokens")
    lines = []
    if short is not None:
        drop = round(100 * (summary["accuracy"]["latents"] - short), 1)
        changes = short != summary["accuracy"]["zero_all_thoughts"]
        why = (
            " With its thoughts zeroed the model often writes an explicit chain before its answer; a short budget"
            " cuts those answers off and scores them wrong."
        )
        lines.append(
            f"The answer budget {'changes' if changes else 'does not change'} the ablation figure here: with a "
            f"{SHORT_BUDGET}-token budget the zeroed model scores {100 * short:.1f}% (a {drop}-point drop), against "
            f"{100 * summary['accuracy']['zero_all_thoughts']:.1f}% at {summary['max_new_tokens']} tokens."
            + (why if changes else "")
        )
    carried = summary.get("no_cot_baseline_carried_over")
    if carried is not None:
        lines.append(
            f"The no-CoT baseline was not re-run for this card: the previous card measured "
            f"{100 * carried['accuracy']:.1f}% with a {carried['max_new_tokens']}-token budget (its answers are "
            "`The answer is: N`, a handful of tokens)."
        )
    return "\n\n".join(lines)


def _data_variants_text(data: dict) -> str:
    variants = []
    if data.get("shuffle"):
        variants.append("the day sentences come in random order (the days say the order of the chain)")
    if data.get("halve_odd"):
        variants.append("odd values are halved too, rounding down (`<<7//2=3>>`)")
    if data.get("cot_days"):
        variants.append("the teacher's chain names each step's day before its equation")
    text = "; ".join(variants)
    return f"\n{text[:1].upper()}{text[1:]}." if variants else ""


def write_model_card(
    directory: Path,
    summary: dict,
    accuracy: pd.DataFrame,
    lens: pd.DataFrame,
    predictions: pd.DataFrame,
    data_source: str,
) -> None:
    """MODEL_CARD.md, card.json and predictions.parquet beside the checkpoint, from this report (run on
    ``data_source``) and ``training.json``."""
    columns = ["problem_id", "condition", "n_steps", "gold", "prediction", "correct", "n_answer_tokens"]
    predictions[columns].to_parquet(directory / "predictions.parquet", index=False)
    training = json.loads((directory / "training.json").read_text())
    previous = json.loads((directory / "card.json").read_text()) if (directory / "card.json").exists() else {}
    if "no_cot_baseline" not in summary["accuracy"]:
        carried = previous.get("summary", {}).get("no_cot_baseline_carried_over")
        old_accuracy = previous.get("summary", {}).get("accuracy", {})
        if carried is None and "no_cot_baseline" in old_accuracy:
            carried = {
                "accuracy": old_accuracy["no_cot_baseline"],
                "max_new_tokens": previous["summary"].get("max_new_tokens", SHORT_BUDGET),
                "note": "not re-run for this card; measured by the previous card's report",
            }
        if carried is not None:
            summary = {**summary, "no_cot_baseline_carried_over": carried}
    card = {"summary": summary, "training": training}
    (directory / "card.json").write_text(json.dumps(card, indent=2))
    cfg, shape = training["config"], training["model_shape"]
    wall_minutes = training.get("wall_seconds_total", training["wall_seconds_this_invocation"]) / 60
    name = directory.name.replace("_", "-")
    mix = STEP_MIXES[training["data"].get("step_mix", "default")]
    chain_weights = {
        "chain distillation": cfg.get("chain_distill_weight", 0.0),
        "chain logit distillation": cfg.get("chain_logit_weight", 0.0),
    }
    text = CARD_TEMPLATE.format(
        name=name,
        directory=f"codi_lens/pretrained/{directory.name}",
        run_name=directory.name,
        data_name=data_source,
        shape=", ".join(f"{k} {v}" for k, v in shape.items()),
        chain_lengths=f"{min(mix)}-{max(mix)} (shares "
        + ", ".join(f"{k}: {round(100 * v)}%" for k, v in sorted(mix.items()))
        + ")",
        objective=objective_text(cfg),
        variants=_data_variants_text(training["data"]),
        chain_weight="".join(f", {name} weight {w}" for name, w in chain_weights.items() if w),
        steps=training["steps"],
        seed=cfg["seed"],
        batch=cfg["batch_size"],
        lr=cfg["lr"],
        beta=cfg["distill_weight"],
        student=cfg["student_weight"],
        micro=cfg.get("micro_batches", 1),
        prj=cfg["prj_dim"],
        wall=wall_minutes,
        per_step=60 * wall_minutes / training["steps"],
        n=summary["n_problems"],
        accuracy=_accuracy_markdown(accuracy),
        lens=_lens_markdown(lens),
        drop=summary["ablation_drop_points"],
        data=json.dumps(training["data"]),
        threads=cfg["threads"],
        gain=_initialisation_text(cfg),
        targets=_targets_markdown(summary, wall_minutes),
        budget=summary["max_new_tokens"],
        budget_note=_budget_markdown(summary),
        patching=_patching_markdown(summary),
        patching_problems=PATCHING_PROBLEMS,
    )
    (directory / "MODEL_CARD.md").write_text(text)


def _initialisation_text(cfg: dict) -> str:
    """The clauses of the card's training paragraph for non-default initialisations."""
    text = ""
    if cfg.get("prj_gain_matches_embeddings"):
        text += ", projection LayerNorm gain started at the embeddings' std"
    if cfg.get("number_fourier_scale"):
        text += (
            f", the number tokens' embeddings started with a Fourier code of their value (amplitude "
            f"{cfg['number_fourier_scale']:g}, periods {', '.join(f'{t:g}' for t in NUMBER_PERIODS)}; "
            "`codi_lens.training.fourier_number_embeddings`)"
        )
    return text


CARD_TEMPLATE = """# {name}: a small CODI model trained from scratch by codi_lens

A LLaMA-architecture model (RMSNorm, rope, GQA, tied embeddings; {shape}) trained with the CODI
objective on synthetic multi-step arithmetic word problems (`codi_lens.synthetic`, data {data}):
{chain_lengths} dependent operations (+, -, x, halving; mostly the non-linear ones, against a
sum-of-operands shortcut), one per day ("On Tuesday Ava loses 3."), every value 0..40 and one token.{variants}
{objective}
Saved in the upstream CODI on-disk layout without LoRA (`codi.model.*`, `codi.lm_head.weight`,
`prj.*`), with its HF config (base vocabulary, without the 3 CODI rows) and word-level tokenizer; it
runs in the standard CODI loop with no extra masking.
Load it with `codi_lens.load_pretrained("{name}")`.

## Reproduce

```bash
python -m experiments.train_toy_codi --recipe {name} --export {directory}   # this model
python -m experiments.train_toy_codi --recipe {name} --no-cot                    # its no-CoT baseline
python -m experiments.toy_model_report --checkpoint {name} --data {data_name} \\
    --baseline runs/{run_name}_no_cot/export --write-card                        # this card
python -m experiments.position_patching --checkpoint {name} --data {data_name}  # the patching map
```

Seed {seed}; {steps} steps of batch {batch} ({micro} length-grouped micro-batch(es) a step), AdamW
lr {lr} (warm-up, cosine), student weight {student}, distillation weight {beta}{chain_weight}, projection
width {prj}, 6 latents, {threads} torch thread(s){gain}. Wall time of the training run on a 2-core CPU
machine of this type, as the run logged it: {wall:.1f} minutes ({per_step:.2f} s per step); the figure means
something only if no other heavy job ran beside it. Instances of this machine type differ in speed (up
to 2x), so time the first steps of a rerun before relying on that figure. The data order and
initialisation are seeded; rerunning the command with the same thread count reproduces the logged
losses exactly (another thread count changes the last float bits).

## Targets

{targets}

## Accuracy on {n} held-out test problems (greedy, the hooked CODI loop)

Columns: the 6 continuous thoughts (`latents`); all 6 fed-back thoughts replaced by zero vectors
(`zero_all_thoughts`); a no-CoT model of the same size and step budget trained on question -> answer
with 0 latents (`no_cot_baseline`); the same CODI model writing its chain of thought explicitly
(`teacher_explicit_cot`).

{accuracy}

Zero-ablating all 6 thoughts costs {drop} points. Every answer had a budget of {budget} tokens
(upstream's). `predictions.parquet` beside this card holds every problem's prediction under each
condition; the test suite re-runs a subset and compares problem by problem.

{budget_note}

## Patching the thoughts on minimal pairs

Pairs from the first {patching_problems} test problems (`codi_lens.pairs.make_pairs`: one number of the
question changed, the chain and answer recomputed); a pair is used when the model answers its clean
question right, the two answers start with different tokens and the corrupted run prefers its own
answer's first token to the clean one. Each cell writes the clean run's
activation into the corrupted run, whose loop then goes on from the patched state
(`codi_lens.patching.patch_sweep`); recovery is the normalised logit difference at the answer number
(0: the corrupted answer, 1: the clean one), teacher-forced on the clean answer's prefix. `latents` is
BOT and all six thoughts at once, `thoughts` the six thoughts, `fed thought:k` the fed-back vector
itself (`thought.k.hook_input`). The control patches each pair from *another* pair's clean run
(`donor="other"`): what a patch recovers because it carries this problem's values, it cannot recover
from another problem's. Where another problem's thoughts make the run give neither answer, that control
sits near 0.5 on this normalised metric (the corrupted answer's lead is lost, the clean answer's not
won), so compare the two donors, not the control with 0.

{patching}

## Intermediate values in the logit lens

For each intermediate value of each test problem (its position in the chain in the first column),
how often its token is the top-1 / in the top-5 of the logit lens (final norm applied) of some latent
state (`h_0` at BOT .. `h_6`), and at which latent step it is most often the top-1. The control columns
read out *another* problem's intermediate values from the same latent states: with 41 possible
values and 7 latent states, "top-5 at some latent" is reached often by chance, so only the gap to
the control means anything.

{lens}

Numbers are produced by `experiments/toy_model_report.py`; `card.json` holds them machine-readably.
"""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    model = load_model(args)
    problems = load_problems(args.data, split=args.split, limit=args.limit)

    budget = args.max_new_tokens
    conditions = [
        Condition("latents", model, n_latents=N_LATENTS, max_new_tokens=budget),
        Condition(
            "zero_all_thoughts",
            model,
            n_latents=N_LATENTS,
            max_new_tokens=budget,
            fwd_hooks=zero_thoughts(range(1, N_LATENTS + 1)),
            intervention="zero_thoughts(1..6)",
        ),
        Condition("teacher_explicit_cot", model, mode="explicit", max_new_tokens=budget),
    ]
    if args.write_card:  # the card says how the answer budget changes the ablation figure
        conditions.append(
            Condition(
                f"zero_all_thoughts_{SHORT_BUDGET}_tokens",
                model,
                n_latents=N_LATENTS,
                max_new_tokens=SHORT_BUDGET,
                fwd_hooks=zero_thoughts(range(1, N_LATENTS + 1)),
                intervention="zero_thoughts(1..6)",
            )
        )
    if args.baseline:
        baseline = load_codi(args.baseline, args.baseline, device=args.device)
        conditions.append(Condition("no_cot_baseline", baseline, n_latents=0, max_new_tokens=budget))
    settings = {**model_settings(model, args), "data_source": args.data, "limit": args.limit}
    predictions, store = evaluate_conditions(
        conditions,
        problems,
        out,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
        executor=executor_from_args(args),
    )
    accuracy = accuracy_table(predictions)
    lens = logit_lens_frame(model, problems, args.batch_size)

    accuracy.to_parquet(out / "accuracy.parquet")
    lens.to_parquet(out / "logit_lens.parquet")
    accuracy_bars(accuracy, title=f"{args.checkpoint}: accuracy with and without its thoughts").write_html(
        out / "accuracy.html"
    )
    latent_readout_heatmap(readout_rates(lens[~lens["control"]], N_LATENTS + 1)).write_html(out / "logit_lens.html")

    patch_rows = patching_frame(model, problems, out, args)
    patching = patching_table(patch_rows)
    patching.to_parquet(out / "patching.parquet")
    used = patch_rows[patch_rows["reason"].fillna("") == ""]
    if not used.empty:
        label = np.where(
            used["kind"] == "thought_input",
            "fed " + used["position"],
            "L" + used["layer"].fillna(-1).astype(int).astype(str) + " " + used["position"],
        )
        write_html(
            patching_bars(
                used.assign(cell=label),
                "cell",
                color="donor",
                title="Recovery of the clean answer on minimal pairs, patched from the pair's own clean run "
                "or (control) another problem's (95% CI over pairs)",
            ),
            out / "patching.html",
        )

    overall = accuracy[accuracy["group"] == "all"].set_index("condition")["accuracy"]
    real, control = lens[~lens["control"]], lens[lens["control"]]
    summary = {
        "checkpoint": Path(str(args.checkpoint)).name,
        "checkpoint_sha256": model.checkpoint_sha256,
        "n_problems": len(problems),
        "max_new_tokens": budget,
        "accuracy": overall.to_dict(),
        "ablation_drop_points": round(100 * (overall["latents"] - overall["zero_all_thoughts"]), 1),
        "conditions": {c.name: c.settings() for c in conditions},
        "accuracy_by_steps": {
            f"{r.condition}/{r.group}": round(r.accuracy, 4) for r in accuracy.itertuples() if r.group != "all"
        },
        "logit_lens": {
            "top1_any": round(float(real["top1_any"].mean()), 4),
            "top5_any": round(float(real["topk_any"].mean()), 4),
            "top1_any_control": round(float(control["top1_any"].mean()), 4) if len(control) else None,
            "top5_any_control": round(float(control["topk_any"].mean()), 4) if len(control) else None,
            "single_token_values": round(float(real["token"].notna().mean()), 4),
        },
        "patching": {
            "n_pairs": int(patch_rows["pair_id"].nunique()),
            "n_pairs_used": int(used[used["donor"] == "clean"]["pair_id"].nunique()),
            "recovery": [
                {
                    "donor": r.donor,
                    "hook": "thought.k.hook_input"
                    if r.kind == "thought_input"
                    else f"blocks.{int(r.layer)}.hook_resid_post",
                    "position": r.position,
                    "n": int(r.n),
                    "mean": round(float(r.mean), 4),
                    "ci95": [round(float(r.low), 4), round(float(r.high), 4)],
                }
                for r in patching.itertuples()
            ],
        },
    }
    store.finish(predictions, summary)
    if args.write_card:
        write_model_card(Path(model.checkpoint_file).parent, summary, accuracy, lens, predictions, args.data)
    print(accuracy.to_string(index=False))
    print(json.dumps(summary["logit_lens"]))
    print(f"ablation drop: {summary['ablation_drop_points']} points; results in {out}")
    return summary


if __name__ == "__main__":
    run_main(main)
