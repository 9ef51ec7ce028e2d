"""What the benchmarks share: the benchmark model, problems and pairs for it, timing, memory, devices.

The benchmark model has LLaMA-3.2-1B's layer count (16), head layout (32 query heads, 8 key/value
heads), vocabulary (128,256 + BOT, EOT, pad) and gated MLP, with a smaller width (``d_model`` 512,
``d_head`` 16, ``d_mlp`` 2,048, projection 512): random weights, built in memory, the shipped
synthetic tokenizer. Its logits are meaningless but its shapes make the costs of the real model's
loop (per-layer work, a vocabulary-sized unembedding at every decoded token) show in the right
proportions on a CPU.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from codi_lens import CODIModel
from codi_lens.core.components import CODITokens
from codi_lens.data import Problem, load_problems
from codi_lens.data.pairs import make_pairs
from codi_lens.data.synthetic import build_tokenizer
from codi_lens.importance import step_importance
from codi_lens.loading.architectures import BUILTIN_BASES, architecture_from_config, to_hooked_config
from codi_lens.loading.checkpoint import expected_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def random_1b_shape_model(
    n_layers: int | None = None,
    *,
    d_model: int = 2048,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> CODIModel:
    """A random-weight CODI model with LLaMA-3.2-1B's layout: its layer count (or ``n_layers``), 32/8
    heads, vocabulary and gated MLP, at width ``d_model`` (2048 is the real width; ``d_head``, ``d_mlp``
    and the projection scale with it)."""
    config = dict(BUILTIN_BASES["llama-3.2-1b-instruct"])
    config.update(hidden_size=d_model, head_dim=d_model // 32, intermediate_size=4 * d_model)
    if n_layers is not None:
        config["num_hidden_layers"] = n_layers
    arch = architecture_from_config(config, "llama-3.2-1b layout")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokens = CODITokens(pad=arch.pad_id, bot=arch.bot_id, eot=arch.eot_id, eos=int(tokenizer.eos_token_id))
    model = CODIModel(to_hooked_config(arch), tokenizer, tokens=tokens, prj_dim=d_model, prj_layernorm=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln1.w", "ln2.w", "ln_final.w", "prj.ln.weight")):
                param.fill_(1.0)
            else:
                param.normal_(0, 0.02)
    return place(model, device, dtype)


def place(model: CODIModel, device: str = "cpu", dtype: torch.dtype = torch.float32) -> CODIModel:
    """``model`` in ``dtype`` on ``device``, weights laid out as ``load_codi`` lays them out."""
    if dtype != torch.float32:
        model = model.to(dtype)
        model.cfg.dtype = dtype
    if device != "cpu":
        model.cfg.device = device
        model.to(device)
    model.store_weights_for_linear()  # as load_codi does (after any move: a copy would undo it)
    return model.eval()


def bench_model(args: argparse.Namespace, n_layers: int | None = None) -> CODIModel:
    """The benchmark model (d_model 512) on ``--device`` in ``--dtype``."""
    return random_1b_shape_model(n_layers, d_model=512, device=args.device, dtype=DTYPES[args.dtype])


def bench_problems(n: int) -> list[Problem]:
    """The first ``n`` problems of the shipped synthetic test split (1,000 problems)."""
    return load_problems("toy:test", limit=n)


def bench_pairs(n: int) -> pd.DataFrame:
    """``n`` minimal pairs from the synthetic test split (one question number changed, answer recomputed)."""
    pairs, _ = make_pairs(load_problems("toy:test", limit=4 * n + 8), max_value=40)
    if len(pairs) < n:
        raise RuntimeError(f"only {len(pairs)} pairs from the synthetic test split; asked for {n}")
    return pairs.head(n).reset_index(drop=True)


def zero_step_importance(
    model: CODIModel, problems: list[Problem], max_new_tokens: int, batch_size: int = 32
) -> pd.DataFrame:
    """codi_lens' step importance with zero-ablation of each thought, alone and cumulatively (12
    ablations), in batches of ``batch_size`` problems written to a temporary result store."""
    with tempfile.TemporaryDirectory() as out:
        rows, _ = step_importance(
            model,
            problems,
            out,
            interventions=["zero"],
            scopes=["single", "cumulative"],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
        )
    return rows


def best_time(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """The best wall time of ``repeats`` calls (seconds) and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def alternating_medians(
    ways: dict[str, Callable[[], Any]], rounds: int = 3
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Each way timed once per round, the ways alternating within a round (so a machine that slows down or
    speeds up during the run weighs on every way alike): the median wall time of each way (seconds), every
    time, and each way's last result."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, fn in ways.items():
            seconds, results[name] = best_time(fn, 1)
            times[name].append(seconds)
    return {name: float(statistics.median(t)) for name, t in times.items()}, times, results


def describe(args: argparse.Namespace) -> str:
    return f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads"


def random_checkpoint_tensors(arch, layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every key of a CODI checkpoint layout (``codi_lens.loading.checkpoint``), stored as
    the released files store them: base weights bf16 (norm scales 1, biases 0, the rest N(0, 0.02)), LoRA and
    projection fp32. A LLaMA layout ties ``lm_head.weight`` to ``embed_tokens.weight`` as LLaMA-3.2-1B does."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in expected_tensors(arch, layout).items():
        if key.endswith(("norm.weight", "ln.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = torch.ones(shape)
        elif key.endswith("bias"):
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=generator) * 0.02
        fp32 = "lora_" in key or key.startswith("prj.")
        tensors[key] = value.to(torch.float32 if fp32 else torch.bfloat16)
    head, embedding = f"{layout.prefix}lm_head.weight", f"{layout.prefix}model.embed_tokens.weight"
    if layout.family == "llama" and head in tensors and embedding in tensors:
        tensors[head] = tensors[embedding].clone()
    return tensors


def resident_gb() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def high_water_gb() -> float:
    """This process's peak resident memory as the kernel counts it (``VmHWM``, reset when a process execs)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2**20


def reset_high_water() -> bool:
    """Start the kernel's peak (``VmHWM``) of this process again from its present resident memory (Linux
    ``/proc/self/clear_refs``, value 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def machine_gb() -> float:
    """Physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


class PeakSampler(threading.Thread):
    """Samples resident memory every few milliseconds; ``peak`` is the largest seen while running.

    Past ``limit_gb`` it prints ``{"exceeded_gb": limit}`` and ends the process (exit status 3), so a
    run that would exhaust the machine is reported instead of being killed by the kernel.
    """

    def __init__(self, limit_gb: float) -> None:
        super().__init__(daemon=True)
        self.peak, self.limit_gb, self._done = resident_gb(), limit_gb, threading.Event()
        self.kernel_peak = reset_high_water()  # the kernel's peak then counts from here, if it can be reset

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident_gb())
            if self.peak > self.limit_gb:
                print(json.dumps({"exceeded_gb": self.limit_gb}), flush=True)
                os._exit(3)

    def stop(self) -> float:
        """The peak since this sampler was made: the largest sample, or the kernel's high-water mark of this
        process if larger (a spike shorter than the sampling interval; reset when the sampler was made)."""
        self._done.set()
        self.join()
        return max(self.peak, resident_gb(), high_water_gb() if self.kernel_peak else 0.0)


def preload() -> None:
    """Import what every experiment imports, so that processes forked from this one start with it (about 6 s
    each on the 2-core machines). This process must not compute with torch afterwards: a child forked after
    torch's thread pool ran hangs in its first parallel operation."""
    import sae_lens  # noqa: F401
    import transformer_lens  # noqa: F401

    import codi_lens.run.cli  # noqa: F401


def exit_status(run: Callable[[], object]) -> int:
    """Call ``run`` in a forked child and return the exit status ``python`` would give for it: a ``SystemExit``'s
    code (a message printed to stderr, status 1), 1 with the traceback for any other exception, else 0; then the
    exit handlers run and both streams are flushed, as at interpreter exit."""
    status = 0
    try:
        run()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return status
