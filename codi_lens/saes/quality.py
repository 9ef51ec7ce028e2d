"""How good an SAE of the thoughts is: held-out reconstruction (:func:`reconstruction_metrics`: explained
variance ``1 - sum_d Var(x - x_hat) / sum_d Var(x)`` with a bootstrap CI, L0, dead and dense feature
fractions, cosine and MSE) and the answer when the reconstruction replaces the activation inside the loop
(:func:`splice_effect`: accuracy and KL at the answer number, with and without the error term).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from codi_lens.core.answers import is_correct
from codi_lens.core.hooks import HookFn
from codi_lens.core.model import CODIModel
from codi_lens.data.problems import Problem
from codi_lens.metrics import AnswerNumber, find_answer_number, kl_divergence, number_scores
from codi_lens.saes.splice import attached

#: A feature active on more than this share of rows counts as dense.
DENSE_THRESHOLD = 0.5


@torch.no_grad()
def encode_decode(sae: SAE, rows: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n d_sae"], Float[Tensor, "n d"]]:
    """Feature activations ``[n, d_sae]`` and reconstructions ``[n, d]`` (float32, the SAE's device)."""
    x = rows.to(device=sae.device, dtype=sae.dtype)
    acts = sae.encode(x)
    return acts.float(), sae.decode(acts).float()


def explained_variance(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """``1 - sum_d Var(x - x_hat) / sum_d Var(x)`` (variances over rows, population form)."""
    x, x_hat = x.double(), x_hat.double()
    return float(1 - (x - x_hat).var(dim=0, unbiased=False).sum() / x.var(dim=0, unbiased=False).sum())


def explained_variance_ci(
    x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"], *, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap CI of :func:`explained_variance` over rows (problems), with
    ``scipy.stats.bootstrap`` resampling row indices."""
    x, x_hat = x.double().cpu(), x_hat.double().cpu()
    result = scipy.stats.bootstrap(
        (np.arange(len(x)),),
        lambda index: explained_variance(x[torch.as_tensor(index)], x_hat[torch.as_tensor(index)]),
        n_resamples=n_resamples,
        method="percentile",
        vectorized=False,
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def reconstruction_metrics(sae: SAE, rows: Float[Tensor, "n d"]) -> dict[str, float]:
    """Held-out quality of one SAE: ``explained_variance`` (with its 95% bootstrap CI over rows,
    ``explained_variance_low`` / ``_high``), ``l0`` (mean active features per row),
    ``dead_fraction`` (features never active on these rows), ``dense_fraction`` (active on more than
    :data:`DENSE_THRESHOLD` of them), ``cosine`` (mean over rows of cos(x, x_hat)) and ``mse``."""
    acts, x_hat = encode_decode(sae, rows)
    x = rows.to(x_hat.device).float()
    active = acts > 0
    frequency = active.float().mean(dim=0)
    low, high = explained_variance_ci(x, x_hat)
    return {
        "explained_variance": explained_variance(x, x_hat),
        "explained_variance_low": low,
        "explained_variance_high": high,
        "l0": float(active.sum(dim=1).float().mean()),
        "dead_fraction": float((frequency == 0).float().mean()),
        "dense_fraction": float((frequency > DENSE_THRESHOLD).float().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
        "mse": float((x - x_hat).pow(2).mean()),
    }


@dataclass
class PlainRun:
    """What :func:`splice_effect` compares against, for one list of problems: the plain run's predictions
    and answer numbers, and its logits at each answer number (rows ``with_number`` only)."""

    questions: list[str]
    prediction: list[float | None]
    numbers: list[AnswerNumber | None]
    with_number: list[int]
    logits: Float[Tensor, "n_with_number d_vocab"] | None
    logprob: Float[Tensor, " n_with_number"] | None = None

    @classmethod
    def of(
        cls, model: CODIModel, problems: list[Problem], *, n_latents: int = 6, max_new_tokens: int = 256
    ) -> PlainRun:
        questions = [p.question for p in problems]
        result = model.run_codi(questions, n_latents=n_latents, max_new_tokens=max_new_tokens)
        numbers = [find_answer_number(model.tokenizer, t) for t in result.answer_tokens]
        with_number = [i for i, n in enumerate(numbers) if n is not None]
        run = cls(questions, result.prediction, numbers, with_number, None)
        if with_number:
            run.logits, run.logprob = run.answer_scores(model, n_latents=n_latents)
        return run

    def answer_scores(
        self, model: CODIModel, *, fwd_hooks: Sequence[tuple[str, HookFn]] = (), n_latents: int = 6
    ) -> tuple[Float[Tensor, "n_with_number d_vocab"], Float[Tensor, " n_with_number"]]:
        """Under ``fwd_hooks`` (and whatever is attached): the logits at the plain run's answer numbers' first
        tokens and the log-probability of each whole number (see :func:`~codi_lens.metrics.number_scores`)."""
        return number_scores(
            model,
            [self.questions[i] for i in self.with_number],
            [self.numbers[i] for i in self.with_number],
            n_latents=n_latents,
            fwd_hooks=fwd_hooks,
        )


def splice_effect(
    model: CODIModel,
    problems: list[Problem],
    saes: Sequence[SAE],
    *,
    use_error_term: bool,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    n_latents: int = 6,
    max_new_tokens: int = 256,
    plain: PlainRun | None = None,
) -> pd.DataFrame:
    """The answer of each problem with the SAEs spliced in (and ``fwd_hooks``, e.g. feature edits)
    against the plain run: one row per problem with ``baseline_correct``, ``correct``, ``changed``
    (prediction differs), ``kl`` (nats, KL(plain || spliced) at the plain run's answer number's first token;
    NaN where that answer has no number) and ``logprob_change`` (nats: the log-probability of the plain
    run's whole answer number, spliced minus plain). ``plain``: the plain run of these problems (:class:`PlainRun`),
    computed here when not given (pass it to compare several SAEs with one plain run)."""
    plain = plain or PlainRun.of(model, problems, n_latents=n_latents, max_new_tokens=max_new_tokens)
    with attached(model, saes, use_error_term=use_error_term):
        spliced = model.run_codi(
            plain.questions, n_latents=n_latents, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks
        )
        edited = plain.answer_scores(model, fwd_hooks=fwd_hooks, n_latents=n_latents) if plain.with_number else None
    kl, logprob_change = np.full(len(problems), np.nan), np.full(len(problems), np.nan)
    if plain.with_number:
        kl[plain.with_number] = kl_divergence(plain.logits, edited[0]).cpu().numpy()
        logprob_change[plain.with_number] = (edited[1] - plain.logprob).cpu().numpy()
    return pd.DataFrame(
        {
            "problem_id": [p.id for p in problems],
            "baseline_prediction": [np.nan if x is None else x for x in plain.prediction],
            "prediction": [np.nan if x is None else x for x in spliced.prediction],
            "baseline_correct": [is_correct(x, p.gold) for x, p in zip(plain.prediction, problems)],
            "correct": [is_correct(x, p.gold) for x, p in zip(spliced.prediction, problems)],
            "changed": [a != b for a, b in zip(plain.prediction, spliced.prediction)],
            "kl": kl,
            "logprob_change": logprob_change,
        }
    )
