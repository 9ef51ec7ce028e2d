"""What the features of thought SAEs stand for: frequencies, position profiles, top examples, a browser,
and the answer tokens a feature intervention shifts.

    python -m experiments.sae_features [--saes results/train_saes] [--sae-ids ID,...] [--data toy-chain:test]
        [--limit 500] [--top-features 20] [--top-k 10] [--intervene 5] [--intervention clamp] [--out DIR]

For every SAE (SAELens folders written by ``experiments.train_saes``), on the held-out problems:
its features' frequency and mean activation at its own site; its position profile (the SAE applied to
its hook at every thought, so a feature of ``thought.3.hook_hidden`` can be seen firing at thought 5);
the top-activating problems of its ``--top-features`` most frequent features, with the chain's
intermediate values; and an offline HTML feature browser. Then, for the ``--intervene`` most frequent
features, the answers are generated with the feature ``clamp``-ed to ``--clamp-scale`` (10) times its
largest activation on these problems (or ``ablate``-d) inside the loop (SAE spliced in with its error
term, so everything else is the model's own) and compared token by token with the unedited answers: smoothed log-odds,
Fisher exact p-values and Benjamini-Hochberg q-values (``codi_lens.features.token_association``).

Writes to ``--out`` (default ``results/sae_features``): ``run.json``, ``parts/``, ``results.parquet``
(one row per SAE x feature: ``sae_id, site, feature, frequency, mean_when_active, max_activation``),
``position_profile.parquet``, ``top_examples.parquet``, ``token_association/results.parquet`` (one row per
SAE x feature x token), ``summary.json`` and ``dashboard_<sae_id>.html``. Resumable after a kill.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from codi_lens.activations import collect_activations
from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.data import load_problems
from codi_lens.features import (
    answer_tokens_as_text,
    feature_frequency,
    position_profile,
    token_association,
    top_examples,
)
from codi_lens.plotting import feature_dashboard, write_html
from codi_lens.runner import UNIT_COLUMN, ResultStore
from codi_lens.saes import attached, encode_decode, feature_edit, load_saes, sae_site


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/sae_features", batch_size=100)
    parser.add_argument("--saes", default="results/train_saes", help="folder of SAELens folders (train_saes --out)")
    parser.add_argument("--sae-ids", default=None, help="comma-separated SAE ids (default: all)")
    parser.add_argument("--top-features", type=int, default=20, help="features with examples in the browser")
    parser.add_argument("--top-k", type=int, default=10, help="top-activating problems per feature")
    parser.add_argument("--intervene", type=int, default=5, help="features per SAE whose intervention is tested")
    parser.add_argument("--intervention", choices=["clamp", "ablate"], default="clamp")
    parser.add_argument("--clamp-scale", type=float, default=10.0, help="clamp to this times the largest activation")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.set_defaults(limit=500)
    args = parse_common_args(parser, argv)

    started = time.perf_counter()
    model = load_model(args)
    executor = executor_from_args(args)
    ids = [i.strip() for i in args.sae_ids.split(",")] if args.sae_ids else None
    saes = load_saes(args.saes, ids, device=args.device)
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    out = Path(args.out)
    settings = {
        **model_settings(model, args),
        "saes": {i: str(Path(args.saes)) for i in saes},
        "data_source": args.data,
        "limit": args.limit,
        "intervention": args.intervention,
        "intervene": args.intervene,
        "clamp_scale": args.clamp_scale,
        "n_latents": args.n_latents,
        "max_new_tokens": args.max_new_tokens,
    }
    store = ResultStore(out, settings, overwrite=args.overwrite)
    sites = sorted({s for sae in saes.values() for s in sae_site(sae).across_thoughts(args.n_latents)})
    dataset = collect_activations(
        model, problems, sites, out / "activations", n_latents=args.n_latents, batch_size=args.batch_size,
        executor=executor, overwrite=args.overwrite,
    )  # fmt: skip

    # Each SAE's feature activations at its own site, on every problem (rows in problem order).
    feature_acts = {i: encode_decode(sae, dataset.load(sae_site(sae))[0])[0].cpu() for i, sae in saes.items()}

    def describe(batch: list[str]) -> pd.DataFrame:
        frames = [feature_frequency(feature_acts[i]).assign(**{UNIT_COLUMN: i, "sae_id": i}) for i in batch]
        return pd.concat(frames, ignore_index=True)

    table = store.run(list(saes), describe, unit_id=str, batch_size=1, desc="features")
    table["site"] = table["sae_id"].map({i: sae_site(s).id for i, s in saes.items()})

    profiles, examples = [], []
    for sae_id, sae in saes.items():
        site = sae_site(sae)
        freq = table[table["sae_id"] == sae_id]
        chosen = freq.sort_values("frequency", ascending=False).head(args.top_features)["feature"].tolist()
        profile = position_profile(sae, dataset, [s.thought for s in site.across_thoughts(args.n_latents)])
        top = top_examples(feature_acts[sae_id], problems, chosen, k=args.top_k, site=site)
        profiles.append(profile.assign(sae_id=sae_id))
        examples.append(top.assign(sae_id=sae_id))
        title = f"{sae_id}: {sae.cfg.d_sae} features on {len(problems)} held-out problems"
        write_html(feature_dashboard(freq, profile, top, chosen, title), out / f"dashboard_{sae_id}.html")
    pd.concat(profiles, ignore_index=True).to_parquet(out / "position_profile.parquet", index=False)
    pd.concat(examples, ignore_index=True).to_parquet(out / "top_examples.parquet", index=False)

    # Token association of feature interventions (each a unit: resumable).
    questions = [p.question for p in problems]
    ranked = table.sort_values(["sae_id", "frequency"], ascending=[True, False], kind="stable")
    units = [
        (i, int(f)) for i, group in ranked.groupby("sae_id", sort=False) for f in group["feature"][: args.intervene]
    ]
    token_store = ResultStore(out / "token_association", settings, overwrite=args.overwrite)
    eos = model.codi_tokens.eos

    def answers(sae_id: str, fwd_hooks) -> list[list[str]]:
        with attached(model, [saes[sae_id]], use_error_term=True):
            result = model.run_codi(
                questions, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens, fwd_hooks=fwd_hooks
            )
        return answer_tokens_as_text(model.tokenizer, result.answer_tokens, eos)

    references: dict[str, list[list[str]]] = {}

    def associate(batch: list[tuple[str, int]]) -> pd.DataFrame:
        frames = []
        for sae_id, feature in batch:
            if sae_id not in references:
                references[sae_id] = answers(sae_id, [])
            largest = float(
                table[(table["sae_id"] == sae_id) & (table["feature"] == feature)]["max_activation"].iloc[0]
            )
            value = args.clamp_scale * largest if args.intervention == "clamp" else 0.0
            edited = answers(sae_id, feature_edit(saes[sae_id], [feature], args.intervention, value))
            frame = token_association(references[sae_id], edited)
            changed = sum(a != b for a, b in zip(references[sae_id], edited))
            frames.append(
                frame.assign(
                    **{UNIT_COLUMN: f"{sae_id}/{feature}"}, sae_id=sae_id, feature=feature, value=value,
                    answers_changed=changed,
                )
            )  # fmt: skip
        return pd.concat(frames, ignore_index=True)

    tokens = token_store.run(units, associate, unit_id=lambda u: f"{u[0]}/{u[1]}", batch_size=1, desc="interventions")
    token_store.finish(tokens)

    summary = {
        "n_saes": len(saes),
        "n_problems": len(problems),
        "features_active": {i: int((g["frequency"] > 0).sum()) for i, g in table.groupby("sae_id")},
        "interventions": {
            f"{r.sae_id}/{r.feature}": {
                "answers_changed": int(r.answers_changed),
                "significant_tokens": int(r.significant),
            }
            for r in tokens.groupby(["sae_id", "feature"], as_index=False)
            .agg(answers_changed=("answers_changed", "first"), significant=("significant", "sum"))
            .itertuples()
        }
        if len(tokens)
        else {},
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    store.finish(table.drop(columns=UNIT_COLUMN), summary)
    print(f"wrote feature tables and {len(saes)} dashboards to {out}")
    return summary


if __name__ == "__main__":
    run_main(main)
