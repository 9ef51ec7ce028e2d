"""Speed of the causal feature screen: one run per feature edit against every edit branching off one trunk.

    python -m benchmarks.feature_screen [--features 64] [--problems 64] [--max-new-tokens 8] [--quick]

Model: the shipped ``toy-chain`` (its answers carry numbers, so the gold answer's log-probability is
defined), with an SAE of ``--features`` random ReLU features at ``thought.3.hook_hidden`` spliced in with its
error term, on the first ``--problems`` problems of its test split. Edits: every feature ablated, clamped to
its largest activation, and the clamp's random-direction control (3 per feature).

- ``naive``: per edit, one batched run over the problems with the edit's hooks: ``run_codi`` for the
  greedy answer and a teacher-forced run of the gold answer number (what a script that loops over features
  does);
- ``library``: ``codi_lens.feature_screen.screen_block``: the problems run once up to thought 3, every edit
  a branch from there, many edits as row blocks of one forward, generation and teacher forcing from one loop.

Prints each way's time and, last, ``speedup <naive / library>x max_abs_diff <largest difference in the gold
number's log-probability change or KL>``; exits 1 above 1e-4 or when a correctness change differs.
``--quick``: 6 features, 6 problems, 4 tokens.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from benchmarks.common import best_time
from codi_lens import Site, load_pretrained
from codi_lens.data import load_problems
from codi_lens.feature_screen import CONTROL, ScreenedFeature, control_seed, screen_block, site_activations
from codi_lens.metrics import gold_number, kl_divergence, number_scores
from codi_lens.saes import feature_edit, site_metadata
from codi_lens.saes.edits import random_direction_edit
from codi_lens.saes.splice import attached

TOLERANCE = 1e-4
SITE = Site("thought.3.hook_hidden")


def random_sae(d_in: int, d_sae: int, seed: int = 0) -> StandardSAE:
    """A ReLU SAE with random weights at :data:`SITE` (about half its features active on a thought)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)
    for key, value in site_metadata(SITE).items():
        cfg.metadata[key] = value
    sae = StandardSAE(cfg)
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_dec": torch.zeros(d_in),
    }
    sae.load_state_dict(state)
    return sae


def naive_rows(model, sae, problems, features, acts, max_new_tokens: int) -> dict:
    """Each edit in a batched run of its own: per (feature, op), the gold log-probability change, KL and the
    change in correctness per problem."""
    questions = [p.question for p in problems]
    with attached(model, [sae], use_error_term=True):
        plain = model.run_codi(questions, max_new_tokens=max_new_tokens)
        numbers = [gold_number(model.tokenizer, t, p.gold) for t, p in zip(plain.answer_tokens, problems)]
        scored = [i for i, n in enumerate(numbers) if n is not None]
        forced = [numbers[i] for i in scored]
        base_logits, base = number_scores(model, [questions[i] for i in scored], forced)
        base_correct = np.array([x == p.gold for x, p in zip(plain.prediction, problems)], dtype=float)
        out = {}
        for feature in features:
            for op in ("ablate", "clamp", CONTROL):
                if op == CONTROL:
                    hooks = random_direction_edit(
                        model,
                        sae,
                        feature.feature,
                        feature.clamp_value,
                        acts[:, feature.feature],
                        control_seed(feature),
                    )
                else:
                    hooks = feature_edit(sae, [feature.feature], op, 0.0 if op == "ablate" else feature.clamp_value)
                result = model.run_codi(questions, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
                subset = hooks if op != CONTROL else _rows(model, sae, feature, acts, scored)
                logits, edited = number_scores(model, [questions[i] for i in scored], forced, fwd_hooks=subset)
                change = np.full(len(problems), np.nan)
                kl = np.full(len(problems), np.nan)
                change[scored] = (edited - base).numpy()
                kl[scored] = kl_divergence(base_logits, logits).numpy()
                correct = np.array([x == p.gold for x, p in zip(result.prediction, problems)], dtype=float)
                out[(feature.feature, op)] = (change, kl, correct - base_correct)
    return out


def _rows(model, sae, feature, acts, rows):
    """The control's hooks for the scored problems only (its push is per problem)."""
    return random_direction_edit(
        model, sae, feature.feature, feature.clamp_value, acts[rows, feature.feature], control_seed(feature)
    )


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="6 features, 6 problems, 4 tokens")
    args = parser.parse_args(argv)
    n_features, n_problems = (6, 6) if args.quick else (args.features, args.problems)
    tokens = 8 if args.quick else args.max_new_tokens
    model = load_pretrained()
    sae = random_sae(model.cfg.d_model, n_features)
    problems = load_problems("toy-chain:test", limit=n_problems)
    acts = site_activations(model, sae, [p.question for p in problems])
    features = [ScreenedFeature(SITE.id, f, float(acts[:, f].max())) for f in range(n_features)]

    naive_s, naive = best_time(lambda: naive_rows(model, sae, problems, features, acts, tokens))
    library_s, rows = best_time(lambda: screen_block(model, sae, problems, features, max_new_tokens=tokens))
    worst, differing = 0.0, 0
    for (feature, op), (change, kl, correct) in naive.items():
        mine = rows[(rows["feature"] == feature) & (rows["op"] == op)]
        inactive = ~mine["active"].to_numpy() if op == "ablate" else np.zeros(len(problems), dtype=bool)
        change, kl, correct = (np.where(inactive, 0.0, x) for x in (change, kl, correct))
        for ours, theirs in ((mine["gold_logprob_change"], change), (mine["kl"], kl)):
            both = ~np.isnan(theirs)
            worst = max(worst, float(np.abs(ours.to_numpy()[both] - theirs[both]).max(initial=0.0)))
        differing += int((mine["correct_change"].to_numpy() != correct).sum())
    edits = len(naive)
    print(f"toy-chain, SAE of {n_features} random features at {SITE.id}; {n_problems} problems, {edits} edits")
    print(f"naive    {naive_s:8.2f} s  ({edits * n_problems / naive_s:.0f} edit-problems/s)")
    print(f"library  {library_s:8.2f} s  ({edits * n_problems / library_s:.0f} edit-problems/s)")
    print(f"correctness changes that differ: {differing}")
    ratio = naive_s / library_s
    print(f"speedup {ratio:.1f}x max_abs_diff {worst:.2e}")
    if worst > TOLERANCE or differing:
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
