"""Real scale: a random checkpoint with the true LLaMA-3.2-1B layout loads and answers on this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codi_lens.loading.architectures import describe_base
from codi_lens.loading.checkpoint import CheckpointLayout, expected_tensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("family", "size", "builtin", "prj_dim", "n_keys"),
    [("llama", "llama-3.2-1b", "llama-3.2-1b-instruct", 2048, 377), ("gpt2", "gpt2", "gpt2", 768, 251)],
)
def test_expected_layout_of_real_checkpoints_matches_upstream_module(tmp_path, family, size, builtin, prj_dim, n_keys):
    """codi_lens' expected keys and shapes equal an upstream-style CODI module's state dict (built on meta)."""
    from upstream_factory import build_codi_module, make_base_dir

    base = make_base_dir(tmp_path / "base", family, size=size)
    module = build_codi_module(base, lora_r=128, prj_dim=prj_dim, device="meta")
    upstream = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    arch = describe_base(builtin)
    layout = CheckpointLayout(family, True, 128, prj_dim, True, arch.n_layers, arch.codi_vocab)
    assert len(upstream) == n_keys
    assert expected_tensors(arch, layout) == upstream
    dtypes = {str(v.dtype) for k, v in module.state_dict().items() if "lora_" not in k and not k.startswith("prj.")}
    assert dtypes == {"torch.bfloat16"}


@pytest.mark.slow
def test_random_1b_checkpoint_matches_hf_peft_with_no_tokenizer_directory(tmp_path):
    """The true LLaMA-3.2-1B layout (128,259 vocabulary rows, 16 layers, d_model 2048, tied embeddings, LoRA
    r=128) loads with only its weight file (the Llama 3 tokenizer built from Meta's llama-models into a fresh
    cache) and answers a GSM8K question exactly as upstream's HF + peft loop does on the same file: latent
    states, fed thoughts and the first answer tokens. The two models run in separate processes (each needs
    several GB); load time and memory are the benchmark's to print (``benchmarks/real_scale_load.py``)."""
    env = {**os.environ, "CODI_LENS_CACHE": str(tmp_path / "cache")}
    ours_file, reference_file = tmp_path / "codi_lens.pt", tmp_path / "reference.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.real_scale_load", "--workdir", str(tmp_path / "ckpt"),
         "--max-new-tokens", "4", "--save", str(ours_file)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["n_keys"] == 377
    assert 3.3e9 < report["file_bytes"] < 3.5e9  # codi-reference: about 3.39 GB
    assert (tmp_path / "cache").is_dir()  # built there, not in the user's cache
    assert report["question_ids"][0] == 128000 and report["question_ids"].count(128000) == 1  # BOS once
    assert max(report["question_ids"][1:]) < 128000  # the question itself holds no special token
    assert report["eos_id"] == 128009  # <|eot_id|>: Llama-3.2-Instruct CODI stops there
    ours = torch.load(ours_file)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "real_scale_reference.py"), str(tmp_path / "ckpt"),
         report["tokenizer_dir"], str(reference_file), "--question", ours["question"], "--max-new-tokens", "4",
         "--thoughts", str(ours_file)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = torch.load(reference_file)
    assert reference["question_ids"] == report["question_ids"] and reference["eos_id"] == report["eos_id"]
    assert ours["latent_states"].shape == reference["latent_states"].shape == (7, 2048)
    # float32, 16 layers at d_model 2048, LoRA merged (codi_lens) against unmerged (peft), post-norm states of
    # unit scale. Each step on the same inputs: h_k when both are fed codi_lens' thoughts (measured 1.2e-5).
    assert (ours["latent_states"] - reference["latents_given_thoughts"]).abs().max() <= 1e-4
    # Free-running, each loop feeds back its own states: random weights amplify the first step's rounding
    # about 2.5x per thought (measured 1.1e-5 at h_0, 1.9e-3 at h_6).
    assert (ours["latent_states"][0] - reference["latent_states"][0]).abs().max() <= 1e-4
    assert (ours["latent_states"] - reference["latent_states"]).abs().max() <= 5e-3
    assert (ours["thought_embeds"] - reference["thought_embeds"]).abs().max() <= 5e-3
    assert ours["answer_tokens"] == reference["answer_tokens"] and len(ours["answer_tokens"]) == 4
