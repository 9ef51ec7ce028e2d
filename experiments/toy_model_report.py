"""Do the shipped model's thoughts matter, and can we read intermediate values from them?

    python -m experiments.toy_model_report [--checkpoint toy-arith] [--data PATH] [--limit N] [--out DIR]

1. Accuracy with the 6 continuous thoughts, and with all 6 fed-back thoughts zero-ablated, per number
   of steps (resumable: predictions are appended per batch and skipped on a rerun).
2. Logit lens on every latent state: for each intermediate value of each problem, the latent steps
   where its token is top-1 / top-5.

Writes to ``--out``: ``predictions.parquet``, ``accuracy.parquet``, ``logit_lens.parquet``,
``summary.json``, and the figures ``accuracy.html`` and ``logit_lens.html``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.evaluate import evaluate
from codi_lens.interventions import zero_thoughts
from codi_lens.lens import intermediate_readout
from codi_lens.loading import DEFAULT_MODEL, PRETRAINED
from codi_lens.metrics import accuracy_table
from codi_lens.plotting import accuracy_bars, latent_readout_heatmap

N_LATENTS = 6
DEFAULT_DATA = PRETRAINED[DEFAULT_MODEL] / "data" / "test.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL)
    parser.add_argument("--base", default=None)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default="results/toy_model_report")
    return parser.parse_args(argv)


def logit_lens_frame(model, problems, batch_size: int) -> pd.DataFrame:
    """Intermediate-value readout for every problem (the latent loop only; answers are not needed)."""
    frames = []
    for start in tqdm(range(0, len(problems), batch_size), desc="logit lens", unit="batch"):
        batch = problems[start : start + batch_size]
        result = model.run_codi([p.question for p in batch], n_latents=N_LATENTS, max_new_tokens=1)
        frame = intermediate_readout(model, result.latent_states, [p.intermediates for p in batch])
        frame["id"] = [batch[i].id for i in frame["example"]]
        frames.append(frame.drop(columns="example"))
    return pd.concat(frames, ignore_index=True)


def readout_rates(lens: pd.DataFrame, n_steps_latent: int) -> pd.DataFrame:
    """Share of intermediate values (by chain position) that are top-5 at each latent step."""
    rows = {}
    for step, group in lens.groupby("step"):
        counts = [sum(s in hits for hits in group["topk_at"]) for s in range(n_steps_latent)]
        rows[f"value {step}"] = [c / len(group) for c in counts]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[str(s) for s in range(n_steps_latent)])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_codi(args.checkpoint, args.base)
    problems = load_problems(args.data, limit=args.limit)

    conditions = {"latents": [], "zero_all_thoughts": zero_thoughts(range(1, N_LATENTS + 1))}
    predictions = pd.concat([
        evaluate(model, problems, out / f"predictions_{name}.jsonl", batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, fwd_hooks=hooks, condition=name)
        for name, hooks in conditions.items()
    ], ignore_index=True)
    accuracy = accuracy_table(predictions)
    lens = logit_lens_frame(model, problems, args.batch_size)

    predictions.to_parquet(out / "predictions.parquet")
    accuracy.to_parquet(out / "accuracy.parquet")
    lens.to_parquet(out / "logit_lens.parquet")
    accuracy_bars(accuracy, title=f"{args.checkpoint}: accuracy with and without its thoughts").write_html(out / "accuracy.html")
    latent_readout_heatmap(readout_rates(lens, N_LATENTS + 1)).write_html(out / "logit_lens.html")

    overall = accuracy[accuracy["group"] == "all"].set_index("condition")["accuracy"]
    summary = {
        "checkpoint": str(args.checkpoint),
        "n_problems": len(problems),
        "accuracy": overall.to_dict(),
        "ablation_drop_points": round(100 * (overall["latents"] - overall["zero_all_thoughts"]), 1),
        "accuracy_by_steps": {
            f"{r.condition}/{r.group}": round(r.accuracy, 4) for r in accuracy.itertuples() if r.group != "all"
        },
        "logit_lens": {
            "top1_any": round(float(lens["top1_any"].mean()), 4),
            "top5_any": round(float(lens["topk_any"].mean()), 4),
            "single_token_values": round(float(lens["token"].notna().mean()), 4),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(accuracy.to_string(index=False))
    print(json.dumps(summary["logit_lens"]))
    print(f"ablation drop: {summary['ablation_drop_points']} points; results in {out}")
    return summary


if __name__ == "__main__":
    main()
