"""SIM-CoT checkpoints: CODI's or Coconut's file plus a training-only auxiliary decoder. codi_lens names the
decoder, leaves it unread, and runs the loop as the independent references run upstream's inference (fp32)."""

from __future__ import annotations

import re

import pytest
import torch
from coconut_reference import ReferenceCoconut
from hf_reference import ReferenceCODI
from transformers import AutoTokenizer
from upstream_factory import (
    build_coconut_module,
    build_codi_module,
    make_base_dir,
    save_codi_checkpoint,
    with_sim_cot_decoder,
)

from codi_lens import CheckpointError, load_codi
from codi_lens.loading.inspect import summarize_checkpoint

ATOL = 1e-4
MAX_NEW = 8


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def sim_cot_codi(tmp_path_factory):
    root = tmp_path_factory.mktemp("simcot-codi")
    base = make_base_dir(root / "base", "llama")
    module = with_sim_cot_decoder(build_codi_module(base, lora_r=8, prj_dim=96, base_dtype=torch.float32), base)
    save_codi_checkpoint(module, root / "checkpoint", "safetensors")
    return root / "checkpoint", base, module


def test_sim_cot_codi_runs_as_the_reference(sim_cot_codi, questions):
    checkpoint, base, module = sim_cot_codi
    model = load_codi(checkpoint, base)
    reference = ReferenceCODI(module, AutoTokenizer.from_pretrained(str(base)))
    assert any(k.startswith("decoder.") for k in module.state_dict())
    for question in questions:
        ours = model.run_codi([question], max_new_tokens=MAX_NEW)
        ref = reference.run(question, n_latents=6, max_new_tokens=MAX_NEW)
        assert _max_diff(ours.latent_states[0], ref["latent_states"]) <= ATOL
        assert ours.answer_tokens[0] == ref["answer_tokens"]
    summary = summarize_checkpoint(checkpoint)
    decoder_keys = sum(k.startswith("decoder.") for k in module.state_dict())
    assert (summary["trained_with"], summary["auxiliary_keys"]) == ("SIM-CoT", decoder_keys)


def test_sim_cot_coconut_runs_as_the_reference(tmp_path, questions):
    base = make_base_dir(tmp_path / "base", "gpt2")
    module = with_sim_cot_decoder(build_coconut_module(base), base)
    file = tmp_path / "checkpoint_3"
    torch.save(module.state_dict(), file)
    model = load_codi(file, base)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    for token in ("<|start-latent|>", "<|end-latent|>", "<|latent|>"):
        tokenizer.add_tokens(token)
    reference = ReferenceCoconut(module, tokenizer)
    for question in questions:
        ours = model.run_codi([question], max_new_tokens=MAX_NEW)
        ref = reference.run(question, n_latents=6, max_new_tokens=MAX_NEW)
        assert _max_diff(ours.latent_states[0], ref["latent_states"]) <= ATOL
        assert ours.answer_text[0] == ref["answer_text"]
    assert summarize_checkpoint(file)["trained_with"] == "SIM-CoT"


def test_stray_keys_under_the_decoder_prefix_are_named(sim_cot_codi, tmp_path):
    checkpoint, base, module = sim_cot_codi
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    state["pj_in.weight"] = torch.zeros(4, 4)
    (tmp_path / "c").mkdir()
    save_file(state, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape("'pj_in.weight'") + ".*no token embedding"):
        load_codi(tmp_path / "c", base)
