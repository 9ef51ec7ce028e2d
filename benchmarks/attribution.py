"""Attribution patching through the unrolled loop against the exact sweep: time and rank agreement.

    python -m benchmarks.attribution [--model bench|toy] [--pairs 8] [--kinds resid_post] [--rounds 3] [--quick]
                                     [--device cpu] [--dtype float32]

- ``--model bench`` (default): the benchmark model (``benchmarks.common``; LLaMA-3.2-1B's layers, heads
  and vocabulary at d_model 512, random weights), pairs from the synthetic test split with the clean
  answer teacher-forced as CODI writes it; cells: ``resid_post`` of every layer at BOT, thoughts 1..6
  and EOT (16 x 8 = 128; ``--kinds resid_post,attn_out,mlp_out`` makes it 384).
- ``--model toy``: the shipped model on pairs it answers right; cells: ``resid_post``, ``attn_out``
  and ``mlp_out`` of both layers at the changed number, the last question token, BOT, thoughts 1..6
  and EOT, and the six fed thoughts (66).

Both ways start from the same clean run (``prepare_pairs``, not timed):

- ``exact``: ``codi_lens.patching.patched_logits`` (every cell patched, branching off the corrupted run);
- ``attribution``: ``codi_lens.patching.site_attributions``: one corrupted forward with autograd and
  one backward pass give ``(a_clean - a_corrupted) . dLD/da`` for every cell.

The two ways are timed ``--rounds`` times, alternating (a machine that slows down or speeds up during the
run weighs on both alike), and their medians compared. Each cell's recovery is averaged over pairs; the two
rankings are compared with Spearman's rho and the overlap of their top 10 cells
(``codi_lens.patching.rank_agreement``). Then (on a CPU) one more attribution call under ``torch.profiler``
says where its time goes (``benchmarks.roofline.seconds_by_kind``), and ``bound <B>x`` is the exact sweep's
median time over the attribution's matrix multiplies alone: the speedup attribution would have if everything
else it does took no time. Prints, last, ``speedup <exact / attribution>x spearman <S> top10_overlap <O>``
(the ratio of the medians). ``--quick``: 4 layers, 2 pairs, one round.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from benchmarks.common import add_device_args, alternating_medians, bench_model, bench_pairs, describe
from benchmarks.roofline import seconds_by_kind
from codi_lens import load_codi
from codi_lens.metrics import logit_difference, normalised_recovery
from codi_lens.patching import patched_logits, prepare_pairs, rank_agreement, site_attributions, sweep_sites


def recovery_table(cells, lds: list[torch.Tensor], batch) -> pd.DataFrame:
    """Per (cell, pair) recovery, in ``patch_rows``' columns (pairs without a changed-token match dropped)."""
    frames = []
    for cell, ld in zip(cells, lds):
        rows = [i for i in range(len(ld)) if cell.position != "changed" or batch.changed_tokens[i] is not None]
        frames.append(
            pd.DataFrame(
                {
                    "hook": cell.hook,
                    "head": cell.head,
                    "position": cell.position,
                    "recovery": normalised_recovery(ld[rows], batch.ld_corrupted[rows], batch.ld_clean[rows]),
                    "reason": "",
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bench", "toy"], default="bench")
    parser.add_argument("--pairs", type=int, default=None, help="default: 8 (bench), 32 (toy)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, the two ways alternating (medians kept)")
    parser.add_argument(
        "--kinds",
        default="resid_post",
        help="hook kinds of the bench model's cells, comma-separated (default resid_post)",
    )
    parser.add_argument("--quick", action="store_true", help="4 layers (bench), 2 pairs")
    add_device_args(parser)
    args = parser.parse_args(argv)
    n_pairs = 2 if args.quick else (args.pairs or (8 if args.model == "bench" else 32))
    rounds = 1 if args.quick else args.rounds
    if args.model == "bench":
        model = bench_model(args, n_layers=4 if args.quick else None)
        positions = ["bot", *[f"thought:{k}" for k in range(1, 7)], "eot"]
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        cells = sweep_sites(model.cfg.n_layers, positions=positions, kinds=kinds)
        pairs, answer_from = bench_pairs(n_pairs), "gold"
    else:
        model = load_codi("toy-arith", device=args.device, dtype=getattr(torch, args.dtype))
        cells = sweep_sites(model.cfg.n_layers, kinds=("resid_post", "attn_out", "mlp_out", "thought_input"))
        pairs, answer_from = bench_pairs(3 * n_pairs), "model"
    hooks = sorted({c.hook for c in cells if c.kind != "thought_input"})
    batch, kept, _ = prepare_pairs(model, pairs, hooks, answer_from=answer_from, max_new_tokens=24)
    if batch is None:
        raise SystemExit("no usable pairs")
    if len(kept) > n_pairs:
        batch, kept, _ = prepare_pairs(model, kept.head(n_pairs), hooks, answer_from=answer_from, max_new_tokens=24)
    questions = kept["corrupted_question"].tolist()
    clean_tok = batch.clean_tokens

    def exact() -> list[torch.Tensor]:
        return [
            logit_difference(x, clean_tok, batch.corrupted_tokens)
            for x in patched_logits(model, batch, questions, cells)
        ]

    def attribution() -> list[torch.Tensor]:
        estimates = site_attributions(model, batch, questions, cells)
        return [batch.ld_corrupted + e.detach().float().cpu() for e in estimates]

    medians, times, results = alternating_medians({"exact": exact, "attribution": attribution}, rounds)
    exact_s, attribution_s = medians["exact"], medians["attribution"]
    exact_ld, attribution_ld = results["exact"], results["attribution"]
    agreement = rank_agreement(recovery_table(cells, exact_ld, batch), recovery_table(cells, attribution_ld, batch))
    print(f"{args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; {describe(args)}")
    print(f"{len(kept)} pairs x {len(cells)} cells")
    for way, seconds in medians.items():
        print(f"{way:12s} {seconds:8.2f} s median of {', '.join(f'{t:.2f}' for t in times[way])}")
    bound = float("nan")
    if args.device == "cpu":  # the profile times CPU work only; a GPU's kernels run outside it
        seconds, wall = seconds_by_kind(attribution)
        for kind, spent in seconds.items():
            print(f"attribution: {spent:6.3f} s {spent / wall:6.1%}  {kind}")
        bound = exact_s / seconds["matrix multiplies"]
        print(f"bound {bound:.1f}x (the exact sweep over attribution's matrix multiplies alone)")
    ratio = exact_s / attribution_s
    print(f"speedup {ratio:.1f}x spearman {agreement['spearman']:.2f} top10_overlap {agreement['top_k_overlap']:.2f}")
    return {"speedup": ratio, "bound": bound, **agreement}


if __name__ == "__main__":
    main()
