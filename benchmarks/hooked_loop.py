"""Speed of the hooked CODI loop (``run_codi``, no hooks) against the plain HF + peft loop.

    python -m benchmarks.hooked_loop [--questions 8] [--max-new-tokens 32] [--batch 1] [--rounds 3] [--quick]
                                     [--device cpu] [--dtype float32]

One random checkpoint in the upstream layout with the benchmark model's shape (LLaMA-3.2-1B's 16
layers, 32/8 heads and vocabulary at d_model 512; bf16 base weights, LoRA r=8 on every projection,
projection head with LayerNorm) is written to a temporary directory and loaded twice:

- ``hf``: the plain loop of upstream ``test.py`` (``tests/hf_reference.py``): the peft model with
  LoRA unmerged, HF's default attention, ``inputs_embeds`` and a ``DynamicCache``, one question at a
  time;
- ``codi_lens``: ``load_codi`` and ``run_codi`` (LoRA merged at load, TransformerLens blocks with
  every hook point in place, none attached), one question at a time, the same dtype.

With ``--batch B`` (B > 1) both run B questions at once: HF as a batched loop would (``run_batch``: left
padding, a growing attention mask, position ids from each row's first token; compared on answers and latent
states, as it keeps no step logits).

Each answers the same questions greedily to ``--max-new-tokens`` (random weights seldom stop early),
``--rounds`` times, the two ways alternating. Prints each way's median time and every round's, and, last,
``speedup <hf / codi_lens>x max_abs_diff <D>`` (the ratio of the medians) with D
the largest difference of the latent states ``h_0..h_n`` and of every step's logits; a speedup of
0.67 or more is "within 1.5x". The two ways must agree: the same answer tokens (so the same length and
the same EOS stop) and every step's logits present on both sides, within ``TOLERANCE`` of the largest value
compared (float32); otherwise it exits 1 naming the question. ``--quick``: 2 questions, 8 tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.common import DTYPES, add_device_args, alternating_medians, bench_problems, describe
from codi_lens import load_codi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import ReferenceCODI  # noqa: E402
from upstream_factory import build_codi_module, make_base_dir, save_codi_checkpoint  # noqa: E402

LORA_R, PRJ_DIM = 8, 512
#: Largest allowed difference of latent states and step logits, as a fraction of the largest value compared
#: (the latent states' or the logits' largest magnitude). Every thought is fed back, so float32 rounding grows along
#: the loop: measured on 16 questions x 32 tokens (max |h| 4.36), codi_lens against HF + peft 7.8e-4 one question at
#: a time and 6.6e-4 in batches of 16 (1.8e-4 and 1.5e-4 of the scale), where HF's own batch of 16 against its own
#: one-at-a-time runs differs by 2.4e-4; answers identical. A bfloat16 run is compared at 5e-2 of the scale.
TOLERANCE = {"float32": 2.5e-4, "bfloat16": 5e-2}


def build_both(root: Path, dtype: torch.dtype, device: str):
    base = make_base_dir(root / "base", "llama", size="llama-1b-layout-512")
    module = build_codi_module(base, lora_r=LORA_R, prj_dim=PRJ_DIM, init_std=0.02)
    checkpoint = save_codi_checkpoint(module, root / "checkpoint", "safetensors")
    del module
    hf_module = build_codi_module(base, lora_r=LORA_R, prj_dim=PRJ_DIM, attn_implementation="sdpa")
    hf_module.load_state_dict(load_file(str(checkpoint)), strict=True)
    hf_module = hf_module.to(device=device, dtype=dtype).eval()
    from transformers import AutoTokenizer

    reference = ReferenceCODI(hf_module, AutoTokenizer.from_pretrained(str(base)))
    model = load_codi(checkpoint.parent, base, dtype=dtype, device=device)
    return reference, model


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, the two ways alternating (medians kept)")
    parser.add_argument("--batch", type=int, default=1, help="questions per run (1: upstream's one-at-a-time loop)")
    parser.add_argument("--quick", action="store_true", help="2 questions, 8 tokens")
    add_device_args(parser)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
    n, tokens = (2, 8) if args.quick else (args.questions, args.max_new_tokens)
    n = max(n, args.batch)
    questions = [p.question for p in bench_problems(n)]
    with tempfile.TemporaryDirectory() as tmp:
        reference, model = build_both(Path(tmp), DTYPES[args.dtype], args.device)

    groups = [questions[i : i + args.batch] for i in range(0, n, args.batch)]

    def hf():
        if args.batch == 1:  # upstream's own loop, one question at a time
            return [reference.run(q, max_new_tokens=tokens) for q in questions]
        return [reference.run_batch(group, max_new_tokens=tokens) for group in groups]

    def ours():
        return [model.run_codi(group, max_new_tokens=tokens) for group in groups]

    medians, times, results = alternating_medians({"hf": hf, "codi_lens": ours}, args.rounds)
    hf_s, ours_s = medians["hf"], medians["codi_lens"]
    difference, relative, mismatches = 0.0, 0.0, []

    def compare(mine: torch.Tensor, reference: torch.Tensor) -> None:
        nonlocal difference, relative
        gap = float((mine.float() - reference.float()).abs().max())
        difference, relative = max(difference, gap), max(relative, gap / float(reference.float().abs().max()))

    if args.batch == 1:
        for q, ref in zip(questions, results["hf"]):
            mine = model.run_codi([q], max_new_tokens=tokens, return_logits=True)
            if mine.answer_tokens[0] != ref["answer_tokens"]:
                mismatches.append(f"answers differ on {q[:40]!r}: {mine.answer_tokens[0]} vs {ref['answer_tokens']}")
                continue
            if mine.step_logits.shape[1] != ref["step_logits"].shape[0]:
                mismatches.append(
                    f"step counts differ on {q[:40]!r}: {mine.step_logits.shape[1]} vs {ref['step_logits'].shape[0]}"
                )
                continue
            compare(mine.latent_states[0], ref["latent_states"])
            compare(mine.step_logits[0], ref["step_logits"])
    else:
        for group, mine, ref in zip(groups, results["codi_lens"], results["hf"]):
            for q, ours_tokens, ref_tokens in zip(group, mine.answer_tokens, ref["answer_tokens"]):
                if ours_tokens != ref_tokens:
                    mismatches.append(f"answers differ on {q[:40]!r}: {ours_tokens} vs {ref_tokens}")
            compare(mine.latent_states, ref["latent_states"])
    print(f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocabulary {model.cfg.d_vocab}; {describe(args)}")
    how = "one at a time" if args.batch == 1 else f"in batches of {args.batch}"
    print(f"{n} questions, {how}, {tokens} new tokens each")
    for name, label in (("hf", "hf       "), ("codi_lens", "codi_lens")):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{label}  {medians[name]:7.2f} s median of {runs}  ({medians[name] / n:.2f} s per question)")
    ratio = hf_s / ours_s
    print(f"largest difference {relative:.2e} of the compared values' largest magnitude")
    print(f"speedup {ratio:.2f}x max_abs_diff {difference:.2e}")
    if mismatches or relative > TOLERANCE[args.dtype]:
        for line in mismatches:
            print(line, file=sys.stderr)
        print(f"codi_lens and HF + peft disagree (tolerance {TOLERANCE[args.dtype]:g} of the scale)", file=sys.stderr)
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
