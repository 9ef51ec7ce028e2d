"""Train sparse autoencoders on the continuous thoughts, one per (site, architecture), and evaluate them.

    python -m experiments.train_saes [--sites thought.1.hook_hidden,...] [--architectures topk]
        [--d-sae 512] [--k 16] [--l1 1.0] [--training-samples 300000] [--train-data toy-chain:train]
        [--train-limit 4000] [--data toy-chain:test] [--limit 500] [--splice-limit 200] [--out DIR]

A site is a thought hook (``thought.3.hook_hidden``: h_3, what the projection reads) or a hook with a
position axis read at one thought (``blocks.1.hook_resid_post@3``; thought 0 = BOT). Each SAE sees
its own site's activations only. Training problems (``--train-data``, the first ``--train-limit``)
and held-out problems (``--data``, the first ``--limit``) must not share an id.

Stages, each resumable after a kill: thought activations of both problem sets (``activations/``,
``codi_lens.activations``); one SAE per site x architecture with SAELens' trainer
(``work/<sae_id>/checkpoints`` while training, then ``saes/<sae_id>/`` in SAELens format with the
site in its metadata); held-out evaluation: explained variance (``1 - sum Var(x - x_hat) / sum
Var(x)``, 95% bootstrap CI over problems), L0, dead and dense fractions, cosine, MSE, and the answer
with the reconstruction spliced into the loop, with and without the error term, on the first
``--splice-limit`` held-out problems (accuracy and KL(plain || spliced) at the answer number).

Writes to ``--out`` (default ``results/train_saes``): ``run.json``, ``parts/``, ``results.parquet``
(one row per SAE: ``sae_id, hook, thought, site, architecture, d_sae, k, explained_variance`` (+ CI),
``l0, dead_fraction, dense_fraction, cosine, mse, n_train, n_heldout``, and per splice condition
``accuracy_*``, ``kl_*``, ``changed_*``), ``splice.parquet`` (one row per SAE x condition x problem),
``train_problems.json``, ``summary.json``, ``sae_quality.html`` and ``sae_splice.html``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pandas as pd

from codi_lens.activations import Site, collect_activations
from codi_lens.cli import (
    add_common_args,
    executor_from_args,
    load_model,
    model_settings,
    parse_choices,
    parse_common_args,
    run_main,
)
from codi_lens.data import DataError, default_data, load_problems
from codi_lens.metrics import mean_ci_table
from codi_lens.plotting import sae_quality_bars, sae_splice_bars, write_html
from codi_lens.runner import UNIT_COLUMN, ResultStore
from codi_lens.saes import (
    ARCHITECTURES,
    PlainRun,
    SAERecipe,
    load_sae,
    recipe_dict,
    reconstruction_metrics,
    save_sae,
    splice_effect,
    train_sae,
)

DEFAULT_SITES = ",".join(f"thought.{k}.hook_hidden" for k in range(1, 7))


def sae_id(site: Site, architecture: str) -> str:
    """A folder-safe id of one SAE: ``thought.3.hook_hidden-topk``, ``blocks.1.hook_resid_post@3-topk``."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", f"{site.id}-{architecture}")


def parse_sites(text: str) -> list[Site]:
    try:
        return [Site.parse(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise KeyError(f"--sites: {exc}") from None


def recipe_for(args: argparse.Namespace, architecture: str) -> SAERecipe:
    return SAERecipe(
        architecture=architecture,
        d_sae=args.d_sae,
        k=args.k,
        l1_coefficient=args.l1,
        lr=args.lr,
        batch_size=args.sae_batch_size,
        training_samples=args.training_samples,
        seed=args.seed,
    )


def trained_sae(args, out: Path, site: Site, architecture: str, rows, model_name: str, device: str):
    """The SAE of one site x architecture: loaded if it was saved, else trained (resuming) and saved."""
    folder = out / "saes" / sae_id(site, architecture)
    if (folder / "cfg.json").exists():
        return load_sae(folder, device=device)
    sae = train_sae(
        rows,
        recipe_for(args, architecture),
        site,
        workdir=out / "work" / sae_id(site, architecture),
        device=device,
        model_name=model_name,
    )
    save_sae(sae, folder)
    return load_sae(folder, device=device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/train_saes", batch_size=100)
    parser.add_argument("--sites", default=DEFAULT_SITES, help="comma-separated sites (hook or hook@thought)")
    parser.add_argument("--architectures", default="topk", help=f"comma-separated: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--d-sae", type=int, default=512, help="features per SAE")
    parser.add_argument("--k", type=int, default=16, help="active features of the TopK family")
    parser.add_argument("--l1", type=float, default=1.0, help="L1 coefficient of the standard SAE")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sae-batch-size", type=int, default=256, help="activations per SAE training step")
    parser.add_argument("--training-samples", type=int, default=300_000, help="activations each SAE trains on")
    parser.add_argument(
        "--train-data",
        default=None,
        help="problems whose thoughts train the SAEs (default: the checkpoint's own training split, "
        "toy-chain:train for toy-chain)",
    )
    parser.add_argument("--train-limit", type=int, default=4000, help="the first N training problems")
    parser.add_argument("--splice-limit", type=int, default=200, help="held-out problems of the splice test")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(limit=500)
    args = parse_common_args(parser, argv)
    args.train_data = args.train_data or default_data(args.checkpoint, "train")
    sites = parse_sites(args.sites)
    architectures = parse_choices("--architectures", args.architectures, list(ARCHITECTURES))

    started = time.perf_counter()
    model = load_model(args)
    executor = executor_from_args(args)
    train = load_problems(args.train_data, limit=args.train_limit)
    heldout = load_problems(args.data, split=args.split, limit=args.limit)
    shared = {p.id for p in train} & {p.id for p in heldout}
    if shared:
        raise DataError(f"--train-data and --data share {len(shared)} problems, e.g. {sorted(shared)[0]}")
    out = Path(args.out)
    settings = {
        **model_settings(model, args),
        "train_data": args.train_data,
        "train_limit": args.train_limit,
        "data_source": args.data,
        "limit": args.limit,
        "sites": [s.id for s in sites],
        "architectures": architectures,
        "recipes": {a: recipe_dict(recipe_for(args, a)) for a in architectures},
        "splice_limit": args.splice_limit,
        "n_latents": args.n_latents,
        "max_new_tokens": args.max_new_tokens,
    }
    store = ResultStore(out, settings, overwrite=args.overwrite)
    (out / "train_problems.json").write_text(json.dumps([p.id for p in train]))
    common = dict(n_latents=args.n_latents, batch_size=args.batch_size, executor=executor, overwrite=args.overwrite)
    train_acts = collect_activations(model, train, sites, out / "activations" / "train", **common)
    heldout_acts = collect_activations(model, heldout, sites, out / "activations" / "heldout", **common)
    model_name = str(args.checkpoint)

    units = [(site, a) for site in sites for a in architectures]

    splice_problems = heldout[: args.splice_limit]
    plain: list[PlainRun] = []  # the plain run of the splice problems, computed once, on first use

    def splice_work(batch: list[tuple[Site, str]]) -> pd.DataFrame:
        if not plain:
            plain.append(
                PlainRun.of(model, splice_problems, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens)
            )
        frames = []
        for site, architecture in batch:
            rows = train_acts.load(site)[0]
            sae = trained_sae(args, out, site, architecture, rows, model_name, args.device)
            for condition, error in (("spliced", False), ("spliced_error", True)):
                frame = splice_effect(
                    model,
                    splice_problems,
                    [sae],
                    use_error_term=error,
                    n_latents=args.n_latents,
                    max_new_tokens=args.max_new_tokens,
                    plain=plain[0],
                )
                frames.append(frame.assign(**{UNIT_COLUMN: sae_id(site, architecture)}, condition=condition))
        return pd.concat(frames, ignore_index=True)

    # Training happens in the first stage (each SAE is saved when trained, so it resumes SAE by SAE).
    splice_store = ResultStore(out / "splice", settings, overwrite=args.overwrite)
    splice_rows = splice_store.run(units, splice_work, unit_id=lambda u: sae_id(*u), batch_size=1, desc="SAEs")
    splice_rows = splice_rows.rename(columns={UNIT_COLUMN: "sae_id"})

    def evaluate(batch: list[tuple[Site, str]]) -> pd.DataFrame:
        rows = []
        for site, architecture in batch:
            sae = load_sae(out / "saes" / sae_id(site, architecture), device=args.device)
            x, _ = heldout_acts.load(site)
            row = {
                UNIT_COLUMN: sae_id(site, architecture),
                "sae_id": sae_id(site, architecture),
                "hook": site.hook,
                "thought": site.thought,
                "site": site.id,
                "architecture": architecture,
                "d_sae": sae.cfg.d_sae,
                "k": args.k if architecture != "standard" else None,
                "n_train": len(train),
                "n_heldout": len(x),
                **reconstruction_metrics(sae, x),
            }
            mine = splice_rows[splice_rows["sae_id"] == row["sae_id"]]
            row["accuracy_plain"] = float(mine[mine["condition"] == "spliced"]["baseline_correct"].mean())
            for condition, group in mine.groupby("condition"):
                row[f"accuracy_{condition}"] = float(group["correct"].mean())
                row[f"kl_{condition}"] = float(group["kl"].mean())
                row[f"changed_{condition}"] = float(group["changed"].mean())
            rows.append(row)
        return pd.DataFrame(rows)

    results = store.run(units, evaluate, unit_id=lambda u: sae_id(*u), batch_size=len(units), desc="evaluation")
    splice_rows.to_parquet(out / "splice.parquet", index=False)
    write_html(sae_quality_bars(results), out / "sae_quality.html")
    write_html(sae_splice_bars(splice_table(splice_rows, results)), out / "sae_splice.html")

    summary = {
        "n_saes": len(results),
        "n_train_problems": len(train),
        "n_heldout_problems": len(heldout),
        "explained_variance": {
            r.sae_id: [
                round(r.explained_variance, 4),
                round(r.explained_variance_low, 4),
                round(r.explained_variance_high, 4),
            ]
            for r in results.itertuples()
        },  # fmt: skip
        "l0": {r.sae_id: round(r.l0, 2) for r in results.itertuples()},
        "dead_fraction": {r.sae_id: round(r.dead_fraction, 4) for r in results.itertuples()},
        "min_explained_variance": round(float(results["explained_variance"].min()), 4),
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    store.finish(results.drop(columns=UNIT_COLUMN), summary)
    print(f"wrote {len(results)} SAEs to {out / 'saes'}; explained variance {results['explained_variance'].min():.3f}"
          f"-{results['explained_variance'].max():.3f} on {len(heldout)} held-out problems")  # fmt: skip
    return summary


def splice_table(rows: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with 95% CIs per SAE and condition (the plain run included once per SAE)."""
    plain = rows[rows["condition"] == "spliced"].assign(condition="plain", correct=lambda f: f["baseline_correct"])
    both = pd.concat([plain, rows], ignore_index=True).astype({"correct": float})
    table = mean_ci_table(both, ["sae_id", "condition"], "correct").rename(columns={"mean": "accuracy"})
    kl = both.groupby(["sae_id", "condition"])["kl"].mean().rename("kl_mean").reset_index()
    table = table.merge(kl, on=["sae_id", "condition"])
    return table.merge(results[["sae_id", "site", "architecture"]], on="sae_id")


if __name__ == "__main__":
    run_main(main)
