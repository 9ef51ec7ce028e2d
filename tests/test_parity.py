"""codi_lens against the independent HF + peft reference of CODI inference (fp32, CPU).

Latent states, fed-back thoughts and every step's logits must agree to 1e-4 (max abs, fp32), and
greedy answers must be identical token for token, for LLaMA (GQA, llama3 rope scaling, tied
embeddings) and GPT-2 (Conv1D LoRA), .bin and .safetensors, with and without LoRA and prj LayerNorm.
"""

from __future__ import annotations

import pytest
import torch

from codi_lens import load_codi

ATOL = 1e-4
MAX_NEW = 12
CASES = [
    ("llama", "safetensors", True, True),
    ("llama", "bin", True, False),
    ("llama", "safetensors", False, True),
    ("gpt2", "bin", True, True),
    ("gpt2", "safetensors", True, False),
    ("gpt2", "bin", False, True),
]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(("family", "fmt", "use_lora", "prj_ln"), CASES)
def test_single_questions_match_reference(tiny_checkpoint, questions, family, fmt, use_lora, prj_ln):
    ckpt = tiny_checkpoint(family, fmt, use_lora, prj_ln)
    model = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    reference = ckpt.reference()
    lengths = set()
    for question in questions:
        ours = model.run_codi([question], max_new_tokens=MAX_NEW, return_logits=True)
        ref = reference.run(question, n_latents=6, max_new_tokens=MAX_NEW)
        lengths.add(ours.positions.bot - ours.positions.n_pad[0])
        assert ours.answer_tokens[0] == ref["answer_tokens"]
        assert ours.answer_text[0] == ref["answer_text"]
        assert ours.latent_states.shape == (1, 7, model.cfg.d_model)
        assert _max_diff(ours.latent_states[0], ref["latent_states"]) <= ATOL
        assert _max_diff(ours.thought_embeds[0], ref["thought_embeds"]) <= ATOL
        assert ours.step_logits.shape[1] == ref["step_logits"].shape[0]
        assert _max_diff(ours.step_logits[0], ref["step_logits"]) <= ATOL
    assert len(lengths) == len(questions), "questions should have different token lengths"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_matches_one_question_at_a_time(tiny_checkpoint, questions, family):
    """Left padding, masks and position ids make a batch identical to single runs (upstream is not)."""
    ckpt = tiny_checkpoint(family)
    model = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    batch = model.run_codi(questions, max_new_tokens=MAX_NEW)
    assert len(set(batch.positions.n_pad)) > 1, "the batch must actually be padded"
    for i, question in enumerate(questions):
        alone = model.run_codi([question], max_new_tokens=MAX_NEW)
        assert _max_diff(batch.latent_states[i], alone.latent_states[0]) <= ATOL
        assert _max_diff(batch.thought_embeds[i], alone.thought_embeds[0]) <= ATOL
        assert batch.answer_tokens[i] == alone.answer_tokens[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_teacher_forced_scores_match_reference_and_generation(tiny_checkpoint, questions, family):
    ckpt = tiny_checkpoint(family)
    model = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    reference = ckpt.reference()
    generated = model.run_codi(questions, max_new_tokens=MAX_NEW, return_logits=True)
    answers = ["The answer is: 18", "The answer is: 1234", generated.answer_text[2]]
    scores = model.score_answers(questions, answers)
    n_latents = 6
    for i, (question, answer) in enumerate(zip(questions, answers)):
        n = int(scores.answer_mask[i].sum())
        ref = reference.teacher_forced_logits(question, answer, n_latents=n_latents)
        assert ref.shape[0] == n
        assert _max_diff(scores.logits[i, :n], ref) <= ATOL
    # Teacher-forcing the model's own greedy tokens reproduces the generation's logits.
    own = model.score_answers(questions, generated.answer_tokens)
    for i, tokens in enumerate(generated.answer_tokens):
        rows = generated.step_logits[i, n_latents + 1 : n_latents + 1 + len(tokens)]
        assert _max_diff(own.logits[i, : len(tokens)], rows) <= ATOL
    # Log-probabilities of the forced tokens against the reference's own log-softmax.
    log_probs = scores.log_probs_of_answers()
    for i, (question, answer) in enumerate(zip(questions, answers)):
        n = int(scores.answer_mask[i].sum())
        ref = reference.teacher_forced_logits(question, answer, n_latents=n_latents).float().log_softmax(-1)
        expected = ref.gather(-1, scores.answer_tokens[i, :n, None])[:, 0]
        assert _max_diff(log_probs[i, :n], expected) <= ATOL
        assert (log_probs[i, n:] == 0).all()


def test_bfloat16_runs_close_to_float32(tiny_checkpoint, questions):
    """bf16 is lossy: require finite results and latents within cosine 0.99 of fp32 (measured ~0.999)."""
    ckpt = tiny_checkpoint("llama")
    fp32 = load_codi(ckpt.checkpoint_dir, ckpt.base_dir).run_codi(questions, max_new_tokens=4)
    model = load_codi(ckpt.checkpoint_dir, ckpt.base_dir, dtype=torch.bfloat16)
    bf16 = model.run_codi(questions, max_new_tokens=4)
    assert bf16.latent_states.dtype == torch.bfloat16
    assert torch.isfinite(bf16.latent_states.float()).all()
    cosine = torch.nn.functional.cosine_similarity(bf16.latent_states.float(), fp32.latent_states, dim=-1)
    assert cosine.min() >= 0.99, cosine


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_explicit_generation_matches_reference(tiny_checkpoint, questions, family):
    """Teacher mode (no BOT, no thoughts): batched greedy decoding equals HF one question at a time."""
    ckpt = tiny_checkpoint(family)
    model = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    reference = ckpt.reference()
    result = model.generate_explicit(questions, max_new_tokens=MAX_NEW)
    for i, question in enumerate(questions):
        assert result.answer_tokens[i] == reference.generate_plain(question, max_new_tokens=MAX_NEW)
