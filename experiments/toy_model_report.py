"""Do the shipped model's thoughts matter, and can we read intermediate values from them?

    python -m experiments.toy_model_report [--checkpoint toy-arith] [--data PATH] [--limit N] [--out DIR]

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

import pandas as pd
import torch
from tqdm.auto import tqdm

from codi_lens import load_codi
from codi_lens.cli import add_common_args, load_model, model_settings, run_main
from codi_lens.data import load_problems
from codi_lens.evaluate import Condition, evaluate_conditions
from codi_lens.interventions import zero_thoughts
from codi_lens.lens import intermediate_readout
from codi_lens.metrics import accuracy_table
from codi_lens.plotting import accuracy_bars, latent_readout_heatmap

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
    return parser.parse_args(argv)


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
    for group in order:
        cells = " | ".join(f"{100 * table.loc[group, c]:.1f}%" for c in columns)
        lines.append(f"| {group} | {counts[group]} | {cells} |")
    return "\n".join(lines)


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


def _targets_markdown(summary: dict, wall_minutes: float) -> str:
    acc = summary["accuracy"]
    rows = [
        ("training time <= 45 min on this machine", f"{wall_minutes:.1f} min", wall_minutes <= 45),
        ("accuracy with 6 latents >= 80%", f"{100 * acc['latents']:.1f}%", acc["latents"] >= 0.8),
        (
            "zero-ablating all thoughts costs >= 25 points",
            f"{summary['ablation_drop_points']} points",
            summary["ablation_drop_points"] >= 25,
        ),
    ]
    no_cot = acc.get("no_cot_baseline", summary.get("no_cot_baseline_carried_over", {}).get("accuracy"))
    if no_cot is not None:
        rows.append(
            (
                "CODI beats a no-CoT model of the same size and budget",
                f"{100 * acc['latents']:.1f}% vs {100 * no_cot:.1f}%",
                acc["latents"] > no_cot,
            )
        )
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    return "\n".join(lines)


def _budget_markdown(summary: dict) -> str:
    short = summary["accuracy"].get(f"zero_all_thoughts_{SHORT_BUDGET}_tokens")
    lines = []
    if short is not None:
        drop = round(100 * (summary["accuracy"]["latents"] - short), 1)
        lines.append(
            f"The answer budget changes the ablation figure: with a {SHORT_BUDGET}-token budget the zeroed model "
            f"scores {100 * short:.1f}% (a {drop}-point drop), against "
            f"{100 * summary['accuracy']['zero_all_thoughts']:.1f}% at {summary['max_new_tokens']} tokens. With its "
            "thoughts zeroed the model often writes an explicit chain before its answer; a short budget cuts "
            "those answers off and scores them wrong."
        )
    carried = summary.get("no_cot_baseline_carried_over")
    if carried is not None:
        lines.append(
            f"The no-CoT baseline was not re-run for this card: the previous card measured "
            f"{100 * carried['accuracy']:.1f}% with a {carried['max_new_tokens']}-token budget (its answers are "
            "`The answer is: N`, a handful of tokens)."
        )
    return "\n\n".join(lines)


def write_model_card(
    directory: Path, summary: dict, accuracy: pd.DataFrame, lens: pd.DataFrame, predictions: pd.DataFrame
) -> None:
    """MODEL_CARD.md, card.json and predictions.parquet beside the checkpoint, from this report and
    ``training.json``."""
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
    text = CARD_TEMPLATE.format(
        shape=", ".join(f"{k} {v}" for k, v in shape.items()),
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
        gain=", projection LayerNorm gain started at the embeddings' std"
        if cfg.get("prj_gain_matches_embeddings")
        else "",
        targets=_targets_markdown(summary, wall_minutes),
        budget=summary["max_new_tokens"],
        budget_note=_budget_markdown(summary),
    )
    (directory / "MODEL_CARD.md").write_text(text)


CARD_TEMPLATE = """# toy-arith: a small CODI model trained from scratch by codi_lens

A LLaMA-architecture model (RMSNorm, rope, GQA, tied embeddings; {shape}) trained with the CODI
objective on synthetic multi-step arithmetic word problems (`codi_lens.synthetic`, data {data}):
1-5 dependent operations (+, -, x, halving; mostly the non-linear ones, against a
sum-of-operands shortcut), one per day ("On Tuesday Ava loses 3."), every value 0..40 and one token.
Saved in the upstream CODI on-disk layout without LoRA (`codi.model.*`, `codi.lm_head.weight`,
`prj.*`), with its HF config (base vocabulary, without the 3 CODI rows) and word-level tokenizer.
Load it with `codi_lens.load_pretrained("toy-arith")`.

## Reproduce

```bash
python -m experiments.train_toy_codi --export codi_lens/pretrained/toy_arith   # the shipped model
python -m experiments.train_toy_codi --no-cot --out runs/no_cot                 # the no-CoT baseline
python -m experiments.toy_model_report --baseline runs/no_cot/export --write-card
```

Seed {seed}; {steps} steps of batch {batch} ({micro} length-grouped micro-batch(es) a step), AdamW
lr {lr} (warm-up, cosine), student weight {student}, distillation weight {beta}, projection width
{prj}, 6 latents, {threads} torch thread(s){gain}. Wall time of the training run on this 2-core CPU
machine, as the run logged it: {wall:.1f} minutes ({per_step:.2f} s per step); the figure means
something only if no other heavy job ran beside it. Instances of this machine type differ in speed, so
time the first steps of a rerun before relying on that figure. The data order and initialisation are
seeded; rerunning the command with the same thread count reproduces the logged losses exactly
(checked for the first 10 steps; another thread count changes the last float bits).

## Targets of the issue that asked for this model

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

## Intermediate values in the logit lens

For each intermediate value of each test problem (its position in the chain in the first column),
how often its token is the top-1 / in the top-5 of the logit lens of some latent state
(`h_0` at BOT .. `h_6`), and at which latent step it is most often the top-1. The control columns
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
        conditions, problems, out, batch_size=args.batch_size, settings=settings, overwrite=args.overwrite
    )
    accuracy = accuracy_table(predictions)
    lens = logit_lens_frame(model, problems, args.batch_size)

    accuracy.to_parquet(out / "accuracy.parquet")
    lens.to_parquet(out / "logit_lens.parquet")
    accuracy_bars(accuracy, title=f"{args.checkpoint}: accuracy with and without its thoughts").write_html(
        out / "accuracy.html"
    )
    latent_readout_heatmap(readout_rates(lens[~lens["control"]], N_LATENTS + 1)).write_html(out / "logit_lens.html")

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
    }
    store.finish(predictions, summary)
    if args.write_card:
        write_model_card(Path(model.checkpoint_file).parent, summary, accuracy, lens, predictions)
    print(accuracy.to_string(index=False))
    print(json.dumps(summary["logit_lens"]))
    print(f"ablation drop: {summary['ablation_drop_points']} points; results in {out}")
    return summary


if __name__ == "__main__":
    run_main(main)
