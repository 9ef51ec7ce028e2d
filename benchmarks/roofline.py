"""How close codi_lens' forward passes come to the machine: matrix-multiply throughput achieved against plain
``torch.matmul`` of the same shapes, measured in the same run.

    python -m benchmarks.roofline [--layers 16] [--d-model 2048] [--pairs 2] [--decode-batch 16]
                                  [--decode-tokens 16] [--rounds 3] [--quick] [--device cpu] [--dtype float32]

Model: random weights in LLaMA-3.2-1B's exact shape (16 layers, d_model 2048, 32/8 heads of 64, gated MLP
of 8,192, the 128,259-row vocabulary; ``benchmarks.common.random_1b_shape_model``). Two workloads:

- ``sweep``: the teacher-forced patching sweep forward (``codi_lens.patching.patched_logits``: the corrupted
  run once, every cell branching off it, cells of one step batched), ``resid_post`` of every layer at BOT,
  thoughts 1..6 and EOT, on ``--pairs`` minimal pairs (the clean runs are prepared once, untimed);
- ``decode``: batched greedy decoding (``run_codi`` on ``--decode-batch`` questions, ``--decode-tokens``
  new tokens each).

For each, every matrix multiply the workload performs is recorded once (aten ``mm``, ``addmm``, ``bmm``,
and the two products inside each ``scaled_dot_product_attention``) with ``torch.utils.flop_counter``-style
counting (2 m n k FLOPs per product). Then, ``--rounds`` times, alternating: the workload, and the same
products replayed with ``torch.matmul`` on tensors of the same shapes and dtype. Printed per workload:
counted GFLOP, the median seconds of each, achieved and matmul-only GFLOP/s, and
``fraction_of_matmul <F>`` = matmul-only seconds / workload seconds (1.0: the workload runs at the speed of
its bare multiplies). Then where the time goes: the workload's wall time split by ``torch.profiler`` self time
into matrix multiplies, attention kernel, elementwise and normalisation, copies and layout, other ops, and the
time outside any op (Python, hooks, dispatch); the profiler's own overhead inflates the last.

``--quick``: 2 layers at d_model 256, 1 pair, a batch of 2 and 4 tokens (for the test suite: it checks the
counting and the printout, not the speed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import DTYPES, add_device_args, bench_pairs, bench_problems, describe, random_1b_shape_model
from codi_lens.patching import patched_logits, prepare_pairs, sweep_sites

aten = torch.ops.aten

#: aten ops whose self time is a matrix multiply, and the attention kernels (CPU and CUDA names).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
ATTENTION_OPS = ("scaled_dot_product", "_flash_attention", "_efficient_attention")
ELEMENTWISE_OPS = (
    "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt",
    "aten::neg", "aten::cos", "aten::sin", "aten::exp", "aten::softmax", "aten::_softmax", "aten::where",
    "aten::native_layer_norm", "aten::gelu", "aten::tanh", "aten::sum", "aten::argmax", "aten::max",
)  # fmt: skip
COPY_OPS = ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::index")


@dataclass(frozen=True)
class Product:
    """One matrix product: ``batch`` independent ``[m, k] @ [k, n]`` products in ``dtype``."""

    batch: int
    m: int
    k: int
    n: int
    dtype: torch.dtype

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


class ProductRecorder(TorchDispatchMode):
    """Records every matrix product dispatched while active (``products``: product -> how many times)."""

    def __init__(self) -> None:
        super().__init__()
        self.products: Counter[Product] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.mm.default, aten.addmm.default):
            a, b = (args[0], args[1]) if func is aten.mm.default else (args[1], args[2])
            self.products[Product(1, a.shape[0], a.shape[1], b.shape[1], a.dtype)] += 1
        elif func in (aten.bmm.default, aten.baddbmm.default):
            a, b = (args[0], args[1]) if func is aten.bmm.default else (args[1], args[2])
            self.products[Product(a.shape[0], a.shape[1], a.shape[2], b.shape[2], a.dtype)] += 1
        elif "scaled_dot_product" in str(func):
            q, k = args[0], args[1]  # [batch, heads, q_len, d_head], [batch, kv_heads, k_len, d_head]
            heads = q.shape[0] * q.shape[1]
            self.products[Product(heads, q.shape[2], q.shape[3], k.shape[2], q.dtype)] += 1  # q @ k^T
            self.products[Product(heads, q.shape[2], k.shape[2], q.shape[3], q.dtype)] += 1  # p @ v
        return func(*args, **kwargs)


def recorded_products(workload: Callable[[], object]) -> Counter[Product]:
    with ProductRecorder() as recorder:
        workload()
    return recorder.products


def replay(products: Counter[Product], device: str) -> Callable[[], None]:
    """A function that performs the same products with ``torch.matmul`` on tensors made beforehand."""

    def operand(batch: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        shape = (rows, cols) if batch == 1 else (batch, rows, cols)  # one product is a plain mm, as recorded
        return torch.randn(shape, dtype=dtype, device=device)

    operands = [
        (operand(p.batch, p.m, p.k, p.dtype), operand(p.batch, p.k, p.n, p.dtype), count)
        for p, count in products.items()
    ]

    def run() -> None:
        for a, b, count in operands:
            for _ in range(count):
                torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return run


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds_by_kind(workload: Callable[[], object]) -> tuple[dict[str, float], float]:
    """The workload's wall time by kind of work, in seconds: the profiled self time of its aten ops, grouped,
    and the time outside any op (Python, hooks, dispatch); and the profiled wall time. The profiler's own
    overhead falls in the last group."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        workload()
        wall = time.perf_counter() - start
    seconds: Counter[str] = Counter()
    for event in profile.key_averages():
        name = event.key
        kind = (
            "matrix multiplies" if name in MATMUL_OPS else
            "attention kernel" if any(a in name for a in ATTENTION_OPS) else
            "elementwise and norms" if name in ELEMENTWISE_OPS else
            "copies and layout" if name in COPY_OPS else
            "other ops (indexing, small ops)"
        )  # fmt: skip
        seconds[kind] += event.self_cpu_time_total / 1e6
    seconds["outside any op (Python, hooks, dispatch)"] = max(0.0, wall - sum(seconds.values()))
    return dict(seconds.most_common()), wall


def where_time_goes(workload: Callable[[], object]) -> dict[str, float]:
    """Share of the workload's wall time by kind of work (:func:`seconds_by_kind`)."""
    seconds, wall = seconds_by_kind(workload)
    return {kind: s / wall for kind, s in seconds.items()}


def measure(name: str, workload: Callable[[], object], device: str, rounds: int) -> float:
    products = recorded_products(workload)
    flops = sum(p.flops * count for p, count in products.items())
    bare = replay(products, device)
    bare()  # warm up both
    workload()
    times: dict[str, list[float]] = {"workload": [], "matmul": []}
    for _ in range(rounds):
        times["workload"].append(timed(workload, device))
        times["matmul"].append(timed(bare, device))
    work_s, matmul_s = statistics.median(times["workload"]), statistics.median(times["matmul"])
    print(f"{name}: {sum(products.values())} products of {len(products)} shapes, {flops / 1e9:.1f} GFLOP")
    print(f"{name}: workload {work_s:.3f} s ({flops / work_s / 1e9:.1f} GFLOP/s), ", end="")
    print(f"bare matmul {matmul_s:.3f} s ({flops / matmul_s / 1e9:.1f} GFLOP/s)")
    for kind, share in where_time_goes(workload).items():
        print(f"{name}:   {share:6.1%}  {kind}")
    fraction = matmul_s / work_s
    print(f"{name}: fraction_of_matmul {fraction:.2f}")
    return fraction


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers, d_model 256, 1 pair, batch 2, 4 tokens")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.pairs, args.decode_batch, args.decode_tokens = 2, 256, 1, 2, 4
    dtype = DTYPES[args.dtype]
    model = random_1b_shape_model(args.layers, d_model=args.d_model, device=args.device, dtype=dtype)
    positions = ["bot", *[f"thought:{k}" for k in range(1, 7)], "eot"]
    cells = sweep_sites(model.cfg.n_layers, positions=positions)
    batch, kept, _ = prepare_pairs(model, bench_pairs(args.pairs), sorted({c.hook for c in cells}), answer_from="gold")
    questions = kept["corrupted_question"].tolist()
    decode_questions = [p.question for p in bench_problems(args.decode_batch)]
    print(f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocabulary {model.cfg.d_vocab}; {describe(args)}")
    print(f"sweep: {len(questions)} pairs x {len(cells)} cells; decode: {args.decode_batch} questions x ", end="")
    print(f"{args.decode_tokens} tokens")
    with torch.no_grad():
        sweep = measure("sweep", lambda: patched_logits(model, batch, questions, cells), args.device, args.rounds)
        decode = measure(
            "decode",
            lambda: model.run_codi(decode_questions, max_new_tokens=args.decode_tokens),
            args.device,
            args.rounds,
        )
    return {"sweep": sweep, "decode": decode}


if __name__ == "__main__":
    main()
