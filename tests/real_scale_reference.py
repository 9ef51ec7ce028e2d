"""The HF + peft reference run of one question on a checkpoint in the real LLaMA-3.2-1B layout.

    python tests/real_scale_reference.py CHECKPOINT_DIR TOKENIZER_DIR OUT_FILE --question TEXT [--max-new-tokens 4]
                                         [--thoughts FILE]

Builds upstream's module for LLaMA-3.2-1B's config (128,256 + 3 vocabulary rows, 16 layers, d_model
2048, GQA 32/8, llama3 RoPE, tied embeddings; LoRA r=128 unmerged on every projection; the projection
head with LayerNorm), loads the checkpoint into it with ``strict=True`` (so its 377 keys and shapes are
upstream's), casts it to float32 and runs upstream's loop (``tests/hf_reference.py``). Writes the
latent states, fed thoughts and answer tokens with ``torch.save``; with ``--thoughts FILE`` (a
``torch.save`` of a dict with ``thought_embeds``, ``[n, d_model]``) also the latent states when those
thoughts are fed instead of its own (``latents_given_thoughts``). It imports nothing of codi_lens; it
runs in a process of its own so that the two 1B models are never in memory together.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_reference import ReferenceCODI  # noqa: E402
from upstream_factory import make_base_dir  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("tokenizer")
    parser.add_argument("out")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--thoughts", default=None, help="also run with these fed thoughts")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base_dir(Path(tmp) / "base", "llama", size="llama-3.2-1b")
        reference = ReferenceCODI.from_checkpoint(
            args.checkpoint,
            base,
            lora_r=128,
            prj_dim=2048,
            tokenizer=AutoTokenizer.from_pretrained(args.tokenizer),
        )
    out = reference.run(args.question, n_latents=6, max_new_tokens=args.max_new_tokens)
    ids = reference.tokenizer(args.question.strip().replace("  ", " "))["input_ids"]
    if args.thoughts:
        given = torch.load(args.thoughts)["thought_embeds"]
        out["latents_given_thoughts"] = reference.latents_given_thoughts(args.question, given)
    torch.save({**out, "question_ids": ids, "eos_id": reference.eos_id}, args.out)


if __name__ == "__main__":
    main()
