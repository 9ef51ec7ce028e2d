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
Fisher exact p-values and Benjamini-Hochberg q-values (``codi_lens.features.token_association``: token counts,
not only presence, and the ``|log-odds| > 0.5`` flag); ``--intervene-features causal`` intervenes on the
features ``experiments.feature_screen`` selected instead (``--screen``: its folder); and each
intervention's change in the log-probability of the plain run's whole answer number (every token of it,
teacher-forced: ``logprob_change`` in nats, with a 95% bootstrap CI over problems).

Writes to ``--out`` (default ``results/sae_features``): ``run.json``, ``parts/``, ``results.parquet``
(one row per SAE x feature: ``sae_id, site, feature, frequency, mean_when_active, max_activation``),
``position_profile.parquet``, ``top_examples.parquet``, ``token_association/results.parquet`` (one row per
SAE x feature x token, the feature's ``logprob_change``, ``logprob_change_low``/``_high`` and ``n_scored`` on
each), ``summary.json`` and ``dashboard_<sae_id>.html``. Resumable after a kill.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from codi_lens.core.errors import FlagError
from codi_lens.feature_screen import named_features
from codi_lens.features import feature_interventions, survey_features
from codi_lens.reports.saes import features_summary, write_feature_browser
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run
from codi_lens.run.store import UNIT_COLUMN
from codi_lens.saes import SAEError, load_saes, sae_site
from codi_lens.saes.ids import audit_feature_ids, parse_feature_id, saes_by_site


def chosen_features(text: str | None, screen: str, saes: dict) -> list[tuple[str, int]] | None:
    """``--intervene-features`` as ``(sae_id, feature)`` pairs (None: the most frequent ones)."""
    if text is None:
        return None
    saes_by_site(saes)  # a feature id names a site: two SAEs at one site are refused by name
    try:
        ids = named_features(text, screen)
    except SAEError as error:
        raise FlagError(f"--intervene-features: {error}") from None
    orphans = audit_feature_ids({"--intervene-features": pd.DataFrame({"feature_id": ids})}, saes)
    if len(orphans):
        raise FlagError(f"--intervene-features: {orphans.iloc[0]['feature_id']}: {orphans.iloc[0]['reason']}")
    by_site = {sae_site(s).id: sae_id for sae_id, s in saes.items()}
    return [(by_site[site.id], feature) for site, feature in map(parse_feature_id, ids)]


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__, out="results/sae_features", batch_size=100, limit=500)
    parser.add_argument("--saes", default="results/train_saes", help="folder of SAELens folders (train_saes --out)")
    parser.add_argument("--sae-ids", default=None, help="comma-separated SAE ids (default: all)")
    parser.add_argument("--top-features", type=int, default=20, help="features with examples in the browser")
    parser.add_argument("--top-k", type=int, default=10, help="top-activating problems per feature")
    parser.add_argument("--intervene", type=int, default=5, help="features per SAE whose intervention is tested")
    parser.add_argument(
        "--intervene-features",
        default=None,
        help="'causal' (the screen's selection, read from --screen), 'strongest:N' (per site) or feature ids "
        "site/f,... instead of the --intervene most frequent",
    )
    parser.add_argument("--screen", default="results/feature_screen", help="feature_screen --out, for causal")
    parser.add_argument("--intervention", choices=["clamp", "ablate"], default="clamp")
    parser.add_argument("--clamp-scale", type=float, default=10.0, help="clamp to this times the largest activation")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parse_common_args(parser, argv)
    ids = [i.strip() for i in args.sae_ids.split(",")] if args.sae_ids else None
    run = start_run(args)
    problems = run.problems()
    saes = load_saes(args.saes, ids, device=args.device)  # an empty or wrong folder is named before the model loads
    chosen = chosen_features(args.intervene_features, args.screen, saes)
    settings = run.settings(
        saes={i: str(Path(args.saes)) for i in saes},
        intervention=args.intervention,
        intervene=args.intervene,
        intervene_features=chosen,
        clamp_scale=args.clamp_scale,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
    )
    survey, store = survey_features(
        run.model,
        saes,
        problems,
        run.out,
        n_latents=args.n_latents,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
        executor=run.executor,
    )
    write_feature_browser(
        saes, survey, problems, run.out, top_features=args.top_features, top_k=args.top_k, n_latents=args.n_latents
    )
    tokens = feature_interventions(
        run.model,
        saes,
        problems,
        survey,
        run.out / "token_association",
        intervene=args.intervene,
        features=chosen,
        op=args.intervention,
        clamp_scale=args.clamp_scale,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        settings=settings,
        overwrite=args.overwrite,
    )
    summary = {"n_saes": len(saes), "n_problems": len(problems), **features_summary(survey, tokens)}
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(survey.table.drop(columns=UNIT_COLUMN), summary)
    print(f"wrote feature tables and {len(saes)} dashboards to {run.out}")
    return summary


if __name__ == "__main__":
    run_main(main)
