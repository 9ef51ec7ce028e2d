"""Coconut checkpoints: strict loading, parity with the independent HF reference of upstream's inference
(fp32, CPU, 1e-4), batch invariance, and what a loop without a projection head refuses."""

from __future__ import annotations

import re

import pytest
import torch
from coconut_reference import ReferenceCoconut
from upstream_factory import make_tiny_coconut

from codi_lens import CheckpointError, load_codi
from codi_lens.core.errors import HookNameError
from codi_lens.loading.inspect import format_summary, summarize_checkpoint

ATOL = 1e-4
MAX_NEW = 10


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def coconut(request, tmp_path_factory):
    """``(checkpoint file, base dir, codi_lens model, reference)`` of a tiny Coconut checkpoint."""
    file, base = make_tiny_coconut(tmp_path_factory.mktemp(f"coconut-{request.param}"), request.param)
    return file, base, load_codi(file, base), ReferenceCoconut.from_checkpoint(file, base)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_single_questions_match_reference(coconut, questions):
    _, _, model, reference = coconut
    assert model.latent_loop.method == "coconut" and model.prj is None
    for question in questions:
        ours = model.run_codi([question], max_new_tokens=MAX_NEW, return_logits=True)
        ref = reference.run(question, n_latents=6, max_new_tokens=MAX_NEW)
        assert ours.latent_states.shape == ref["latent_states"][None].shape
        assert _max_diff(ours.latent_states[0], ref["latent_states"]) <= ATOL
        # Coconut feeds h_{k-1} itself at thought k.
        assert torch.equal(ours.thought_embeds[0], ours.latent_states[0, :-1])
        assert _max_diff(ours.step_logits[0, 7], ref["first_logits"]) <= ATOL  # the first answer token's
        assert ours.answer_text[0] == ref["answer_text"]
        assert [t for t in ours.answer_tokens[0] if t != model.codi_tokens.eos] == ref["answer_tokens"]


def test_questions_are_written_and_read_as_upstream(coconut, questions):
    _, _, model, reference = coconut
    tokens, mask = model.tokenize_questions(questions[:1])
    expected = reference.input_ids(questions[0], 0)[:-2]  # without the start and end markers
    assert tokens[0, mask[0].bool()].tolist() == expected
    assert model.codi_tokens.bot == reference.start_id and model.codi_tokens.eot == reference.end_id
    assert model.latent_loop.prediction("Tom has 3 apples\n### 1,234") == 1234.0
    assert model.latent_loop.prediction("### 12 apples") is None  # upstream compares the whole tail
    assert model.latent_loop.answer_text(18.0) == "### 18"


def test_batch_is_invariant(coconut, questions):
    _, _, model, _ = coconut
    batch = model.run_codi(questions, max_new_tokens=MAX_NEW)
    for i, question in enumerate(questions):
        alone = model.run_codi([question], max_new_tokens=MAX_NEW)
        assert _max_diff(batch.latent_states[i], alone.latent_states[0]) <= ATOL
        assert batch.answer_tokens[i] == alone.answer_tokens[0]


def test_projection_hooks_are_refused_by_name(coconut, questions):
    _, _, model, _ = coconut
    for name in ("thought.2.hook_projection", "prj.hook_out"):
        with pytest.raises(HookNameError, match=re.escape(name) + ".*coconut.*no projection head"):
            model.run_codi(questions[:1], max_new_tokens=2, fwd_hooks=[(name, lambda x, hook: x)])
    names = model.hook_names_of_run()
    assert "thought.1.hook_hidden" in names and not any("projection" in n or n.startswith("prj.") for n in names)


def test_thought_input_hook_changes_what_is_fed(coconut, questions):
    """A hook on thought 3's input feeds the reference's hidden state computed with that input."""
    _, _, model, _ = coconut
    zero = model.run_codi(
        questions[:1], max_new_tokens=2, fwd_hooks=[("thought.3.hook_input", lambda x, hook: torch.zeros_like(x))]
    )
    plain = model.run_codi(questions[:1], max_new_tokens=2)
    assert torch.equal(zero.thought_embeds[0, 2], torch.zeros(model.cfg.d_model))
    assert torch.equal(zero.latent_states[0, :3], plain.latent_states[0, :3])
    assert _max_diff(zero.latent_states[0, 3], plain.latent_states[0, 3]) > 1e-3


def test_inspect_names_the_method(coconut):
    file, *_ = coconut
    summary = summarize_checkpoint(file)
    assert summary["method"] == "coconut" and summary["prj_dims"] is None
    assert "Coconut" in format_summary(summary)


def test_bad_coconut_files_are_named(coconut, tmp_path):
    file, base, *_ = coconut
    state = torch.load(file, weights_only=True)
    norm = next(k for k in state if k.endswith(("model.norm.weight", "ln_f.weight")))
    broken = {k: v for k, v in state.items() if k != norm}
    broken["base_causallm.extra.weight"] = torch.zeros(2)
    path = tmp_path / "checkpoint_1"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): '" + re.escape(norm) + r"'.*1 unexpected key"):
        load_codi(path, base)
    without_alias = {k: v for k, v in state.items() if k != "embedding.weight"}  # a converted file may drop it
    torch.save(without_alias, path)
    assert load_codi(path, base).latent_loop.method == "coconut"
