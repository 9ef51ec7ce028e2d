"""Peak memory of step importance on 64 against 512 problems: memory stays flat in the number of problems.

    python -m benchmarks.memory [--small 64] [--large 512] [--max-new-tokens 4] [--quick]
                                [--device cpu] [--dtype float32]

Each size runs in a fresh process: ``codi_lens.importance.step_importance`` (zero-ablation of each
thought alone and cumulatively, 12 ablations, batches of 32 problems, results streamed batch by
batch into a resumable store on disk) on the benchmark model (``benchmarks.common``), with the
process's resident memory sampled every 5 ms. Prints each run's peak (and the model's own share)
and, last, ``memory_ratio <peak(large) / peak(small)> run_ratio <R>``, R the same ratio of each run's
own memory (its peak less the model's, where something kept per problem shows undiluted by the
model's weights); it exits 1 when the memory ratio passes
``--max-ratio`` (1.2, the target). ``--quick``: 2 layers, batches of 4 problems, 16 against 64
problems (4 against 16 batches: past the first few batches, where the allocator's pool grows, a run
that kept anything per problem would show here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks.common import (
    PeakSampler,
    add_device_args,
    bench_model,
    bench_problems,
    machine_gb,
    resident_gb,
    zero_step_importance,
)


def measure(args: argparse.Namespace) -> dict:
    model = bench_model(args, n_layers=args.layers)
    problems = bench_problems(args.child)
    before = resident_gb()
    sampler = PeakSampler(0.8 * machine_gb())
    sampler.start()
    start = time.perf_counter()
    rows = zero_step_importance(model, problems, args.max_new_tokens, batch_size=args.batch_size)
    peak = sampler.stop()
    return {"peak_gb": peak, "model_gb": before, "rows": len(rows), "seconds": time.perf_counter() - start}


def run_child(n: int, args: argparse.Namespace, layers: int | None) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--child",
        str(n),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
    ]
    command += ["--device", args.device, "--dtype", args.dtype] + (["--layers", str(layers)] if layers else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {n}-problem run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="problems per batch (default 32)")
    parser.add_argument("--max-ratio", type=float, default=1.2, help="exit 1 above this ratio (default 1.2)")
    parser.add_argument("--quick", action="store_true", help="2 layers, batches of 4, 16 against 64 problems")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_grad_enabled(False)
        print(json.dumps(measure(args)))
        return None
    layers = 2 if args.quick else None
    if args.quick:
        args.batch_size = 4
    sizes = (16, 64) if args.quick else (args.small, args.large)
    reports = {n: run_child(n, args, layers) for n in sizes}
    print(
        f"{layers or 16} layers, d_model 512, {args.max_new_tokens} new tokens, batches of {args.batch_size}, "
        f"{args.dtype}, {args.device}"
    )
    for n, r in reports.items():
        print(
            f"{n:5d} problems: peak {r['peak_gb']:.2f} GB (model {r['model_gb']:.2f} GB, the run's own "
            f"{r['peak_gb'] - r['model_gb']:.2f} GB), {r['rows']} rows, {r['seconds']:.0f} s"
        )
    small, large = (reports[n] for n in sizes)
    ratio = large["peak_gb"] / small["peak_gb"]
    own = (large["peak_gb"] - large["model_gb"]) / (small["peak_gb"] - small["model_gb"])
    print(f"memory_ratio {ratio:.2f} run_ratio {own:.2f}")
    if ratio > args.max_ratio:
        print(f"peak memory grew {ratio:.2f}x with the number of problems (limit {args.max_ratio})", file=sys.stderr)
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
