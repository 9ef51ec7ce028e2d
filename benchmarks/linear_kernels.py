"""The CPU's matrix-product kernels on few-row products, against the rate at which the machine reads memory.

    python -m benchmarks.linear_kernels [--d-model 512] [--rows 1,8,40,256] [--pool-mb 256] [--quick]

A step of the latent loop multiplies a few rows (one per example) by every weight of every layer, so on
a CPU it reads all the weights once per step. This benchmark asks whether those products run at the speed
of reading their weights. For each weight shape of the benchmark model's layers (``benchmarks.common``:
LLaMA-3.2-1B's layout at ``--d-model``, ``F.linear``'s ``[out, in]`` layout) it allocates enough copies
to fill ``--pool-mb`` (more than the last-level cache), so that every product reads its weight from
memory, as in a loop step. Per shape and row count, the time per product of:

- ``torch``: ``torch.nn.functional.linear``, what codi_lens, TransformerLens and HF call (MKL on x86
  builds of torch);
- ``onednn``: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, an internal operator of torch) on
  the weight as stored;
- ``onednn_packed``: the same on a copy of the weight reordered once into oneDNN's blocked layout (a second
  copy of every weight: what a model would pay in memory to use it);
- ``read``: ``weight.sum()``: every weight read once, no product: the memory-bound floor.

Printed per shape and row count: microseconds per product, the weight bytes read per second, and each
kernel's largest difference from a float64 product (the weights are Gaussian, entries about 1). Last:
``rows8 torch_gbps <G> read_gbps <R> onednn_packed_over_torch <X>x max_rel_diff <D>`` for the 8-row products
summed over every shape, weighted by how often a layer uses them. ``--quick``: d_model 64, 16 MB, rows 1 and
8, for the test suite (it checks that the kernels agree, not their speed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import describe


def layer_shapes(d_model: int) -> dict[str, tuple[tuple[int, int], int]]:
    """The ``[out, in]`` weight shapes of one layer of the benchmark model's layout, each with how many of
    them a layer multiplies by (32 query heads and 8 key/value heads of ``d_model / 32``; MLP 4 ``d_model``)."""
    kv = d_model // 4
    return {
        "q, o": ((d_model, d_model), 2),
        "k, v": ((kv, d_model), 2),
        "gate, up": ((4 * d_model, d_model), 2),
        "down": ((d_model, 4 * d_model), 1),
    }


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def per_call_seconds(fn: Callable[[Tensor], object], pool: list[Tensor], rounds: int) -> float:
    """The median over ``rounds`` of the time to call ``fn`` once on every weight in ``pool``, per call."""
    for weight in pool:
        fn(weight)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for weight in pool:
            fn(weight)
        times.append((time.perf_counter() - start) / len(pool))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--rows", default="1,8,40,256", help="row counts, comma-separated")
    parser.add_argument("--pool-mb", type=int, default=256, help="megabytes of weights per shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="d_model 64, 16 MB, rows 1 and 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.pool_mb, args.rows, args.rounds = 64, 16, "1,8", 2
    args.device, args.dtype = "cpu", "float32"
    rows_asked = [int(r) for r in args.rows.split(",")]
    if 8 not in rows_asked:
        rows_asked.append(8)
    available = onednn_available()
    kernels = ["torch", "onednn", "onednn_packed", "read"] if available else ["torch", "read"]
    print(f"d_model {args.d_model}, {args.pool_mb} MB of weights per shape; {describe(args)}")
    if not available:
        print("oneDNN's linear is not available in this build of torch: only torch and read are measured")
    generator = torch.Generator().manual_seed(0)
    totals = {kernel: 0.0 for kernel in kernels}  # 8-row seconds per layer, weighted by use
    layer_bytes, worst = 0, 0.0
    for label, ((out_features, in_features), uses) in layer_shapes(args.d_model).items():
        n = max(2, args.pool_mb * 2**20 // (out_features * in_features * 4))
        pool = [torch.randn(out_features, in_features, generator=generator) for _ in range(n)]
        weights = {kernel: pool for kernel in kernels}
        if available:  # the same weights, reordered once
            weights["onednn_packed"] = [torch.ops.mkldnn._reorder_linear_weight(w) for w in pool]
        gigabytes = out_features * in_features * 4 / 1e9
        layer_bytes += uses * out_features * in_features * 4
        for rows in rows_asked:
            x = torch.randn(rows, in_features, generator=generator)
            exact = x.double() @ pool[0].double().T
            calls = {
                "torch": lambda w, x=x: F.linear(x, w),
                "onednn": lambda w, x=x: onednn_linear(x, w),
                "onednn_packed": lambda w, x=x: onednn_linear(x, w),
                "read": lambda w: w.sum(),
            }
            cells = []
            for kernel in kernels:
                seconds = per_call_seconds(calls[kernel], weights[kernel], args.rounds)
                cell = f"{kernel} {seconds * 1e6:7.0f} us {gigabytes / seconds:5.1f} GB/s"
                if kernel != "read":
                    diff = (calls[kernel](weights[kernel][0]).double() - exact).abs().max().item()
                    cell += f" diff {diff:.0e}"
                    if rows == 8:
                        worst = max(worst, diff / exact.abs().max().item())
                cells.append(cell)
                if rows == 8:
                    totals[kernel] += uses * seconds
            print(f"{label:8s} {out_features}x{in_features} rows {rows:3d}: " + " | ".join(cells))
    torch_gbps = layer_bytes / totals["torch"] / 1e9
    read_gbps = layer_bytes / totals["read"] / 1e9
    packed = totals["torch"] / totals["onednn_packed"] if "onednn_packed" in totals else float("nan")
    print(f"one layer's 8-row products: {layer_bytes / 1e6:.1f} MB of weights; ", end="")
    print(", ".join(f"{kernel} {totals[kernel] * 1e3:.2f} ms" for kernel in kernels))
    print(f"rows8 torch_gbps {torch_gbps:.1f} read_gbps {read_gbps:.1f} ", end="")
    print(f"onednn_packed_over_torch {packed:.2f}x max_rel_diff {worst:.1e}")
    return {
        "torch_gbps": torch_gbps,
        "read_gbps": read_gbps,
        "onednn_packed_over_torch": packed,
        "max_rel_diff": worst,
    }


if __name__ == "__main__":
    main()
