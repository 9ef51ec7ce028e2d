"""Coconut training: the curriculum's batches by hand, the stage schedule, fresh optimizer moments at each stage,
and an export that loads strictly and reproduces the training loop (fp32, 1e-4)."""

from __future__ import annotations

import torch

from codi_lens import load_codi
from codi_lens.data.synthetic import build_tokenizer, generate_problems
from codi_lens.training.coconut import (
    ANSWER_SYMBOLS,
    CoconutModule,
    chain_steps,
    coconut_losses,
    coconut_stage,
    make_coconut_batch,
)
from codi_lens.training.config import TrainConfig
from codi_lens.training.export import export_codi
from codi_lens.training.losses import latent_forward
from codi_lens.training.module import add_codi_tokens, build_llama_lm
from codi_lens.training.trainer import Trainer

SHAPE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 64}


def _setup(**cfg):
    tok = build_tokenizer(extra_symbols=ANSWER_SYMBOLS)
    lm = build_llama_lm(len(tok), seed=0, **SHAPE)
    base_vocab = add_codi_tokens(lm)
    config = TrainConfig(method="coconut", batch_size=8, warmup_steps=2, stage_steps=2, cot_text="solution",
                         drop_last_cot_step=False, **cfg)  # fmt: skip
    return tok, CoconutModule(lm), base_vocab, config


def _words(tok, ids) -> list[str]:
    return [tok.convert_ids_to_tokens(i) if i < len(tok) else f"<{i - len(tok)}>" for i in ids]


def test_chain_steps_end_at_each_span():
    problem = generate_problems(1, seed=3, cot_days=True)[0]
    steps = chain_steps(problem, "solution")
    assert len(steps) == problem.n_steps
    assert all(s.count("<<") == 1 and s.endswith(">>") for s in steps)
    assert " ".join(steps) == problem.solution.rsplit("####", 1)[0].strip()


def test_batch_replaces_the_first_steps_by_latents_stage_by_stage():
    tok, _, base_vocab, cfg = _setup()
    problem = next(p for p in generate_problems(20, seed=1, cot_days=True) if p.n_steps >= 3)
    steps = chain_steps(problem, "solution")
    for stage in (0, 2, 6):
        batch = make_coconut_batch([problem], tok, base_vocab, cfg, stage)
        prompt = batch.prompt_ids[0, batch.prompt_mask[0].bool()].tolist()
        chunk = batch.answer_ids[0, batch.answer_mask[0].bool()].tolist()
        labels = [t for t in batch.answer_labels[0].tolist() if t != -100]
        question = tok(problem.question + "\n")["input_ids"]
        assert prompt == question + [base_vocab]  # <|start-latent|> = V
        assert batch.n_latents == stage
        written = " ".join(steps[stage:]) if stage < 6 else ""
        expected = tok(f"{written} ### {problem.answer_value}", add_special_tokens=False)["input_ids"]
        assert chunk == [base_vocab + 1] + expected  # <|end-latent|> = V + 1, then the rest
        assert labels == expected + [tok.eos_token_id]
        assert _words(tok, expected[-4:]) == ["#", "#", "#", str(problem.answer_value)]


def test_stages_follow_the_schedule_and_stop_at_the_last():
    cfg = TrainConfig(method="coconut", stage_steps=3, n_latents=6, thoughts_per_step=2)
    assert [coconut_stage(s, cfg) for s in (0, 2, 3, 8, 9, 100)] == [0, 0, 1, 2, 3, 3]


def test_a_new_stage_starts_with_fresh_optimizer_moments():
    tok, model, base_vocab, cfg = _setup(steps=3)
    trainer = Trainer(model, tok, base_vocab, cfg, generate_problems(16, seed=2, cot_days=True))
    trainer.train_step()
    trainer.train_step()  # step 1: still stage 0
    moments = {id(p): trainer.optimizer.state[p]["exp_avg"].clone() for p in model.parameters()}
    assert all(m.abs().sum() > 0 for m in moments.values() if m.numel())
    trainer.train_step()  # step 2: stage 1, moments start again from this step's gradient alone
    for p in model.parameters():
        state = trainer.optimizer.state[p]
        assert int(state["step"]) == 1
        assert torch.allclose(state["exp_avg"], (1 - 0.9) * p.grad, atol=1e-7)


def test_export_loads_strictly_and_matches_the_training_loop(tmp_path):
    tok, model, base_vocab, cfg = _setup()
    problems = generate_problems(3, seed=4, cot_days=True)
    trainer = Trainer(model, tok, base_vocab, cfg, generate_problems(16, seed=2, cot_days=True))
    trainer.train_step()
    export_codi(model, tok, tmp_path / "export")
    hooked = load_codi(tmp_path / "export", tmp_path / "export")
    assert hooked.latent_loop.method == "coconut" and hooked.prj is None
    batch = make_coconut_batch(problems, tok, base_vocab, cfg, stage=6)
    model.eval()
    with torch.no_grad():
        logits, _, thoughts = latent_forward(
            model.base_causallm, lambda h: h, batch.prompt_ids, batch.prompt_mask, batch.answer_ids,
            batch.answer_mask, 6,
        )  # fmt: skip
        assert coconut_losses(model, batch, cfg)["loss"] > 0
    scores = hooked.score_answers(
        [p.question for p in problems], [f"### {p.answer_value}" for p in problems], append_eos=True
    )
    run = hooked.run_latents([p.question for p in problems])
    for i in range(len(problems)):
        n = int(scores.answer_mask[i].sum())
        assert (scores.logits[i, :n] - logits[i, :n]).abs().max() <= 1e-4
        assert (run.latent_states[i, 1:] - thoughts[-1][i]).abs().max() <= 1e-4  # h_1..h_6
