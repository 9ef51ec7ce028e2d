"""Speed of a layer x position patching sweep: one forward per cell against cells batched with a shared prompt.

    python -m benchmarks.patching_sweep [--pairs 32] [--cells-per-forward 8] [--quick]

Both ways compute the same table (checked to 1e-5) on the shipped model's pairs (``toy:test``):
the clean runs once, then for every cell (``resid_post`` of each layer at each default position,
layer-only cells, fed thoughts) the corrupted run's logits at the answer number.

- ``naive``: one teacher-forced run per cell (``score_answers`` with that cell's hooks), the question
  recomputed every time;
- ``library``: ``codi_lens.patching.cell_logits``: ``--cells-per-forward`` cells as blocks of one batch,
  and the question + BOT chunk computed once for every cell that patches later (thoughts, EOT).

Prints each way's wall time and, last, ``speedup <naive / library>``. Timings are wall-clock on this
machine, measured in the same run; compare only the ratio across machines.
"""

from __future__ import annotations

import argparse
import time

import torch

from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.metrics import logits_at_answer
from codi_lens.pairs import make_pairs
from codi_lens.patching import cell_hooks, cell_logits, prepare_pairs, sweep_cells


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32, help="pairs in the batch")
    parser.add_argument("--cells-per-forward", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each way (the best is kept)")
    parser.add_argument("--quick", action="store_true", help="8 pairs, 1 repeat")
    args = parser.parse_args(argv)
    n_pairs, repeats = (8, 1) if args.quick else (args.pairs, args.repeats)

    model = load_codi("toy-arith")
    pairs, _ = make_pairs(load_problems("toy:test", limit=4 * n_pairs), max_value=40)
    cells = sweep_cells(model.cfg.n_layers, kinds=("resid_post", "thought_input"), layer_only=True)
    hooks = sorted({c.hook for c in cells if c.kind != "thought_input"})
    batch, kept, _ = prepare_pairs(model, pairs.head(n_pairs), hooks, max_new_tokens=24)
    questions = kept["corrupted_question"].tolist()

    def naive() -> list[torch.Tensor]:
        return [
            logits_at_answer(model, questions, batch.clean_numbers, fwd_hooks=cell_hooks(model, cell, batch))
            for cell in cells
        ]

    def library() -> list[torch.Tensor]:
        return cell_logits(model, batch, questions, cells, cells_per_forward=args.cells_per_forward)

    timings, outputs = {}, {}
    for name, way in (("naive", naive), ("library", library)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outputs[name] = way()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    difference = max(float((a - b).abs().max()) for a, b in zip(outputs["naive"], outputs["library"]))
    print(f"{len(kept)} pairs x {len(cells)} cells on toy-arith, float32, CPU, {torch.get_num_threads()} threads")
    print(f"naive    {timings['naive']:.2f} s  (one forward per cell)")
    print(f"library  {timings['library']:.2f} s  ({args.cells_per_forward} cells per forward, shared prompt)")
    print(f"largest logit difference between the two: {difference:.2e}")
    if difference > 1e-5:
        raise SystemExit("the two ways disagree")
    ratio = timings["naive"] / timings["library"]
    print(f"speedup {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
