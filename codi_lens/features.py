"""What an SAE feature of a continuous thought stands for: top examples, frequency, position profile, tokens.

- :func:`feature_frequency`: per feature, how often it is active on a problem set and how strongly.
- :func:`top_examples`: the problems on which a feature is most active, with the question, the thought,
  the gold answer and the chain's intermediate values (what a researcher checks a feature against).
- :func:`position_profile`: the SAE of one site applied to the same hook at every thought (an SAE
  trained on ``blocks.1.hook_resid_post@3`` read at thoughts 0..6): where in the chain a feature fires.
- :func:`token_association`: which answer tokens a feature intervention makes more or less frequent:
  per token, answers containing it in the intervened run against the reference run, a smoothed
  log-odds ratio, Fisher's exact test (``scipy.stats.fisher_exact``) and Benjamini-Hochberg q-values
  (``statsmodels``' ``multipletests``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from sae_lens import SAE
from statsmodels.stats.multitest import multipletests
from torch import Tensor

from codi_lens.activations import ActivationDataset, Site
from codi_lens.data import Problem
from codi_lens.saes import encode_decode, sae_site


def feature_frequency(acts: Float[Tensor, "n d_sae"]) -> pd.DataFrame:
    """One row per feature: ``frequency`` (share of rows where it is active), ``mean_when_active`` and
    ``max_activation``."""
    active = acts > 0
    count = active.sum(0)
    total = torch.where(active, acts, torch.zeros_like(acts)).sum(0)
    return pd.DataFrame(
        {
            "feature": np.arange(acts.shape[1]),
            "frequency": (count.float() / max(1, len(acts))).numpy(),
            "mean_when_active": (total / count.clamp(min=1)).numpy(),
            "max_activation": acts.max(0).values.numpy() if len(acts) else np.zeros(acts.shape[1]),
        }
    )


def top_examples(
    acts: Float[Tensor, "n d_sae"],
    problems: Sequence[Problem],
    features: Sequence[int],
    *,
    k: int = 10,
    site: Site | None = None,
    predictions: Sequence[float | None] | None = None,
) -> pd.DataFrame:
    """The ``k`` problems (rows of ``acts``, in the order of ``problems``) with the highest activation of
    each feature, active ones only: ``feature, rank, problem_id, activation, question, thought, gold,
    intermediates`` (the chain's values, ``;``-joined) and ``prediction`` when given."""
    if len(acts) != len(problems):
        raise ValueError(f"{len(acts)} activation rows for {len(problems)} problems")
    rows = []
    for feature in features:
        column = acts[:, feature]
        order = torch.argsort(column, descending=True)[:k]
        for rank, i in enumerate(order.tolist()):
            if column[i] <= 0:
                break
            p = problems[i]
            rows.append(
                {
                    "feature": int(feature),
                    "rank": rank,
                    "problem_id": p.id,
                    "activation": float(column[i]),
                    "question": p.question,
                    "thought": None if site is None else site.thought,
                    "gold": p.gold,
                    "intermediates": ";".join(f"{v:g}" for v in p.intermediates),
                    "prediction": None if predictions is None else predictions[i],
                }
            )
    return pd.DataFrame(rows)


def position_profile(sae: SAE, dataset: ActivationDataset, thoughts: Sequence[int]) -> pd.DataFrame:
    """The SAE applied to its own hook at each of ``thoughts`` (the dataset must hold those sites): one row
    per (feature, thought) with ``frequency`` and ``mean_activation``; ``own`` marks the SAE's thought."""
    site = sae_site(sae)
    frames = []
    for other in (site.at(k) for k in thoughts):
        rows, _ = dataset.load(other)
        acts, _ = encode_decode(sae, rows)
        frames.append(
            pd.DataFrame(
                {
                    "feature": np.arange(acts.shape[1]),
                    "thought": other.thought,
                    "frequency": (acts > 0).float().mean(0).cpu().numpy(),
                    "mean_activation": acts.mean(0).cpu().numpy(),
                    "own": other.thought == site.thought,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def token_association(
    reference: Sequence[Sequence[str]],
    intervened: Sequence[Sequence[str]],
    *,
    prior: float = 0.5,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Tokens whose presence in the answers shifts under an intervention.

    ``reference`` and ``intervened`` hold each answer's tokens (as strings, e.g. the model tokenizer's
    ``convert_ids_to_tokens``), one list per problem. Per token: ``n_reference`` / ``n_intervened``
    answers containing it (out of ``total_reference`` / ``total_intervened``), ``log_odds`` (the
    intervened-vs-reference log odds ratio of containing it, each cell smoothed by ``prior``),
    ``p_value`` (two-sided Fisher exact test on the 2x2 table), ``q_value`` (Benjamini-Hochberg over the
    tokens tested) and ``significant`` (q < ``alpha``). Sorted by p-value."""
    ref_sets = [set(a) for a in reference]
    int_sets = [set(a) for a in intervened]
    tokens = sorted(set().union(*ref_sets, *int_sets))
    n_ref, n_int = len(ref_sets), len(int_sets)
    rows = []
    for token in tokens:
        a = sum(token in s for s in int_sets)
        c = sum(token in s for s in ref_sets)
        table = [[a, n_int - a], [c, n_ref - c]]
        log_odds = np.log((a + prior) / (n_int - a + prior)) - np.log((c + prior) / (n_ref - c + prior))
        rows.append(
            {
                "token": token,
                "n_intervened": a,
                "n_reference": c,
                "total_intervened": n_int,
                "total_reference": n_ref,
                "log_odds": float(log_odds),
                "p_value": float(scipy.stats.fisher_exact(table).pvalue),
            }
        )
    frame = pd.DataFrame(rows, columns=["token", "n_intervened", "n_reference", "total_intervened",
                                        "total_reference", "log_odds", "p_value"])  # fmt: skip
    if len(frame):
        reject, q, _, _ = multipletests(frame["p_value"], alpha=alpha, method="fdr_bh")
        frame["q_value"], frame["significant"] = q, reject
    else:
        frame["q_value"], frame["significant"] = [], []
    return frame.sort_values(["p_value", "token"], kind="stable").reset_index(drop=True)


def answer_tokens_as_text(tokenizer, answers: Sequence[Sequence[int]], eos: int | None = None) -> list[list[str]]:
    """Each answer's token ids as the tokenizer's token strings (the stop token left out)."""
    return [tokenizer.convert_ids_to_tokens([t for t in ids if t != eos]) for ids in answers]
