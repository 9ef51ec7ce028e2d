"""Load a random-weight CODI checkpoint with the true LLaMA-3.2-1B shapes and answer one question.

    python -m benchmarks.real_scale_load [--tokenizer DIR] [--workdir DIR] [--format safetensors|bin]
                                         [--device cpu] [--dtype float32] [--save FILE]

Writes a checkpoint in the upstream layout (377 keys: bf16 base, fp32 LoRA r=128 and projection,
random values), loads it with codi_lens (default: float32 on the CPU), runs the CODI loop on one question,
and prints, as one JSON line, the file size, the load and answer wall times and the peak resident
memory. Without ``--tokenizer`` the model loads with no tokenizer directory (the Llama 3 tokenizer
built from Meta's ``llama-models``, extra ``codi-lens[llama]``) and answers the first GSM8K test
question; any local tokenizer whose ids are below 128256 also works (the weights are random anyway).
``--save FILE`` also writes the run's latent states, fed thoughts and answer tokens (``torch.save``),
which ``tests/test_real_scale.py`` compares with the HF + peft reference loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import random_checkpoint_tensors
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the built Llama 3 tokenizer)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--save", default=None, help="write the run's latents, thoughts and answer here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="codi_1b_"))
    t0 = time.perf_counter()
    file, n_keys = write_random_checkpoint(workdir, args.format)
    t1 = time.perf_counter()
    model = load_codi(workdir, BASE, tokenizer=args.tokenizer, device=args.device, dtype=getattr(torch, args.dtype))
    t2 = time.perf_counter()
    question = load_problems("gsm8k:test", limit=1)[0].question
    result = model.run_codi([question], max_new_tokens=args.max_new_tokens)
    t3 = time.perf_counter()
    report = {
        "file_bytes": file.stat().st_size,
        "n_keys": n_keys,
        "write_s": round(t1 - t0, 1),
        "load_s": round(t2 - t1, 1),
        "answer_s": round(t3 - t2, 1),
        "question_ids": model.tokenize_questions([question])[0][0].tolist(),
        "eos_id": model.codi_tokens.eos,
        "tokenizer_dir": getattr(model.tokenizer, "name_or_path", None),
        "answer_tokens": result.answer_tokens[0],
        "latent_shape": list(result.latent_states.shape),
        "latents_finite": bool(torch.isfinite(result.latent_states).all()),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
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
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
