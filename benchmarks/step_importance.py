"""Speed of step importance (zero-ablation of each thought, and cumulative): one run per problem and
ablation against ablations branching off each batch's baseline.

    python -m benchmarks.step_importance [--problems 64] [--max-new-tokens 8] [--quick]
                                         [--device cpu] [--dtype float32]

Model: the benchmark model (``benchmarks.common``), on the first ``--problems`` problems of the
synthetic test split. Ablations: zero at thought k alone and at thoughts 1..k, k = 1..6 (12 per
problem). Both ways produce, per (problem, ablation), the generated answer (greedy, up to
``--max-new-tokens``; random weights seldom stop early) and ``KL(baseline || ablated)`` at the first
answer token, teacher-forced on the baseline's own answer.

- ``naive``: per problem, the baseline ``run_codi`` and a teacher-forced baseline run, then per
  ablation one ``run_codi`` with its hooks and one teacher-forced run with its hooks, each problem on
  its own (what past scripts did, without the teacher-forced half);
- ``library``: ``codi_lens.importance.step_importance`` (batches of 32 problems, written to a
  resumable result store): the baseline once per batch, every ablation branching off it at its first
  thought, ablations of one start batched, generation and teacher forcing from one loop, rows leaving
  the batch at EOS, logits only where read.

Prints each way's time, whether every generated answer agrees, and, last,
``speedup <naive / library>x max_abs_diff <largest KL difference>``; exits 1 if that passes 1e-4 or an
answer differs. ``--quick``: 2 layers, 6 problems, 4 tokens.
"""

from __future__ import annotations

import argparse

import pandas as pd

from benchmarks.common import add_device_args, bench_model, bench_problems, best_time, describe, zero_step_importance
from codi_lens.importance import ablation_grid, ablation_hooks
from codi_lens.interventions import AblationInputs
from codi_lens.metrics import AnswerNumber, forced_answers, kl_divergence

TOLERANCE = 1e-4


def naive_rows(model, problems, ablations, max_new_tokens: int) -> pd.DataFrame:
    """One problem and one ablation per run: generated answer and KL at the first answer token."""
    rows = []
    for problem in problems:
        q = [problem.question]
        baseline = model.run_codi(q, max_new_tokens=max_new_tokens)
        answer = forced_answers([AnswerNumber(0, (), baseline.answer_tokens[0][0], "")])
        reference = model.score_answers(q, answer).logits[:, 0]
        inputs = AblationInputs(baseline.thought_embeds, None, None, [0], 0)
        for ablation in ablations:
            hooks = ablation_hooks(ablation, inputs, 6)
            result = model.run_codi(q, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
            logits = model.score_answers(q, answer, fwd_hooks=hooks).logits[:, 0]
            rows.append(
                {
                    "problem_id": problem.id,
                    "scope": ablation.scope,
                    "thought": ablation.thought,
                    "answer_text": result.answer_text[0],
                    "kl_first_token": float(kl_divergence(reference.float(), logits.float())[0]),
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 layers, 6 problems, 4 tokens")
    add_device_args(parser)
    args = parser.parse_args(argv)
    model = bench_model(args, n_layers=2 if args.quick else None)
    problems = bench_problems(6 if args.quick else args.problems)
    tokens = 4 if args.quick else args.max_new_tokens
    ablations = ablation_grid(["zero"], ["single", "cumulative"])

    naive_s, naive = best_time(lambda: naive_rows(model, problems, ablations, tokens))
    library_s, ours = best_time(lambda: zero_step_importance(model, problems, tokens))
    keys = ["problem_id", "scope", "thought"]
    both = naive.merge(ours, on=keys, suffixes=("_naive", "_library"))
    if len(both) != len(naive) or len(naive) != len(problems) * len(ablations):
        raise SystemExit(f"the two tables do not cover the same rows ({len(naive)}, {len(ours)}, {len(both)} shared)")
    same = int((both["answer_text_naive"] == both["answer_text_library"]).sum())
    difference = float((both["kl_first_token_naive"] - both["kl_first_token_library"]).abs().max())
    print(f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocabulary {model.cfg.d_vocab}; {describe(args)}")
    print(f"{len(problems)} problems x {len(ablations)} ablations, up to {tokens} generated tokens each")
    print(f"naive    {naive_s:8.2f} s  ({len(problems) * 3600 / naive_s:.0f} problems/hour)")
    print(f"library  {library_s:8.2f} s  ({len(problems) * 3600 / library_s:.0f} problems/hour)")
    print(f"generated answers identical: {same} of {len(both)}")
    ratio = naive_s / library_s
    print(f"speedup {ratio:.1f}x max_abs_diff {difference:.2e}")
    if difference > TOLERANCE or same != len(both):
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
