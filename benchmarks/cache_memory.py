"""Peak memory of ``run_codi_with_cache`` for a 256-token answer on the LLaMA-3.2-1B shape.

    python -m benchmarks.cache_memory [--max-new-tokens 256] [--limit-gb G] [--quick] [--device cpu] [--dtype float32]

Two ways of caching every hook of a CODI run, each in a fresh process so each peak is its own:

- ``naive``, what codi_lens did before: a recording hook keeps every chunk's activation whole
  (rotated keys, which cover every cached position, included) and the chunks are joined at the end.
  Memory grows with the square of the sequence length through the rotated keys, and on the CPU the
  thousands of small long-lived tensors keep glibc from giving back the pages of each step's freed
  temporaries, which costs far more.
- ``library``: ``run_codi_with_cache``, which writes each chunk into one whole-sequence buffer per
  hook (see ``codi_lens.core.recording``).

Both run a random-weight model with the 1B layout (16 layers, d_model 2048, GQA 32/8, vocabulary
128,259) in float32 on the CPU, for one question and ``--max-new-tokens`` generated tokens (random
weights seldom stop early; the answer length is printed), under ``torch.no_grad``. The script checks
that both caches' rotated keys agree and prints each peak resident memory during the run (sampled
every 5 ms; the model's own memory shown apart) and, last, ``memory_ratio <naive / library>`` of the
runs' own memory (the peak less the model's). A run whose memory passes ``--limit-gb`` (default: 80%
of this machine's memory) stops itself and is reported as exceeding it; the ratio is then a lower
bound (``memory_ratio >= R``). ``--quick`` uses 4 layers and 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import DTYPES, PeakSampler, add_device_args, machine_gb, random_1b_shape_model, resident_gb
from codi_lens.core.names import position_axis, spans_every_cached_position

QUESTION = "Ava has 16 coins. On Monday Ava buys 4 more. On Tuesday Ava keeps half of them. How many now?"


def stitch_chunks(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The old way's join of one hook's per-chunk tensors (in chunk order) into one tensor."""
    axis = position_axis(name)
    if axis is None:
        return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)
    if axis == 2:  # attention: widen keys to the full length, then join queries
        total = parts[-1].shape[-1]
        fill = float("-inf") if name.endswith("hook_attn_scores") else 0.0
        return torch.cat([F.pad(p, (0, total - p.shape[-1]), value=fill) for p in parts], dim=2)
    return torch.cat(parts, dim=1)


def measure(
    mode: str, n_layers: int | None, max_new_tokens: int, limit_gb: float, device: str = "cpu", dtype: str = "float32"
) -> dict:
    """Run one way in this process; returns the peak memory during the run (the model's own memory
    included: resident memory on the CPU, allocated device memory on CUDA) and a checksum of the
    stitched rotated keys."""
    model = random_1b_shape_model(n_layers, device=device, dtype=DTYPES[dtype])
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**30
    else:
        before = resident_gb()
        sampler = PeakSampler(limit_gb)
        sampler.start()
    start = time.perf_counter()
    if mode == "library":
        result, cache = model.run_codi_with_cache([QUESTION], max_new_tokens=max_new_tokens)
        rot_k = cache["blocks.0.attn.hook_rot_k"]
    else:  # the old way: keep every chunk's activation whole; trim rotated keys only when stitching
        stored: dict[str, dict[int, torch.Tensor]] = {}

        def record(acts, hook):  # one entry per chunk (or step), the last firing wins, as before
            chunks = stored.setdefault(hook.name, {})
            key = model.chunk_context.start if position_axis(hook.name) is not None else len(chunks)
            chunks[key] = acts.detach()

        result = model.run_codi(
            [QUESTION], max_new_tokens=max_new_tokens, fwd_hooks=[(n, record) for n in model.hook_names_of_run()]
        )
        cache = {}
        for name, chunks in stored.items():  # stitch as before: rotated keys are cut only now
            parts = [v for _, v in sorted(chunks.items())]
            if spans_every_cached_position(name):
                parts = [parts[0]] + [p[:, -1:] for p in parts[1:]]
            cache[name] = stitch_chunks(name, parts)
        rot_k = cache["blocks.0.attn.hook_rot_k"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else sampler.stop()
    return {
        "mode": mode,
        "peak_rss_gb": peak,
        "model_rss_gb": before,
        "seconds": time.perf_counter() - start,
        "answer_tokens": len(result.answer_tokens[0]),
        "rot_k_sum": float(rot_k.double().sum()),
        "rot_k_positions": rot_k.shape[1],
    }


def run_child(mode: str, layers: int | None, tokens: int, limit_gb: float, device: str, dtype: str) -> dict:
    """One way in a fresh process; its report, or ``{"exceeded_gb": ...}`` when it passed the limit."""
    command = [sys.executable, "-m", "benchmarks.cache_memory", "--child", mode, "--max-new-tokens", str(tokens)]
    command += ["--device", device, "--dtype", dtype]
    command += ["--limit-gb", str(limit_gb)] + (["--layers", str(layers)] if layers else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"the {mode} run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit-gb", type=float, default=round(0.8 * machine_gb(), 1))
    parser.add_argument("--quick", action="store_true", help="4 layers, 32 tokens (a CI-sized check)")
    parser.add_argument("--child", choices=["naive", "library"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_grad_enabled(False)
        print(json.dumps(measure(args.child, args.layers, args.max_new_tokens, args.limit_gb, args.device, args.dtype)))
        return
    layers = 4 if args.quick else None
    tokens = 32 if args.quick else args.max_new_tokens
    print(f"{layers or 16} layers, {tokens} new tokens, {args.dtype}, {args.device}, limit {args.limit_gb} GB")
    reports = {
        mode: run_child(mode, layers, tokens, args.limit_gb, args.device, args.dtype) for mode in ("naive", "library")
    }
    for mode, r in reports.items():
        if "exceeded_gb" in r:
            print(f"{mode:8s} passed the {r['exceeded_gb']} GB limit and was stopped")
            continue
        print(
            f"{mode:8s} peak {r['peak_rss_gb']:.2f} GB, model alone {r['model_rss_gb']:.2f} GB, "
            f"the run's own {r['peak_rss_gb'] - r['model_rss_gb']:.2f} GB; "
            f"{r['answer_tokens']} answer tokens, {r['rot_k_positions']} positions, {r['seconds']:.0f} s"
        )
    naive, library = reports["naive"], reports["library"]
    if "exceeded_gb" in library:
        raise SystemExit("the library run passed the memory limit")
    library_own = library["peak_rss_gb"] - library["model_rss_gb"]
    if "exceeded_gb" in naive:  # a lower bound: the naive run needed more than the limit
        print(f"memory_ratio >= {(naive['exceeded_gb'] - library['model_rss_gb']) / library_own:.1f}")
        return
    print(f"rotated keys agree: |sum difference| {abs(naive['rot_k_sum'] - library['rot_k_sum']):.3g}")
    print(f"memory_ratio {(naive['peak_rss_gb'] - naive['model_rss_gb']) / library_own:.2f}")


if __name__ == "__main__":
    main()
