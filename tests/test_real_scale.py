"""Real scale: a random checkpoint with the true LLaMA-3.2-1B layout loads and answers on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codi_lens.architectures import describe_base
from codi_lens.checkpoint import CheckpointLayout, expected_tensors

ROOT = Path(__file__).resolve().parents[1]


def test_expected_layout_of_the_real_1b_checkpoint_matches_upstream_module():
    """codi_lens' expected keys equal the state dict of an upstream-style CODI module on meta (377 keys)."""
    from codi_factory import build_codi_module, make_base_dir

    base = make_base_dir(Path(__import__("tempfile").mkdtemp()) / "base", "llama", size="llama-3.2-1b")
    module = build_codi_module(base, lora_r=128, prj_dim=2048, device="meta")
    upstream = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    arch = describe_base("llama-3.2-1b-instruct")
    layout = CheckpointLayout("llama", True, 128, 2048, True, 16, arch.codi_vocab)
    assert len(upstream) == 377
    assert expected_tensors(arch, layout) == upstream


@pytest.mark.slow
def test_random_1b_checkpoint_loads_and_answers(tiny_checkpoint, tmp_path):
    tokenizer_dir = tiny_checkpoint("llama").base_dir
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_scale_load.py"), "--tokenizer", str(tokenizer_dir),
         "--workdir", str(tmp_path), "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["n_keys"] == 377
    assert report["latent_shape"] == [1, 7, 2048] and report["latents_finite"]
    assert len(report["answer_tokens"]) == 4
    assert 3.3e9 < report["file_bytes"] < 3.5e9  # codi-reference.md: about 3.39 GB
