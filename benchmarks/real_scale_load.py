"""Load a random-weight CODI checkpoint with the true LLaMA-3.2-1B shapes and answer one question.

    python -m benchmarks.real_scale_load [--tokenizer DIR] [--workdir DIR] [--format safetensors|bin]
                                         [--device cpu] [--dtype float32] [--save FILE]

Writes a checkpoint in the upstream layout (377 keys: bf16 base, fp32 LoRA r=128 and projection,
random values), loads it with codi_lens in a fresh process (default: float32 on the CPU), runs the CODI
loop on one question, and prints, as one JSON line, the file size, the load and answer wall times, and the
load's memory against the loaded model's parameter bytes (``param_gb``): ``peak_over_params`` (the
process's peak resident memory during the load, interpreter and libraries included, over the parameter
bytes) and ``load_growth_over_params`` (the peak minus the resident memory just before the load).
Without ``--tokenizer`` the model loads with no tokenizer directory (the Llama 3 tokenizer built from
Meta's ``llama-models``, extra ``codi-lens[llama]``) and answers the first GSM8K test question; any
local tokenizer whose ids are below 128256 also works (the weights are random anyway).
``--save FILE`` also writes the run's latent states, fed thoughts and answer tokens (``torch.save``),
which ``tests/test_real_scale.py`` compares with the HF + peft reference loop.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import PeakSampler, machine_gb, random_checkpoint_tensors, resident_gb
from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.loading.architectures import describe_base
from codi_lens.loading.checkpoint import CheckpointLayout

BASE = "llama-3.2-1b-instruct"


def write_random_checkpoint(path: Path, fmt: str, seed: int = 0) -> tuple[Path, int]:
    """Random tensors for every key of the real 1B layout (``benchmarks.common.random_checkpoint_tensors``:
    bf16 base, fp32 LoRA and prj, ``lm_head.weight`` holding ``embed_tokens.weight``'s values as in the
    released file), as safetensors or a torch ``.bin``."""
    arch = describe_base(BASE)
    layout = CheckpointLayout(
        family="llama",
        uses_lora=True,
        lora_rank=128,
        prj_dim=2048,
        prj_layernorm=True,
        n_layers=arch.n_layers,
        vocab=arch.codi_vocab,
    )
    tensors = random_checkpoint_tensors(arch, layout, seed)
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        out = path / "model.safetensors"
        save_file(tensors, str(out))
    else:
        out = path / "pytorch_model.bin"
        torch.save(tensors, out)
    return out, len(tensors)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter of the loaded model (what it needs to exist)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_and_answer(args: argparse.Namespace, workdir: Path) -> dict:
    """In this (fresh) process: load the checkpoint, sampling resident memory from before the load to after
    it, then answer the first GSM8K test question."""
    before = resident_gb()
    sampler = PeakSampler(limit_gb=machine_gb())
    sampler.start()
    t0 = time.perf_counter()
    model = load_codi(workdir, BASE, tokenizer=args.tokenizer, device=args.device, dtype=getattr(torch, args.dtype))
    t1 = time.perf_counter()
    peak = sampler.stop()
    params = parameter_bytes(model) / 2**30
    question = load_problems("gsm8k:test", limit=1)[0].question
    result = model.run_codi([question], max_new_tokens=args.max_new_tokens)
    t2 = time.perf_counter()
    report = {
        "dtype": args.dtype,
        "load_s": round(t1 - t0, 1),
        "answer_s": round(t2 - t1, 1),
        "rss_before_load_gb": round(before, 2),
        "peak_rss_gb": round(peak, 2),
        "param_gb": round(params, 2),
        "peak_over_params": round(peak / params, 2),
        "load_growth_over_params": round((peak - before) / params, 2),
        "question_ids": model.tokenize_questions([question])[0][0].tolist(),
        "eos_id": model.codi_tokens.eos,
        "tokenizer_dir": getattr(model.tokenizer, "name_or_path", None),
        "answer_tokens": result.answer_tokens[0],
        "latent_shape": list(result.latent_states.shape),
        "latents_finite": bool(torch.isfinite(result.latent_states).all()),
    }
    if args.save:
        torch.save(
            {
                "question": question,
                "latent_states": result.latent_states[0].float().cpu(),
                "thought_embeds": result.thought_embeds[0].float().cpu(),
                "answer_tokens": result.answer_tokens[0],
            },
            args.save,
        )
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the built Llama 3 tokenizer)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--save", default=None, help="write the run's latents, thoughts and answer here")
    parser.add_argument("--load-here", action="store_true", help=argparse.SUPPRESS)  # the child's half
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="codi_1b_"))
    if args.load_here:
        report = load_and_answer(args, workdir)
        print(json.dumps(report))
        return report
    t0 = time.perf_counter()
    file, n_keys = write_random_checkpoint(workdir, args.format)
    write_s = time.perf_counter() - t0
    # The load runs in a fresh process, so its memory is not the memory the writing left behind.
    argv = [*(sys.argv[1:] if argv is None else argv), "--workdir", str(workdir), "--load-here"]
    child = subprocess.run([sys.executable, "-m", "benchmarks.real_scale_load", *argv], capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"loading failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    report = {"file_bytes": file.stat().st_size, "n_keys": n_keys, "write_s": round(write_s, 1)}
    report |= json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
