"""Decode speed of the CODI loop with and without codi_lens' transposed weight layout.

    python -m benchmarks.weight_layout [--d-model 1024] [--layers 8] [--vocab 32000] [--tokens 24]
                                       [--device cpu] [--dtype float32]

TransformerLens calls ``F.linear(x, W.T.contiguous())`` in its gated MLP and unembedding, which
copies each weight on every call; ``CODIModel.store_weights_for_linear`` stores the same values in
the transposed memory layout so those copies vanish. This script builds one random LLaMA-style
CODI model, times the same ``run_codi`` call in both layouts in the same process, checks the
outputs are identical, and prints the ratio.
"""

from __future__ import annotations

import argparse

import torch
from transformer_lens import HookedTransformerConfig

from benchmarks.common import DTYPES, add_device_args, best_time
from codi_lens import CODIModel
from codi_lens.core.components import CODITokens


class _Digits:
    """A stand-in tokenizer: one id per character code (ids stay below the vocabulary)."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] + [3 + ord(c) % 200 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def build(d_model: int, n_layers: int, vocab: int) -> CODIModel:
    cfg = HookedTransformerConfig(
        d_model=d_model,
        d_head=64,
        n_heads=d_model // 64,
        n_key_value_heads=d_model // 256,
        d_mlp=4 * d_model,
        n_layers=n_layers,
        n_ctx=1024,
        d_vocab=vocab + 3,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=64,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        init_weights=False,
    )
    model = CODIModel(
        cfg,
        _Digits(),
        tokens=CODITokens(pad=vocab, bot=vocab + 1, eot=vocab + 2, eos=2),
        prj_dim=d_model,
        prj_layernorm=True,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def timed(model: CODIModel, questions: list[str], tokens: int, repeats: int) -> tuple[float, list]:
    model.run_codi(questions, max_new_tokens=2)  # warm-up
    best, result = best_time(lambda: model.run_codi(questions, max_new_tokens=tokens), repeats)
    return best, result.answer_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_args(parser)
    args = parser.parse_args()
    model = build(args.d_model, args.layers, args.vocab)
    model = model.to(args.device, DTYPES[args.dtype])
    model.cfg.device, model.cfg.dtype = args.device, DTYPES[args.dtype]  # TransformerLens layout, no re-layout
    questions = ["Janet has 16 eggs and eats 3 of them. How many eggs are left?"]
    naive_s, naive_tokens = timed(model, questions, args.tokens, args.repeats)
    model.store_weights_for_linear()
    fast_s, fast_tokens = timed(model, questions, args.tokens, args.repeats)
    assert fast_tokens == naive_tokens, "the layout must not change results"
    print(
        f"run_codi, {args.tokens} answer tokens, d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, "
        f"{args.dtype} on {args.device}"
    )
    print(f"TransformerLens layout (copy per call): {naive_s:.3f} s")
    print(f"codi_lens layout (no copies):          {fast_s:.3f} s")
    print(f"speed-up: {naive_s / fast_s:.2f}x (identical answer tokens)")


if __name__ == "__main__":
    main()
