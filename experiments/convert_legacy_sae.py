"""Convert a folder of earlier CODI SAEs (plain PyTorch files, one per thought) to SAELens folders, and measure
them on held-out thoughts of the loaded model.

    python -m experiments.convert_legacy_sae --legacy DIR --hook thought.{k}.hook_hidden
        [--thought FILE=K,...] [--position-offset 0] [--k K] [--checkpoint ...] [--data ...] [--limit 200] [--out DIR]

Each ``.pt`` / ``.pth`` file of ``--legacy`` holds an encoder/decoder pair (``encoder.weight [d_sae, d_in]``,
``encoder.bias``, ``decoder.weight [d_in, d_sae]``, ``decoder.bias``; or ``{"model_state_dict": ..., "config":
...}``); every missing or misshapen key is named. Which thought a file belongs to: ``--thought FILE=K``, else its
config's ``thought`` / ``position``, else the naming convention ``pos_<p>_...`` (thought ``p +
--position-offset``), else the command asks at the terminal (and refuses, naming the file, when no one is
there). ``--hook``: the hook the SAEs read, with ``{k}`` for a thought hook (``thought.{k}.hook_hidden``) or a
hook with a position axis read at each file's thought (``blocks.15.hook_resid_post``). ``--k``: the top-k of
top-k SAEs (else the config's ``k``; none: ReLU).

The converted SAEs are saved as SAELens folders ``OUT/saes/<sae_id>/`` (what ``experiments.sae_features``,
``feature_screen`` and ``feature_pathways`` read with ``--saes OUT``), and each is evaluated on the thoughts of
the loaded model on ``--data`` (held-out problems): explained variance with its 95% bootstrap CI, L0, dead and
dense fractions, cosine and MSE (``results.parquet``, one row per file; ``summary.json``).
"""

from __future__ import annotations

import sys

import pandas as pd

from codi_lens.core.errors import FlagError
from codi_lens.core.sites import Site
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run
from codi_lens.saes.legacy import evaluate_converted, legacy_files, legacy_sae, legacy_thought, read_legacy_file


def parse_thoughts(text: str | None) -> dict[str, int]:
    """``--thought a.pt=3,b.pt=4``."""
    given = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise FlagError(f"--thought: {item!r} is not FILE=K (K the thought, 0 = BOT)")
        given[name.strip()] = int(value)
    return given


def site_of(hook: str, thought: int) -> Site:
    """The site a file's SAE reads: ``--hook`` with ``{k}`` filled in, or a positional hook at its thought."""
    try:
        return Site(hook.format(k=thought)) if "{k}" in hook else Site.at_thought(hook, thought)
    except ValueError as error:
        raise FlagError(f"--hook {hook}: {error}") from None


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/legacy_saes", limit=200)
    parser.add_argument("--legacy", required=True, help="folder of the earlier SAEs' .pt files")
    parser.add_argument("--hook", required=True, help="thought.{k}.hook_hidden or a hook with a position axis")
    parser.add_argument("--thought", default=None, help="FILE=K,... for files that do not say their thought")
    parser.add_argument("--position-offset", type=int, default=0, help="thought = p + this, for pos_<p>_ files")
    parser.add_argument("--k", type=int, default=None, help="top-k of top-k SAEs (default: the config's, else ReLU)")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)
    given = parse_thoughts(args.thought)
    files = legacy_files(args.legacy)
    unknown = sorted(set(given) - {f.name for f in files})
    if unknown:
        raise FlagError(f"--thought names {unknown[0]}, which is not in --legacy {args.legacy}")
    ask = input if sys.stdin.isatty() else None
    read = {f: read_legacy_file(f) for f in files}
    thoughts = {f: legacy_thought(f, read[f][1], given, position_offset=args.position_offset, ask=ask) for f in files}
    sites = {f: site_of(args.hook, k) for f, k in thoughts.items()}
    saes = {f: legacy_sae(*read[f], f, hook_name=sites[f].hook, thought=thoughts[f], k=args.k) for f in files}
    run = start_run(args)
    run.check_sites(list(sites.values()), "--hook")
    table = evaluate_converted(
        run.model,
        saes,
        sites,
        run.problems(),
        run.out,
        n_latents=args.n_latents,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    table.to_parquet(run.out / "results.parquet", index=False)
    summary = {
        "n_saes": len(table),
        "n_problems": len(run.problems()),
        "per_file": table.set_index("file")[["sae_id", "explained_variance", "l0", "dead_fraction"]].to_dict("index"),
    }
    (run.out / "summary.json").write_text(pd.Series(summary).to_json(indent=2))
    for r in table.itertuples():
        print(
            f"{r.file} -> {r.sae_id}: explained variance {r.explained_variance:.3f} [{r.explained_variance_low:.3f}, "
            f"{r.explained_variance_high:.3f}], L0 {r.l0:.1f}, dead {r.dead_fraction:.1%}"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
