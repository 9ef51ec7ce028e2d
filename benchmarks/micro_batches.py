"""Training-step speed with length-grouped micro-batches (``TrainConfig.micro_batches``) vs one padded batch.

    python -m benchmarks.micro_batches [--steps 16] [--splits 2 3] [--device cpu] [--dtype float32]

Builds the shipped toy model's architecture (``codi_lens.training.MODEL_SHAPE``) on the
shipped data, and times the same training steps from the same initial weights with the batch
padded as one (the naive way) and cut into length-sorted micro-batches, interleaved step by step
in this process. Prints seconds per step, the share of teacher tokens that are padding, and the
speed ratio.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_device_args, best_time
from codi_lens.data.synthetic import SHIPPED_SPLITS as DATA
from codi_lens.data.synthetic import build_tokenizer, make_splits
from codi_lens.training.config import TrainConfig
from codi_lens.training.module import CODIModule, add_codi_tokens, build_llama_lm
from codi_lens.training.recipes import MODEL_SHAPE
from codi_lens.training.trainer import Trainer


def make_trainer(splits: int, problems, tokenizer, device: str, dtype: str) -> Trainer:
    lm = build_llama_lm(len(tokenizer), seed=0, **MODEL_SHAPE)
    base_vocab = add_codi_tokens(lm)
    cfg = TrainConfig(micro_batches=splits, device=device, dtype=dtype)
    return Trainer(CODIModule(lm, cfg.prj_dim), tokenizer, base_vocab, cfg, problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--splits", type=int, nargs="+", default=[2, 3])
    add_device_args(parser)
    args = parser.parse_args()
    problems = make_splits(**DATA)["train"]
    tokenizer = build_tokenizer()
    torch.set_num_threads(TrainConfig().threads)
    trainers = {n: make_trainer(n, problems, tokenizer, args.device, args.dtype) for n in [1, *args.splits]}
    seconds = dict.fromkeys(trainers, 0.0)
    for trainer in trainers.values():
        trainer.train_step()  # warm-up
    # Interleave the variants step by step, so drifts in machine speed hit all of them alike.
    for _ in range(args.steps):
        for n, trainer in trainers.items():
            step_seconds, _ = best_time(trainer.train_step)
            seconds[n] += step_seconds
    for n, trainer in trainers.items():
        padding = [1 - b.teacher_mask.sum().item() / b.teacher_mask.numel() for b, _ in trainer.micro_batches(1)]
        print(
            f"micro_batches={n}: {seconds[n] / args.steps:.3f} s/step, teacher padding "
            f"{100 * sum(padding) / len(padding):.0f}%, speed-up vs one padded batch {seconds[1] / seconds[n]:.2f}x"
        )


if __name__ == "__main__":
    main()
