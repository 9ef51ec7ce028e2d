"""Peak memory of step importance on 64 against 512 problems: memory stays flat in the number of problems.

    python -m benchmarks.memory [--small 64] [--large 512] [--max-new-tokens 4] [--quick]
                                [--device cpu] [--dtype float32]

Each size runs in a fresh process: ``codi_lens.importance.step_importance`` (zero-ablation of each
thought alone and cumulatively, 12 ablations, batches of 32 problems, results streamed batch by
batch into a resumable store on disk) on the benchmark model (``benchmarks.common``), with the
process's resident memory sampled every 5 ms. Prints each run's peak (and the model's own share)
and, last, ``memory_ratio <peak(large) / peak(small)>`` (1.2 or less is the target). ``--quick``: 2
layers, 32 against 64 problems.
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
    rows = zero_step_importance(model, problems, args.max_new_tokens)
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
    parser.add_argument("--quick", action="store_true", help="2 layers, 32 against 64 problems")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_grad_enabled(False)
        print(json.dumps(measure(args)))
        return None
    layers = 2 if args.quick else None
    sizes = (32, 64) if args.quick else (args.small, args.large)
    reports = {n: run_child(n, args, layers) for n in sizes}
    print(f"{layers or 16} layers, d_model 512, {args.max_new_tokens} new tokens, {args.dtype}, {args.device}")
    for n, r in reports.items():
        print(
            f"{n:5d} problems: peak {r['peak_gb']:.2f} GB (model {r['model_gb']:.2f} GB, the run's own "
            f"{r['peak_gb'] - r['model_gb']:.2f} GB), {r['rows']} rows, {r['seconds']:.0f} s"
        )
    small, large = (reports[n] for n in sizes)
    ratio = large["peak_gb"] / small["peak_gb"]
    print(f"memory_ratio {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
