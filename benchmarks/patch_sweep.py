"""Speed of a layer x thought-position patching sweep: one full run per cell against branching.

    python -m benchmarks.patch_sweep [--pairs 8] [--repeats 1] [--quick] [--device cpu] [--dtype float32]

Model: the benchmark model (``benchmarks.common``: LLaMA-3.2-1B's 16 layers, 32/8 heads and
128,259-token vocabulary at d_model 512, random weights), on ``--pairs`` minimal pairs from the
synthetic test split with each clean answer teacher-forced as CODI writes it. Cells: ``resid_post``
of every layer at BOT, thoughts 1..6 and EOT (16 x 8 = 128 per pair). Both ways compute, for every
(pair, cell), the corrupted run's logits at the answer number with the clean activation patched in.

- ``naive``: one whole teacher-forced run (question, latent loop, answer) per pair and cell, with
  that cell's hooks (``logits_at_answer`` on one question), as a loop over cells and problems does
  (past work also generated the answer text every time, which costs more);
- ``library``: ``codi_lens.patching.patched_logits``: the corrupted run once, every cell branching off
  it at its own step (a cell at thought 4 reuses the KV cache of question, BOT and thoughts 1..3),
  cells of one step batched together, the unembedding only at the answer row.

The clean run (``prepare_pairs``) is shared and not timed. Prints each way's time and, last,
``speedup <naive / library>x max_abs_diff <largest logit difference>``; exits 1 if that difference
passes 1e-4. ``--quick``: 4 layers, 2 pairs. Timings are wall-clock in one run on this machine.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_device_args, bench_model, bench_pairs, best_time, describe
from codi_lens.metrics import logits_at_answer
from codi_lens.patching import patch_hooks, patched_logits, prepare_pairs, sweep_sites

TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of each way (the best is kept)")
    parser.add_argument("--quick", action="store_true", help="4 layers, 2 pairs")
    add_device_args(parser)
    args = parser.parse_args(argv)
    model = bench_model(args, n_layers=4 if args.quick else None)
    n_pairs = 2 if args.quick else args.pairs
    positions = ["bot", *[f"thought:{k}" for k in range(1, 7)], "eot"]
    cells = sweep_sites(model.cfg.n_layers, positions=positions)
    hooks = sorted({c.hook for c in cells})
    batch, kept, skipped = prepare_pairs(model, bench_pairs(n_pairs), hooks, answer_from="gold")
    if len(skipped):
        raise SystemExit(f"{len(skipped)} pairs were skipped: {skipped['reason'].tolist()}")
    questions = kept["corrupted_question"].tolist()

    def naive() -> list[torch.Tensor]:
        per_cell = []
        for cell in cells:
            rows = [
                logits_at_answer(
                    model,
                    questions[i : i + 1],
                    batch.clean_numbers[i : i + 1],
                    fwd_hooks=patch_hooks(model, cell, batch, [i]),
                )
                for i in range(len(questions))
            ]
            per_cell.append(torch.cat(rows))
        return per_cell

    def library() -> list[torch.Tensor]:
        return patched_logits(model, batch, questions, cells)

    naive_s, naive_out = best_time(naive, args.repeats)
    library_s, library_out = best_time(library, args.repeats)
    difference = max(float((a - b).abs().max()) for a, b in zip(naive_out, library_out))
    runs = len(cells) * len(questions)
    print(f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocabulary {model.cfg.d_vocab}; {describe(args)}")
    print(f"{len(questions)} pairs x {len(cells)} cells = {runs} patched runs")
    print(f"naive    {naive_s:8.2f} s  ({1000 * naive_s / runs:.1f} ms per patched run)")
    print(f"library  {library_s:8.2f} s  ({1000 * library_s / runs:.1f} ms per patched run)")
    ratio = naive_s / library_s
    print(f"speedup {ratio:.1f}x max_abs_diff {difference:.2e}")
    if difference > TOLERANCE:
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
