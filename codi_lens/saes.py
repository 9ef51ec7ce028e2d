"""Sparse autoencoders on continuous thoughts, trained with SAELens and attached inside the latent loop.

One SAE belongs to one :class:`~codi_lens.activations.Site` (a hook and a thought): it is trained on
that site's activations only (never pooled across layers or thoughts) and records the site in its
SAELens metadata: ``hook_name`` (the hook it attaches to), ``codi_thoughts`` (the thought positions
it belongs to) and ``codi_site``. Saved SAEs are plain SAELens folders (``cfg.json`` +
``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads.

- Training (:func:`train_sae`): SAELens' ``SAETrainer`` on one site's ``[n, d]`` activations, for the
  architectures of :data:`ARCHITECTURES` (``standard``: ReLU with an L1 penalty weighted by each
  decoder row's norm, so shrinking the encoder while growing the decoder does not lower it;
  ``topk``, ``batchtopk``, ``matryoshka``); seeded, with a progress bar, checkpointed and resumed
  from its last checkpoint.
- Evaluation (:func:`reconstruction_metrics`): explained variance ``1 - sum_d Var(x - x_hat) /
  sum_d Var(x)`` over held-out rows, L0, dead and dense feature fractions, cosine and MSE;
  :func:`splice_effect` measures the answer when the reconstruction replaces the activation inside
  the loop (accuracy and KL at the answer number), with and without the error term.
- Attaching (:func:`attached`): SAEs at thought hook points (``thought.k.hook_hidden`` ...) through
  SAELens' ``HookedSAETransformer.add_sae``, and at hooks with a position axis restricted to their
  thought positions (elsewhere the activation passes through unchanged), so ``run_codi``,
  ``score_answers`` and ``run_codi_with_cache`` see them and the cache holds
  ``<hook>.hook_sae_acts_post`` at every step.
- Feature interventions (:func:`feature_edit`): ablate, scale, clamp or swap a feature at a site, as
  ordinary ``fwd_hooks`` on ``<hook>.hook_sae_acts_post``.
- Loading (:func:`load_sae`, :func:`convert_legacy_sae`): SAELens folders, and plain PyTorch state dicts
  of an encoder/decoder pair as earlier CODI work saved them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, set_deep_attr
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, _disable_hooks
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from codi_lens.activations import Site
from codi_lens.answers import is_correct
from codi_lens.checkpoint import CheckpointError
from codi_lens.data import Problem
from codi_lens.metrics import find_answer_number, kl_divergence, logits_at_answer
from codi_lens.model import CODIModel

#: codi_lens' architecture names and SAELens' training architectures behind them.
ARCHITECTURES = {
    "standard": "standard",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "matryoshka": "matryoshka_batchtopk",
}
#: A feature active on more than this share of rows counts as dense.
DENSE_THRESHOLD = 0.5


class SAEError(CheckpointError):
    """An SAE file, key, shape or setting that codi_lens cannot use; the message names it."""


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class SAERecipe:
    """How to train one SAE. ``k`` is used by the TopK family, ``l1_coefficient`` by ``standard``;
    ``matryoshka_widths`` (default: d_sae/8, /4, /2, 1) by ``matryoshka``. ``training_samples``
    activations are drawn in seeded shuffled epochs of the training rows."""

    architecture: str = "topk"
    d_sae: int = 512
    k: int = 16
    l1_coefficient: float = 1.0
    matryoshka_widths: tuple[int, ...] = ()
    lr: float = 1e-3
    batch_size: int = 256
    training_samples: int = 1_000_000
    n_checkpoints: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"architecture {self.architecture!r}: choose from {', '.join(ARCHITECTURES)}")

    def widths(self) -> list[int]:
        return list(self.matryoshka_widths) or [self.d_sae // 8, self.d_sae // 4, self.d_sae // 2, self.d_sae]


def site_metadata(site: Site, model_name: str | None = None) -> dict[str, Any]:
    """What an SAE records about where it belongs (SAELens metadata fields)."""
    return {"hook_name": site.hook, "codi_thoughts": [site.thought], "codi_site": site.id, "model_name": model_name}


def sae_site(sae: SAE) -> Site:
    """The site an SAE belongs to, from its metadata (``SAEError`` naming what is missing)."""
    meta = sae.cfg.metadata
    if not meta.hook_name:
        raise SAEError("the SAE's metadata has no hook_name: codi_lens cannot tell where it attaches")
    thoughts = meta.get("codi_thoughts")
    if not thoughts:
        site = Site.parse(meta.hook_name) if meta.hook_name.startswith("thought.") else None
        if site is None:
            raise SAEError(f"the SAE at {meta.hook_name} has no codi_thoughts in its metadata: which thought?")
        return site
    return Site(meta.hook_name, int(thoughts[0]))


def training_sae(recipe: SAERecipe, d_in: int, site: Site, *, device: str = "cpu", model_name: str | None = None):
    """A freshly initialised (seeded) SAELens training SAE for ``site``."""
    sae_cls, cfg_cls = get_sae_training_class(ARCHITECTURES[recipe.architecture])
    options: dict[str, Any] = {"d_in": d_in, "d_sae": recipe.d_sae, "device": device}
    if recipe.architecture == "standard":
        options["l1_coefficient"] = recipe.l1_coefficient
    else:
        options["k"] = recipe.k
    if recipe.architecture == "matryoshka":
        options["matryoshka_widths"] = recipe.widths()
    cfg = cfg_cls(**options)
    for key, value in site_metadata(site, model_name).items():
        cfg.metadata[key] = value
    torch.manual_seed(recipe.seed)
    return sae_cls(cfg)


class ShuffledBatches(Iterator[Tensor]):
    """Endless ``[batch_size, d]`` batches of ``rows``: epoch ``e`` is a permutation seeded by ``(seed,
    e)``, so batch ``i`` depends only on the seed and ``i`` (a resumed run continues the same stream)."""

    def __init__(self, rows: Float[Tensor, "n d"], batch_size: int, seed: int):
        if len(rows) < batch_size:
            raise SAEError(f"{len(rows)} training rows cannot fill one batch of {batch_size}")
        self.rows, self.batch_size, self.seed, self.step = rows, batch_size, seed, 0
        self.per_epoch = len(rows) // batch_size

    def __next__(self) -> Tensor:
        epoch, offset = divmod(self.step, self.per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        self.step += 1
        return self.rows[order[offset * self.batch_size : (offset + 1) * self.batch_size]]


def _latest_checkpoint(directory: Path) -> Path | None:
    done = [p for p in directory.glob("*") if p.is_dir() and p.name.isdigit() and (p / "trainer_state.pt").exists()]
    return max(done, key=lambda p: int(p.name), default=None)


def train_sae(
    rows: Float[Tensor, "n d"],
    recipe: SAERecipe,
    site: Site,
    *,
    workdir: str | Path | None = None,
    device: str = "cpu",
    model_name: str | None = None,
    progress: bool = True,
) -> TrainingSAE:
    """Train one SAE on one site's activations with SAELens' ``SAETrainer``.

    With ``workdir``, checkpoints (SAE weights and trainer state) go to ``workdir/checkpoints/<samples>``
    ``recipe.n_checkpoints`` times during training, and a call that finds one resumes from the latest:
    same weights, optimizer and data stream as if never stopped. Returns the trained SAE (SAELens
    folds nothing into it: no activation normalisation is used).
    """
    rows = rows.to(device=device, dtype=torch.float32)
    sae = training_sae(recipe, rows.shape[1], site, device=device, model_name=model_name)
    checkpoints = None if workdir is None else Path(workdir) / "checkpoints"
    trainer_cfg = SAETrainerConfig(
        total_training_samples=recipe.training_samples,
        train_batch_size_samples=recipe.batch_size,
        lr=recipe.lr,
        lr_end=recipe.lr / 10,  # linear decay over the last fifth of training
        lr_decay_steps=recipe.training_samples // recipe.batch_size // 5,
        device=device,
        n_checkpoints=recipe.n_checkpoints if checkpoints is not None else 0,
        checkpoint_path=None if checkpoints is None else str(checkpoints),
        dead_feature_window=max(1, len(rows) // recipe.batch_size),
        feature_sampling_window=max(1, len(rows) // recipe.batch_size),
    )
    batches = ShuffledBatches(rows, recipe.batch_size, recipe.seed)
    trainer = SAETrainer(trainer_cfg, sae, batches)
    latest = None if checkpoints is None else _latest_checkpoint(checkpoints)
    if latest is not None:
        sae.load_weights_from_checkpoint(latest)
        trainer.load_trainer_state(latest)
        # SAELens saves a checkpoint after a step's samples are counted but before its step counter moves
        # on, so the samples say how many batches were used.
        trainer.n_training_steps = trainer.n_training_samples // recipe.batch_size
        batches.step = trainer.n_training_steps
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    if not progress:
        trainer._update_pbar = lambda *args, **kwargs: None  # noqa: SLF001 - SAELens has no switch for it
    return trainer.fit()


def save_sae(sae: SAE | TrainingSAE, directory: str | Path) -> Path:
    """Save in SAELens format (a training SAE as its inference version); returns the folder."""
    directory = Path(directory)
    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(directory)
    else:
        sae.save_model(directory)
    return directory


def load_sae(directory: str | Path, *, device: str = "cpu") -> SAE:
    """An SAE saved in SAELens format, checked to carry the site metadata codi_lens needs."""
    directory = Path(directory)
    for name in ("cfg.json", "sae_weights.safetensors"):
        if not (directory / name).exists():
            raise SAEError(f"{directory} is not an SAELens folder: {name} is missing")
    sae = SAE.load_from_disk(directory, device=device)
    sae_site(sae)
    return sae


def load_saes(directory: str | Path, ids: Sequence[str] | None = None, *, device: str = "cpu") -> dict[str, SAE]:
    """The SAEs of a folder of SAELens folders (``experiments.train_saes`` writes ``DIR/saes/<sae_id>/``;
    either ``DIR`` or ``DIR/saes`` may be given), by id, in id order; ``ids`` picks some (named if absent)."""
    directory = Path(directory)
    if (directory / "saes").is_dir():
        directory = directory / "saes"
    found = sorted(p.name for p in directory.iterdir() if (p / "cfg.json").exists()) if directory.is_dir() else []
    if not found:
        raise SAEError(f"{directory} holds no SAELens folders (run python -m experiments.train_saes first)")
    missing = [i for i in ids or [] if i not in found]
    if missing:
        raise SAEError(f"no SAE {missing[0]!r} in {directory}; it has {found}")
    return {i: load_sae(directory / i, device=device) for i in (ids or found)}


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode_decode(sae: SAE, rows: Float[Tensor, "n d"]) -> tuple[Tensor, Tensor]:
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


# ---------------------------------------------------------------------- attaching
class _ThoughtSAE(_SAEWrapper):
    """SAELens' SAE wrapper for the latent loop: for a hook with a position axis, the SAE is applied only
    at its thought positions of each chunk (elsewhere the activation passes through unchanged); for a
    thought hook, to the whole ``[batch, d]`` activation.

    The forward pass is SAELens' own (encode, decode, optional error term ``x - decode(encode(x))``
    computed with the SAE's hooks off, so feature edits pass through), with one difference: SAELens
    computes the error term without autograd, which makes a gradient that crosses a spliced site go
    through the SAE alone; here it keeps its gradient, so the site is the identity for gradients as it is
    for values (what :mod:`codi_lens.pathways` needs). Values are identical."""

    def __init__(self, sae: SAE, model: CODIModel, site: Site, use_error_term: bool):
        super().__init__(sae, use_error_term=use_error_term)
        self.__dict__["_codi_model"] = model  # not a submodule: the wrapper lives inside that model
        self.position = site.position

    def _bypass(self, x: Tensor) -> Tensor | None:
        """``[batch, pos, 1]``: True where the SAE is not applied (None for a thought hook)."""
        if self.position is None:
            return None
        index = self.__dict__["_codi_model"].chunk_context.index_in_chunk(self.position).to(x.device)
        return (torch.arange(x.shape[1], device=x.device)[None, :] != index[:, None]).unsqueeze(-1)

    def forward(self, original_output: Tensor) -> Tensor:
        bypass = self._bypass(original_output)
        feature_acts = self.sae.encode(original_output)
        sae_out = self.sae.decode(feature_acts)
        if self.use_error_term:
            with _disable_hooks(self.sae):
                clean = self.sae.decode(self.sae.encode(original_output))
            error = original_output - clean
            if bypass is not None:
                error = torch.where(bypass, torch.zeros_like(error), error)
            sae_out = sae_out + self.hook_sae_error(error)
        if bypass is not None:
            sae_out = torch.where(bypass, original_output, sae_out)
        return self.hook_sae_output(sae_out)


@contextmanager
def attached(model: CODIModel, saes: Sequence[SAE], *, use_error_term: bool = False):
    """Attach SAEs inside the latent loop for the ``with`` block (each at its metadata's hook, see the
    module docstring), the way ``HookedSAETransformer.add_sae`` attaches them; they are removed on exit.
    Two SAEs on one hook are refused."""
    sites = [sae_site(s) for s in saes]
    hooks = [s.hook for s in sites]
    if len(set(hooks)) != len(hooks):
        raise SAEError(f"two SAEs attach to one hook: {sorted(h for h in hooks if hooks.count(h) > 1)[0]}")
    model.ensure_thought_hooks(max(s.thought for s in sites) if sites else 0)
    try:
        for sae, site in zip(saes, sites):
            if site.hook not in model.hook_dict:
                raise SAEError(f"the SAE's hook {site.hook!r} is not a hook point of this model")
            wrapper = _ThoughtSAE(sae, model, site, use_error_term)
            model._acts_to_saes[site.hook] = wrapper  # noqa: SLF001 - as HookedSAETransformer.add_sae does
            set_deep_attr(model, site.hook, wrapper)
            model.setup()
        yield model
    finally:
        model.reset_saes()


def sae_acts_hook_name(sae: SAE) -> str:
    """The hook name of an attached SAE's feature activations (what caches and edits use)."""
    return f"{sae_site(sae).hook}.hook_sae_acts_post"


FeatureOp = Literal["ablate", "scale", "clamp", "swap"]


def feature_edit(
    sae: SAE, features: Sequence[int], op: FeatureOp, value: float | Tensor = 0.0
) -> list[tuple[str, Any]]:
    """``fwd_hooks`` editing features of an attached SAE: ``ablate`` (set to 0), ``scale`` (multiply by
    ``value``), ``clamp`` (set to ``value``), ``swap`` (set to ``value[batch, len(features)]``, e.g. another
    problem's activations of the same features). Applied where the SAE is applied (its thought)."""
    if op not in ("ablate", "scale", "clamp", "swap"):
        raise SAEError(f"feature op {op!r}: choose ablate, scale, clamp or swap")
    index = torch.as_tensor(list(features), dtype=torch.long)

    def edit(acts: Tensor, hook) -> Tensor:
        acts = acts.clone()
        i = index.to(acts.device)
        if op == "ablate":
            acts[..., i] = 0
        elif op == "scale":
            acts[..., i] = acts[..., i] * value
        elif op == "clamp":
            acts[..., i] = float(value)
        else:  # swap
            donor = torch.as_tensor(value, device=acts.device, dtype=acts.dtype)
            shape = (donor.shape[0],) + (1,) * (acts.dim() - 2) + (len(i),)
            acts[..., i] = donor.reshape(shape).expand(*acts.shape[:-1], len(i))
        return acts

    return [(sae_acts_hook_name(sae), edit)]


@dataclass
class PlainRun:
    """What :func:`splice_effect` compares against, for one list of problems: the plain run's predictions
    and answer numbers, and its logits at each answer number (rows ``with_number`` only)."""

    questions: list[str]
    prediction: list[float | None]
    numbers: list
    with_number: list[int]
    logits: Tensor | None

    @classmethod
    def of(cls, model: CODIModel, problems: list[Problem], *, n_latents: int = 6, max_new_tokens: int = 256):
        questions = [p.question for p in problems]
        result = model.run_codi(questions, n_latents=n_latents, max_new_tokens=max_new_tokens)
        numbers = [find_answer_number(model.tokenizer, t) for t in result.answer_tokens]
        with_number = [i for i, n in enumerate(numbers) if n is not None]
        run = cls(questions, result.prediction, numbers, with_number, None)
        run.logits = run.answer_logits(model, n_latents=n_latents) if with_number else None
        return run

    def answer_logits(self, model: CODIModel, *, fwd_hooks: Sequence[tuple] = (), n_latents: int = 6) -> Tensor:
        """Logits at the plain run's answer numbers under ``fwd_hooks`` (and whatever is attached)."""
        return logits_at_answer(
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
    fwd_hooks: Sequence[tuple] = (),
    n_latents: int = 6,
    max_new_tokens: int = 256,
    plain: PlainRun | None = None,
) -> pd.DataFrame:
    """The answer of each problem with the SAEs spliced in (and ``fwd_hooks``, e.g. feature edits)
    against the plain run: one row per problem with ``baseline_correct``, ``correct``, ``changed``
    (prediction differs) and ``kl`` (nats, KL(plain || spliced) at the plain run's answer number;
    NaN where that answer has no number). ``plain``: the plain run of these problems (:class:`PlainRun`),
    computed here when not given (pass it to compare several SAEs with one plain run)."""
    plain = plain or PlainRun.of(model, problems, n_latents=n_latents, max_new_tokens=max_new_tokens)
    with attached(model, saes, use_error_term=use_error_term):
        spliced = model.run_codi(
            plain.questions, n_latents=n_latents, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks
        )
        edited = plain.answer_logits(model, fwd_hooks=fwd_hooks, n_latents=n_latents) if plain.with_number else None
    kl = np.full(len(problems), np.nan)
    if plain.with_number:
        kl[plain.with_number] = kl_divergence(plain.logits, edited).cpu().numpy()
    return pd.DataFrame(
        {
            "problem_id": [p.id for p in problems],
            "baseline_prediction": [np.nan if x is None else x for x in plain.prediction],
            "prediction": [np.nan if x is None else x for x in spliced.prediction],
            "baseline_correct": [is_correct(x, p.gold) for x, p in zip(plain.prediction, problems)],
            "correct": [is_correct(x, p.gold) for x, p in zip(spliced.prediction, problems)],
            "changed": [a != b for a, b in zip(plain.prediction, spliced.prediction)],
            "kl": kl,
        }
    )


# ---------------------------------------------------------------------- legacy files
LEGACY_KEYS = {
    "encoder.weight": ("d_sae", "d_in"),
    "encoder.bias": ("d_sae",),
    "decoder.weight": ("d_in", "d_sae"),
    "decoder.bias": ("d_in",),
}


def convert_legacy_sae(
    path: str | Path, *, hook_name: str | None = None, thought: int | None = None, k: int | None = None
) -> SAE:
    """An SAELens SAE from a plain PyTorch file of an encoder/decoder pair, as earlier CODI work saved
    them: a state dict with ``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``decoder.weight
    [d_in, d_sae]``, ``decoder.bias [d_in]``, or ``{"model_state_dict": ..., "config": {...}}``. Those
    SAEs compute ``relu(encoder(x))`` (or its top-``k``) and ``decoder(f)``, with no decoder bias
    subtracted first; the converted SAE computes the same. ``hook_name`` / ``thought`` (or ``k``) may
    come from the config; a file named ``pos_{p}_...`` gives thought ``p`` when none is given. Loaded
    with ``weights_only=True``. Raises :class:`SAEError` naming the missing or misshapen key."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix, named
        raise SAEError(f"{path}: not a readable PyTorch file ({exc})") from None
    config: dict[str, Any] = {}
    if isinstance(blob, dict) and "model_state_dict" in blob:
        config = dict(blob.get("config") or {})
        blob = blob["model_state_dict"]
    if not isinstance(blob, dict):
        raise SAEError(f"{path}: expected a state dict, found {type(blob).__name__}")
    missing = [key for key in LEGACY_KEYS if key not in blob]
    if missing:
        raise SAEError(f"{path}: missing key {missing[0]!r} (found {sorted(blob)[:8]})")
    d_sae, d_in = blob["encoder.weight"].shape if blob["encoder.weight"].dim() == 2 else (None, None)
    sizes = {"d_sae": d_sae, "d_in": d_in}
    for key, dims in LEGACY_KEYS.items():
        expected = tuple(sizes[d] for d in dims)
        if tuple(blob[key].shape) != expected:
            raise SAEError(f"{path}: key {key!r} has shape {tuple(blob[key].shape)}, expected {expected} ({dims})")
    hook_name = hook_name or config.get("hook_name")
    if thought is None:
        thought = config.get("thought", config.get("position"))
    if thought is None and path.name.startswith("pos_"):
        thought = int(path.name.split("_")[1])
    if hook_name is None or thought is None:
        raise SAEError(f"{path}: say which hook and thought the SAE belongs to (hook_name=, thought=)")
    k = k if k is not None else config.get("k", config.get("topk"))
    common = {"d_in": int(d_in), "d_sae": int(d_sae), "apply_b_dec_to_input": False}
    cfg = TopKSAEConfig(k=int(k), **common) if k else StandardSAEConfig(**common)
    for key, value in site_metadata(Site(hook_name, int(thought))).items():
        cfg.metadata[key] = value
    cfg.metadata["converted_from"] = str(path)
    sae = (TopKSAE if k else StandardSAE)(cfg)
    state = {
        "W_enc": blob["encoder.weight"].T.float().contiguous(),
        "b_enc": blob["encoder.bias"].float(),
        "W_dec": blob["decoder.weight"].T.float().contiguous(),
        "b_dec": blob["decoder.bias"].float(),
    }
    sae.load_state_dict(state)
    return sae


def recipe_dict(recipe: SAERecipe) -> dict[str, Any]:
    return {**asdict(recipe), "matryoshka_widths": list(recipe.matryoshka_widths)}


__all__ = [
    "ARCHITECTURES",
    "SAEError",
    "SAERecipe",
    "attached",
    "convert_legacy_sae",
    "explained_variance",
    "feature_edit",
    "load_sae",
    "reconstruction_metrics",
    "sae_acts_hook_name",
    "sae_site",
    "save_sae",
    "splice_effect",
    "train_sae",
]
