"""PCCoT at LLaMA-3.2-1B's shape, by hand (not collected by pytest; about 2 minutes and 8 GB at a time):

    python tests/pccot_real_scale.py WORKDIR

1. ``build``: a random bfloat16 base with 1B's config and the Llama 3 tokenizer (built offline by codi_lens
   from ``llama-models``), saved with its weights; then a PCCoT adapter as ``run_ccot.py`` saves one (LoRA
   r 128 on every projection, the five trained rows in float32 beside the bfloat16 grown embedding, the
   head), 6 thoughts, 3 sweeps after sweep 0.
2. ``reference``: ``tests/pccot_reference.py`` on it, in float32, in a process of its own.
3. ``ours``: ``load_codi`` on it, in float32, compared with the reference: every sweep's inputs and hidden
   states, BOT's state, the first answer token's logits and 4 answer tokens. Prints the maximum differences.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
QUESTION = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. How many are left?"
)
N_LATENTS, N_SWEEPS, MAX_NEW = 6, 3, 4


def build(work: Path) -> None:
    from pccot_factory import save_pccot_checkpoint
    from transformers import AutoModelForCausalLM
    from upstream_factory import llama_1b_config, randomise

    from codi_lens.loading.llama_tokenizer import llama3_tokenizer

    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    tokenizer = llama3_tokenizer(codi_pad=False)
    tokenizer.save_pretrained(str(base))
    config = llama_1b_config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.save_pretrained(str(base))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    randomise(lm, 0.02)
    lm.save_pretrained(str(base))
    del lm
    save_pccot_checkpoint(
        work / "checkpoint", base, "llama", use_projection=True, n_latents=N_LATENTS, n_sweeps=N_SWEEPS, seed=0,
        lora_r=128,
    )  # fmt: skip


def reference(work: Path) -> None:
    from pccot_reference import ReferencePCCoT

    ref = ReferencePCCoT.from_checkpoint(work / "checkpoint", work / "base")
    torch.save(ref.run(QUESTION, max_new_tokens=MAX_NEW), work / "reference.pt")


def ours(work: Path) -> None:
    from codi_lens import load_codi
    from codi_lens.core.names import sweep_hook_name

    start = time.perf_counter()
    model = load_codi(work / "checkpoint", work / "base")
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    store: dict[str, torch.Tensor] = {}

    def keep(acts, hook):
        store[hook.name] = acts.detach().clone()

    kinds = ("input", "hidden")
    names = [
        sweep_hook_name(k, s, kind) for k in range(1, N_LATENTS + 1) for s in range(N_SWEEPS + 1) for kind in kinds
    ]
    run = model.run_codi([QUESTION], max_new_tokens=MAX_NEW, fwd_hooks=[(n, keep) for n in names], return_logits=True)
    ref = torch.load(work / "reference.pt")

    def sweeps(kind: str) -> torch.Tensor:
        rows = [[store[sweep_hook_name(k, s, kind)][0] for k in range(1, N_LATENTS + 1)] for s in range(N_SWEEPS + 1)]
        return torch.stack([torch.stack(row) for row in rows])

    diffs = {
        "sweep hidden states": (sweeps("hidden") - ref["sweep_hidden"]).abs().max().item(),
        "sweep inputs": (sweeps("input") - ref["fed"]).abs().max().item(),
        "h_0 (BOT)": (run.latent_states[0, 0] - ref["h_bot"]).abs().max().item(),
        "first answer logits": (run.step_logits[0, 1 + N_LATENTS] - ref["first_logits"]).abs().max().item(),
    }
    for name, value in diffs.items():
        print(f"max |ours - reference| {name}: {value:.2e}")
    print(f"largest hidden state entry {ref['sweep_hidden'].abs().max().item():.2f}")
    print("answer tokens equal:", run.answer_tokens[0] == ref["answer_tokens"], ref["answer_tokens"])


STEPS = {"build": build, "reference": reference, "ours": ours}

if __name__ == "__main__":
    torch.set_num_threads(2)
    if len(sys.argv) == 3:
        STEPS[sys.argv[2]](Path(sys.argv[1]))
    else:
        for step in STEPS:  # each in a process of its own: the two 1B models are never in memory together
            subprocess.run([sys.executable, __file__, sys.argv[1], step], check=True)
