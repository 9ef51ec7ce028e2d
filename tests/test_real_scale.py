"""Real scale: a random checkpoint with the true LLaMA-3.2-1B layout loads and answers on this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codi_lens.architectures import describe_base
from codi_lens.checkpoint import CheckpointLayout, expected_tensors

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
def test_random_1b_checkpoint_loads_with_no_tokenizer_directory_and_answers(tmp_path):
    """The true LLaMA-3.2-1B layout (128,259 vocabulary rows) loads with only its weight file: the Llama 3
    tokenizer is built from Meta's llama-models into a fresh cache, and a GSM8K question is answered."""
    env = {**os.environ, "CODI_LENS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_scale_load.py"), "--workdir", str(tmp_path),
         "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["n_keys"] == 377
    assert 3.3e9 < report["file_bytes"] < 3.5e9  # codi-reference.md: about 3.39 GB
    assert (tmp_path / "cache").is_dir()  # built there, not in the user's cache
    assert report["question_ids"][0] == 128000 and report["question_ids"].count(128000) == 1  # BOS once
    assert max(report["question_ids"][1:]) < 128000  # the question itself holds no special token
    assert report["eos_id"] == 128009  # <|eot_id|>: Llama-3.2-Instruct CODI stops there
    assert report["latent_shape"] == [1, 7, 2048] and report["latents_finite"]
    # The KV-cache loop against whole-sequence forwards with no cache over the same thoughts.
    assert report["answer_tokens"] == report["reference_answer_tokens"] and len(report["answer_tokens"]) == 4
    assert report["latent_max_abs_diff"] <= 1e-3  # float32, 16 layers, d_model 2048
    # What the test is for: the real 1B layout loads on this 2-core, 24 GiB machine in bounded time and
    # memory (measured: load about 40-90 s depending on the instance, peak about 15 GB with the file
    # written in the same process).
    assert report["load_s"] <= 300
    assert report["peak_rss_gb"] <= 18
