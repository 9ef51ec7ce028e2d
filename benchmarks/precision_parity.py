"""bfloat16 against float32 on the shipped model: do the thoughts and the answers survive half precision?

    python -m benchmarks.precision_parity [--limit 300] [--batch-size 50] [--device cpu]

Loads ``toy-arith`` twice, in float32 and in bfloat16, on ``--device``, runs the CODI loop (greedy,
upstream's 256-token budget) on the first ``--limit`` problems of its test split, and prints:

- the cosine between the bf16 and fp32 latent states (BOT and every thought), per position
  (minimum and mean over problems): bf16 rounds every activation to 8 bits of mantissa, and the
  loop feeds each rounded thought back in, so the error can grow along the chain;
- the answer agreement rate (same extracted prediction) with its 95% bootstrap CI over problems, and
  both accuracies.

The fp32 run is the reference. ``tests/test_parity.py`` checks the same figures on CPU against the
tolerances stated there; the figures measured on each device are in ``checkpoints.md``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from codi_lens import load_pretrained
from codi_lens.core.answers import is_correct
from codi_lens.data import Problem, load_problems
from codi_lens.stats import bootstrap_ci


def run(problems: list[Problem], dtype: torch.dtype, device: str, batch_size: int):
    """Latent states ``[n, 1 + n_latents, d_model]`` (fp32 copies) and predictions of every problem."""
    model = load_pretrained("toy-arith", dtype=dtype, device=device)
    latents, predictions = [], []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        result = model.run_codi([p.question for p in batch])
        latents.append(result.latent_states.float().cpu())
        predictions += result.prediction
    return torch.cat(latents), predictions


def precision_parity(problems: list[Problem], device: str = "cpu", batch_size: int = 50) -> tuple[pd.DataFrame, dict]:
    """Per-position cosine table (``position``: 0 = BOT, k = thought k; ``min_cos``, ``mean_cos``) and a
    summary (answer agreement with CI, accuracies, wall times)."""
    tick = time.perf_counter()
    fp32_latents, fp32_pred = run(problems, torch.float32, device, batch_size)
    fp32_s = time.perf_counter() - tick
    tick = time.perf_counter()
    bf16_latents, bf16_pred = run(problems, torch.bfloat16, device, batch_size)
    bf16_s = time.perf_counter() - tick
    cos = F.cosine_similarity(fp32_latents, bf16_latents, dim=-1)  # [n, positions]
    table = pd.DataFrame(
        {
            "position": range(cos.shape[1]),
            "min_cos": cos.min(dim=0).values.numpy(),
            "mean_cos": cos.mean(dim=0).numpy(),
        }
    )
    agree = np.array([a == b for a, b in zip(fp32_pred, bf16_pred)], dtype=float)
    _, low, high = bootstrap_ci(agree)
    summary = {
        "n_problems": len(problems),
        "device": device,
        "answer_agreement": float(agree.mean()),
        "answer_agreement_ci95": [low, high],
        "accuracy_fp32": float(np.mean([is_correct(p, q.gold) for p, q in zip(fp32_pred, problems)])),
        "accuracy_bf16": float(np.mean([is_correct(p, q.gold) for p, q in zip(bf16_pred, problems)])),
        "min_latent_cos": float(cos.min()),
        "fp32_seconds": round(fp32_s, 1),
        "bf16_seconds": round(bf16_s, 1),
    }
    return table, summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    table, summary = precision_parity(load_problems("toy:test", limit=args.limit), args.device, args.batch_size)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.5f}"))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
