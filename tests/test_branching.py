"""Branches of one trunk against one full run per intervention: every start, teacher-forced logits
(all rows and one row), generation with rows leaving the batch at EOS, and step importance against
the naive way (one problem and one ablation per run)."""

from __future__ import annotations

import pytest
import torch

from codi_lens import load_codi
from codi_lens.core.branching import QUESTION, Branch, grow_trunk, run_branches
from codi_lens.data import load_problems
from codi_lens.importance import ablation_grid, ablation_hooks, importance_rows, problem_seed
from codi_lens.interventions import (
    AblationInputs,
    knockout_attention,
    mean_thought_embeds,
    steer,
    zero_at,
    zero_thoughts,
)
from codi_lens.metrics import find_answer_number, forced_answers, kl_divergence, logits_at_answer

N = 6


@pytest.fixture(scope="module")
def toy():
    return load_codi("toy-arith"), load_problems("toy:test", limit=8)


def _cases(model):
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return [
        ([], QUESTION),
        ([], 0),
        ([], 4),
        ([], N + 1),
        (zero_at(model, "blocks.0.hook_resid_post", ["question:-1"]), QUESTION),
        (steer(model, "blocks.1.hook_resid_post", ["bot"], vector), 0),
        (knockout_attention(model, ["thought:1"], layers=[0]), 2),
        (steer(model, "blocks.1.hook_resid_post", ["thought:2", "eot"], vector), 2),
        (zero_thoughts([3]), 3),
        (steer(model, "blocks.0.hook_mlp_out", ["eot"], vector), N + 1),
    ]


def test_branches_at_every_start_equal_one_full_run_per_intervention(llama_model, questions):
    model = llama_model
    answers = [[5, 6, 7], [8, 9], [10]]
    cases = _cases(model)
    trunk = grow_trunk(model, questions)
    branches = [Branch(hooks, start) for hooks, start in cases]
    together = run_branches(model, trunk, branches, answers, max_rows=2 * len(questions))  # groups split in two
    one_row = run_branches(model, trunk, branches, answers, answer_index=[2, 1, 0])
    mask = model.tokenize_answers(answers)[1].bool()
    for (hooks, start), out, at in zip(cases, together, one_row):
        alone = model.score_answers(questions, answers, fwd_hooks=hooks).logits
        assert (out.logits[mask] - alone[mask]).abs().max() <= 1e-5, start
        assert (at.logits[:, 0] - alone[torch.arange(3), torch.tensor([2, 1, 0])]).abs().max() <= 1e-5, start
    # Hooks that would act before the branch's start are refused, not silently dropped.
    for hooks in (zero_thoughts([3]), steer(model, "blocks.1.hook_resid_post", ["thought:2"], torch.ones(64))):
        with pytest.raises(ValueError, match="before the branch's start"):
            run_branches(model, trunk, [Branch(hooks, 3 + 1)], answers)


def test_branch_generation_equals_run_codi_and_rows_leave_at_eos(toy):
    model, problems = toy
    questions = [p.question for p in problems]
    push = 8 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    in_answer = steer(model, "blocks.1.hook_resid_post", ["answer:3"], push)  # acts where the number is predicted
    cases = [([], N + 1), (zero_thoughts(range(1, N + 1)), 1), (zero_thoughts([2]), 2), *_cases(model)[4:]]
    cases.append((in_answer, N + 1))
    trunk = grow_trunk(model, questions)
    outs = run_branches(model, trunk, [Branch(h, s) for h, s in cases], max_new_tokens=24, max_rows=16)
    lengths = set()
    for (hooks, start), out in zip(cases, outs):
        expected = model.run_codi(questions, max_new_tokens=24, fwd_hooks=hooks).answer_tokens
        assert out.answer_tokens == expected, start
        lengths |= {len(a) for a in expected}
    assert len(lengths) > 2  # rows finished at different steps, so some left the batch early
    plain = model.run_codi(questions, max_new_tokens=24).answer_tokens
    assert outs[-1].answer_tokens != plain  # the answer-position hook changed what was generated


def test_step_importance_rows_equal_the_naive_way(toy):
    """Every intervention and scope: predictions and KL equal one run_codi and one teacher-forced run
    per (problem, ablation), each problem on its own."""
    model, problems = toy
    questions = [p.question for p in problems]
    ablations = ablation_grid(n_latents=N)
    means = mean_thought_embeds(model, questions)
    donors = model.run_codi(questions[1:] + questions[:1], max_new_tokens=1).thought_embeds
    seeds = [problem_seed(p.id, 0) for p in problems]

    def inputs_for(baseline):
        return AblationInputs(baseline.thought_embeds, donors, means, seeds, 0)

    rows = importance_rows(model, problems, ablations, inputs_for, max_new_tokens=24, max_rows=40)
    for i in (0, 5):
        q = [questions[i]]
        baseline = model.run_codi(q, max_new_tokens=24)
        number = find_answer_number(model.tokenizer, baseline.answer_tokens[0])
        reference = logits_at_answer(model, q, [number])
        reference_first = model.score_answers(q, forced_answers([number])).logits[:, 0]
        one = AblationInputs(baseline.thought_embeds, donors[i : i + 1], means, seeds[i : i + 1], 0)
        for ablation in ablations:
            hooks = ablation_hooks(ablation, one, N)
            result = model.run_codi(q, max_new_tokens=24, fwd_hooks=hooks)
            kl = float(kl_divergence(reference, logits_at_answer(model, q, [number], fwd_hooks=hooks))[0])
            first = model.score_answers(q, forced_answers([number]), fwd_hooks=hooks).logits[:, 0]
            kl_first = float(kl_divergence(reference_first, first)[0])
            row = rows[
                (rows.problem_id == problems[i].id)
                & (rows.intervention == ablation.intervention)
                & (rows.scope == ablation.scope)
                & (rows.thought == ablation.thought)
            ].iloc[0]
            assert row.answer_text == result.answer_text[0], ablation
            assert abs(row.kl - kl) <= 1e-4, ablation
            assert abs(row.kl_first_token - kl_first) <= 1e-4, ablation
