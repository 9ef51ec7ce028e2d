"""The card of a shipped model: ``MODEL_CARD.md``, ``card.json`` and ``predictions.parquet`` beside its checkpoint,
written from a model report's numbers (``python -m experiments.toy_model_report --write-card``) and the model's
``training.json``. Every number in the card is read from those; the sentences around them are chosen by them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from codi_lens.data.synthetic import STEP_MIXES
from codi_lens.loading.checkpoint import METHOD_NAMES
from codi_lens.loading.registry import SHIPPED_MODELS
from codi_lens.training import NUMBER_PERIODS

#: The budget the v4 card used by mistake; the card reports the ablation at it beside upstream's 256.
SHORT_BUDGET = 16
#: Problems whose minimal pairs the report patches (the card asks for >= 100 pairs in use).
PATCHING_PROBLEMS = 1000


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


COCONUT_OBJECTIVE = (
    "The objective is Coconut's curriculum (Hao et al. 2024): at stage s the chain's first s steps are replaced\n"
    "by {per_step} latent(s) each, fed the last hidden state of the position before them, and the model is\n"
    "trained by cross-entropy on the rest of the chain and the answer (`### N`); {stage_steps} steps per stage,\n"
    "the optimizer's moments cleared at each new stage, and from stage {last} on every step is a latent\n"
    "(`codi_lens.training.coconut`). No teacher, no distillation, no projection head."
)
#: What the card says of each method's checkpoint: its layout, and how it is loaded and run.
LAYOUTS = {
    "codi": (
        "Saved in the upstream CODI on-disk layout without LoRA (`codi.model.*`, `codi.lm_head.weight`,\n"
        "`prj.*`), with its HF config (base vocabulary, without the 3 CODI rows) and word-level tokenizer; it\n"
        "runs in the standard CODI loop with no extra masking."
    ),
    "coconut": (
        "Saved as upstream Coconut's `run.py` saves its module (`base_causallm.model.*`,\n"
        "`base_causallm.lm_head.weight`, `embedding.weight`; as `model.safetensors`), with its HF config (base\n"
        "vocabulary, without Coconut's 3 tokens) and word-level tokenizer (with `#` for Coconut's `### N`\n"
        "answers); it runs in the Coconut loop, each thought fed the last hidden state unchanged."
    ),
}
#: The condition in which each method's model writes its chain out
#: (:func:`~codi_lens.reports.model_report.chain_condition`), and what the card says of its column.
TEACHER_CONDITION = "teacher_explicit_cot"
#: PCCoT trains its latent loop beside the same LM writing the chain (upstream's ``cot_loss``), as CODI does.
CHAIN_CONDITION_NAMES = {"codi": TEACHER_CONDITION, "coconut": "no_latents", "pccot": TEACHER_CONDITION}
CHAIN_TEXTS = {
    "codi": "the same CODI model writing its chain of thought explicitly",
    "coconut": (
        "the same Coconut model with the latent span opened and closed at once (0 latents), the input of stage 0\n"
        "of its curriculum (where training had it write the whole chain)"
    ),
}


#: What the card says before its targets table, per method: the targets were set for the CODI model (issue 15).
TARGETS_INTRO = {
    "codi": "",
    "coconut": (
        "These are the targets set for the shipped CODI model (`toy-chain`), against which this twin is measured for\n"
        "comparison; the twin's own target was to be trained in at most 45 minutes on the same data.\n\n"
    ),
}


def method_of(cfg: dict) -> str:
    """The training method of a ``training.json`` config (older ones are CODI's)."""
    return cfg.get("method", "codi")


def hyperparameters_text(cfg: dict, chain_weight: str) -> str:
    """The card's clause on the method's own hyperparameters."""
    if method_of(cfg) == "coconut":
        return f"curriculum stages of {cfg['stage_steps']} steps ({cfg['thoughts_per_step']} latent(s) per chain step)"
    return (
        f"student weight {cfg['student_weight']}, distillation weight {cfg['distill_weight']}{chain_weight}, "
        f"projection\nwidth {cfg['prj_dim']}"
    )


def objective_text(cfg: dict) -> str:
    """The card's paragraph on the training objective, from ``training.json``'s config."""
    if method_of(cfg) == "coconut":
        last = cfg["n_latents"] // cfg["thoughts_per_step"]
        return COCONUT_OBJECTIVE.format(per_step=cfg["thoughts_per_step"], stage_steps=cfg["stage_steps"], last=last)
    if cfg.get("chain_logit_weight", 0.0):
        carry = CARRY_NOTE if cfg.get("chain_carry_answer") else ""
        return CHAIN_LOGIT_OBJECTIVE.format(weight=cfg["chain_logit_weight"], carry=carry)
    if cfg.get("chain_distill_weight", 0.0):
        return CHAIN_OBJECTIVE.format(weight=cfg["chain_distill_weight"])
    return UPSTREAM_OBJECTIVE


def accuracy_markdown(accuracy: pd.DataFrame) -> str:
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
            *dict.fromkeys(CHAIN_CONDITION_NAMES.values()),
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


def lens_markdown(lens: pd.DataFrame) -> str:
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


def best_latents_patch(summary: dict) -> dict | None:
    """The layer whose ``resid_post`` at BOT + every thought recovers most, patched from the own run."""
    rows = [
        r
        for r in summary.get("patching", {}).get("recovery", [])
        if r["donor"] == "clean" and r["position"] == "latents"
    ]
    return max(rows, key=lambda r: r["mean"]) if rows else None


def targets_markdown(summary: dict, wall_minutes: float) -> str:
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
                "the latent loop beats a no-CoT model of the same size and budget by >= 15 points",
                f"{100 * acc['latents']:.1f}% vs {100 * no_cot:.1f}% ({gap:+.1f})",
                gap >= 15,
            )
        )
    best = best_latents_patch(summary)
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


def patching_markdown(summary: dict) -> str:
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


def budget_markdown(summary: dict) -> str:
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
            f"The no-CoT baseline was not re-run for this card: {carried.get('note', 'the previous card measured it')}"
            f" ({100 * carried['accuracy']:.1f}% with a {carried['max_new_tokens']}-token budget; its answers are "
            "`The answer is: N`, a handful of tokens)."
        )
    return "\n\n".join(lines)


def data_variants_text(data: dict) -> str:
    variants = []
    if data.get("shuffle"):
        variants.append("the day sentences come in random order (the days say the order of the chain)")
    if data.get("halve_odd"):
        variants.append("odd values are halved too, rounding down (`<<7//2=3>>`)")
    if data.get("cot_days"):
        variants.append("the teacher's chain names each step's day before its equation")
    text = "; ".join(variants)
    return f"\n{text[:1].upper()}{text[1:]}." if variants else ""


def initialisation_text(cfg: dict) -> str:
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


def sibling_baseline(directory: Path, training: dict) -> dict | None:
    """The no-CoT baseline another shipped model's card measured on the same data and architecture (a Coconut
    twin shares its CODI model's), carried over with a note saying so; None when there is none."""
    for name, model in SHIPPED_MODELS.items():
        card_file, training_file = model.folder / "card.json", model.folder / "training.json"
        if model.folder == directory or not (card_file.exists() and training_file.exists()):
            continue
        other = json.loads(training_file.read_text())
        if (other["data"], other["model_shape"]) != (training["data"], training["model_shape"]):
            continue
        summary = json.loads(card_file.read_text())["summary"]
        accuracy = summary["accuracy"].get("no_cot_baseline")
        if accuracy is not None:
            return {
                "accuracy": accuracy,
                "max_new_tokens": summary["max_new_tokens"],
                "note": f"measured by {name}'s card: the same data, test problems and architecture",
            }
    return None


def card_commands(name: str, run_name: str, data_name: str, with_baseline: bool) -> str:
    """The card's commands for its no-CoT baseline and for the card itself (a model whose baseline another card
    measured is reported without one)."""
    if not with_baseline:
        return (
            f"python -m experiments.toy_model_report --checkpoint {name} --data {data_name} --write-card  # this card"
        )
    return (
        f"python -m experiments.train_toy_codi --recipe {name} --no-cot                    # its no-CoT baseline\n"
        f"python -m experiments.toy_model_report --checkpoint {name} --data {data_name} \\\n"
        f"    --baseline runs/{run_name}_no_cot/export --write-card                        # this card"
    )


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
    method = method_of(training["config"])
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
        carried = carried if carried is not None else sibling_baseline(directory, training)
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
    chain_weight = "".join(f", {name} weight {w}" for name, w in chain_weights.items() if w)
    text = CARD_TEMPLATE.format(
        name=name,
        method=METHOD_NAMES[method],
        layout=LAYOUTS[method],
        chain_condition=f"`{CHAIN_CONDITION_NAMES[method]}`",
        chain_text=CHAIN_TEXTS[method],
        hyperparameters=hyperparameters_text(cfg, chain_weight),
        card_commands=card_commands(name, directory.name, data_source, method == "codi"),
        directory=f"codi_lens/pretrained/{directory.name}",
        run_name=directory.name,
        data_name=data_source,
        shape=", ".join(f"{k} {v}" for k, v in shape.items()),
        chain_lengths=f"{min(mix)}-{max(mix)} (shares "
        + ", ".join(f"{k}: {round(100 * v)}%" for k, v in sorted(mix.items()))
        + ")",
        objective=objective_text(cfg),
        variants=data_variants_text(training["data"]),
        steps=training["steps"],
        seed=cfg["seed"],
        batch=cfg["batch_size"],
        lr=cfg["lr"],
        micro=cfg.get("micro_batches", 1),
        wall=wall_minutes,
        per_step=60 * wall_minutes / training["steps"],
        n=summary["n_problems"],
        accuracy=accuracy_markdown(accuracy),
        lens=lens_markdown(lens),
        drop=summary["ablation_drop_points"],
        data=json.dumps(training["data"]),
        threads=cfg["threads"],
        gain=initialisation_text(cfg),
        targets=TARGETS_INTRO[method] + targets_markdown(summary, wall_minutes),
        budget=summary["max_new_tokens"],
        budget_note=budget_markdown(summary),
        patching=patching_markdown(summary),
        patching_problems=PATCHING_PROBLEMS,
    )
    (directory / "MODEL_CARD.md").write_text(text)


CARD_TEMPLATE = """# {name}: a small {method} model trained from scratch by codi_lens

A LLaMA-architecture model (RMSNorm, rope, GQA, tied embeddings; {shape}) trained with the {method}
objective on synthetic multi-step arithmetic word problems (`codi_lens.data.synthetic`, data {data}):
{chain_lengths} dependent operations (+, -, x, halving; mostly the non-linear ones, against a
sum-of-operands shortcut), one per day ("On Tuesday Ava loses 3."), every value 0..40 and one token.{variants}
{objective}
{layout}
Load it with `codi_lens.load_pretrained("{name}")`.

## Reproduce

```bash
python -m experiments.train_toy_codi --recipe {name} --export {directory}   # this model
{card_commands}
python -m experiments.position_patching --checkpoint {name} --data {data_name}  # the patching map
```

Seed {seed}; {steps} steps of batch {batch} ({micro} length-grouped micro-batch(es) a step), AdamW
lr {lr} (warm-up, cosine), {hyperparameters}, 6 latents, {threads} torch thread(s){gain}. Wall time of the
training run on a 2-core CPU machine of this type, as the run logged it: {wall:.1f} minutes ({per_step:.2f} s
per step); the figure means something only if no other heavy job ran beside it. Instances of this machine type
differ in speed (up to 2x), so time the first steps of a rerun before relying on that figure. The data order
and initialisation are seeded; rerunning the command with the same thread count reproduces the logged losses
exactly (another thread count changes the last float bits).

## Targets

{targets}

## Accuracy on {n} held-out test problems (greedy, the hooked {method} loop)

Columns: the 6 continuous thoughts (`latents`); all 6 fed-back thoughts replaced by zero vectors
(`zero_all_thoughts`); a no-CoT model of the same size and step budget trained on question -> answer
with 0 latents (`no_cot_baseline`); {chain_text} ({chain_condition}).

{accuracy}

Zero-ablating all 6 thoughts costs {drop} points. Every answer had a budget of {budget} tokens
(upstream's). `predictions.parquet` beside this card holds every problem's prediction under each
condition; the test suite re-runs a subset and compares problem by problem.

{budget_note}

## Patching the thoughts on minimal pairs

Pairs from the first {patching_problems} test problems (`codi_lens.data.pairs.make_pairs`: one number of the
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
