"""Peak memory of ``run_codi_with_cache`` for a 256-token answer on the LLaMA-3.2-1B shape.

    python -m benchmarks.cache_memory [--max-new-tokens 256] [--quick]

Rotated keys (``blocks.L.attn.hook_rot_k``) cover every cached position at every chunk. Storing them
whole per chunk and trimming only when stitching (what codi_lens did before) makes the cache grow
with the square of the sequence length; ``run_codi_with_cache`` now cuts each chunk's rotated keys to
its own positions when it stores them. This script runs both ways in fresh processes (so each peak is
its own): the naive way caches every hook with a plain recording hook that keeps whole tensors, the
library way calls ``run_codi_with_cache``. Both cache every hook of a random-weight model with the
1B layout (16 layers, d_model 2048, GQA 32/8, vocabulary 128,259) in float32 on the CPU, for one
question and ``--max-new-tokens`` generated tokens (random weights seldom stop early; the answer
length is printed). It checks that the two stitched rotated keys agree and prints the peak resident
memory during each run (sampled every 5 ms; the model's own memory included, shown apart) and, on
its last line, ``memory_ratio <naive / library>``. ``--quick`` uses 4 layers
and 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

from codi_lens.architectures import BUILTIN_BASES, architecture_from_config, to_hooked_config
from codi_lens.hooks import position_axis, spans_every_cached_position
from codi_lens.model import CODIModel, CODITokens, _stitch
from codi_lens.synthetic import build_tokenizer

QUESTION = "Ava has 16 coins. On Monday Ava buys 4 more. On Tuesday Ava keeps half of them. How many now?"


def random_1b_shape_model(n_layers: int | None = None) -> CODIModel:
    """A random-weight CODI model with LLaMA-3.2-1B's shapes (optionally fewer layers)."""
    config = dict(BUILTIN_BASES["llama-3.2-1b-instruct"])
    if n_layers is not None:
        config["num_hidden_layers"] = n_layers
    arch = architecture_from_config(config, "llama-3.2-1b shape")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tokens = CODITokens(pad=arch.pad_id, bot=arch.bot_id, eot=arch.eot_id, eos=int(tokenizer.eos_token_id))
    model = CODIModel(to_hooked_config(arch), tokenizer, tokens=tokens, prj_dim=2048, prj_layernorm=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith(("ln1.w", "ln2.w", "ln_final.w", "prj.ln.weight")) else param.normal_(
                0, 0.02
            )
    model.store_weights_for_linear()  # as load_codi does
    return model.eval()


def resident_gb() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class PeakSampler(threading.Thread):
    """Samples resident memory every few milliseconds; ``peak`` is the largest seen while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = resident_gb(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident_gb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, resident_gb())


def measure(mode: str, n_layers: int | None, max_new_tokens: int) -> dict:
    """Run one way in this process; returns the peak resident memory during the run (the model's own
    memory included) and a checksum of the stitched rotated keys."""
    model = random_1b_shape_model(n_layers)
    before = resident_gb()
    sampler = PeakSampler()
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
            cache[name] = _stitch(name, parts)
        rot_k = cache["blocks.0.attn.hook_rot_k"]
    peak = sampler.stop()
    return {
        "mode": mode,
        "peak_rss_gb": peak,
        "model_rss_gb": before,
        "seconds": time.perf_counter() - start,
        "answer_tokens": len(result.answer_tokens[0]),
        "rot_k_sum": float(rot_k.double().sum()),
        "rot_k_positions": rot_k.shape[1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="4 layers, 32 tokens (a CI-sized check)")
    parser.add_argument("--child", choices=["naive", "library"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.layers, args.max_new_tokens)))
        return
    layers = 4 if args.quick else None
    tokens = 32 if args.quick else args.max_new_tokens
    reports = {}
    for mode in ("naive", "library"):
        command = [sys.executable, "-m", "benchmarks.cache_memory", "--child", mode, "--max-new-tokens", str(tokens)]
        if layers:
            command += ["--layers", str(layers)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        reports[mode] = json.loads(out.strip().splitlines()[-1])
        r = reports[mode]
        print(
            f"{mode:8s} peak {r['peak_rss_gb']:.2f} GB (model alone {r['model_rss_gb']:.2f} GB), "
            f"{r['answer_tokens']} answer tokens, {r['rot_k_positions']} positions, {r['seconds']:.0f} s"
        )
    naive, library = reports["naive"], reports["library"]
    diff = abs(naive["rot_k_sum"] - library["rot_k_sum"])
    print(f"rotated keys agree: |sum difference| {diff:.3g}")
    print(f"memory_ratio {naive['peak_rss_gb'] / library['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
