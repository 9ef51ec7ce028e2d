"""Training one SAE on one site's activations with SAELens' ``SAETrainer``: the architectures of
:data:`SAE_ARCHITECTURES` (``standard``: ReLU with an L1 penalty weighted by each decoder row's norm, so
shrinking the encoder while growing the decoder does not lower it; ``topk``, ``batchtopk``,
``matryoshka``); seeded, with a progress bar, checkpointed and resumed from its last checkpoint. An SAE is
trained on that site's activations only, never pooled across layers or thoughts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from jaxtyping import Float
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training import sae_trainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from tqdm.auto import tqdm

from codi_lens.core.registry import Registry
from codi_lens.core.sites import Site
from codi_lens.saes.io import SAEError, site_metadata

#: codi_lens' architecture names and SAELens' training architectures behind them.
SAE_ARCHITECTURES: Registry[str] = Registry("SAE architecture")
SAE_ARCHITECTURES.add("standard", "standard")
SAE_ARCHITECTURES.add("topk", "topk")
SAE_ARCHITECTURES.add("batchtopk", "batchtopk")
SAE_ARCHITECTURES.add("matryoshka", "matryoshka_batchtopk")


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
        SAE_ARCHITECTURES[self.architecture]  # a ChoiceError naming the architectures

    def widths(self) -> list[int]:
        return list(self.matryoshka_widths) or [self.d_sae // 8, self.d_sae // 4, self.d_sae // 2, self.d_sae]


def recipe_dict(recipe: SAERecipe) -> dict[str, Any]:
    return {**asdict(recipe), "matryoshka_widths": list(recipe.matryoshka_widths)}


def training_sae(
    recipe: SAERecipe, d_in: int, site: Site, *, device: str = "cpu", model_name: str | None = None
) -> TrainingSAE:
    """A freshly initialised (seeded) SAELens training SAE for ``site``."""
    sae_cls, cfg_cls = get_sae_training_class(SAE_ARCHITECTURES[recipe.architecture])
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


def check_training_rows(n_rows: int, batch_size: int) -> None:
    """Refuse training rows that cannot fill one batch (checked before any activation is collected, from the
    number of training problems: one row per problem and site)."""
    if n_rows < batch_size:
        raise SAEError(
            f"{n_rows} training rows per site cannot fill one batch of {batch_size}: raise --train-limit (one row "
            "per training problem) or lower --sae-batch-size"
        )


class ShuffledBatches(Iterator[Tensor]):
    """Endless ``[batch_size, d]`` batches of ``rows``: epoch ``e`` is a permutation seeded by ``(seed,
    e)``, so batch ``i`` depends only on the seed and ``i`` (a resumed run continues the same stream)."""

    def __init__(self, rows: Float[Tensor, "n d"], batch_size: int, seed: int):
        check_training_rows(len(rows), batch_size)
        self.rows, self.batch_size, self.seed, self.step = rows, batch_size, seed, 0
        self.per_epoch = len(rows) // batch_size

    def __next__(self) -> Tensor:
        epoch, offset = divmod(self.step, self.per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        self.step += 1
        return self.rows[order[offset * self.batch_size : (offset + 1) * self.batch_size]]


def latest_checkpoint(directory: Path) -> Path | None:
    """The latest complete checkpoint folder SAELens wrote under ``directory`` (None if there is none)."""
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
    latest = None if checkpoints is None else latest_checkpoint(checkpoints)
    if latest is not None:
        sae.load_weights_from_checkpoint(latest)
        trainer.load_trainer_state(latest)
        # SAELens saves a checkpoint after a step's samples are counted but before its step counter moves
        # on, so the samples say how many batches were used.
        trainer.n_training_steps = trainer.n_training_samples // recipe.batch_size
        batches.step = trainer.n_training_steps
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    quiet = partial(tqdm, disable=not progress)  # SAELens' trainer has no switch for its bar: silence that one
    with mock.patch.object(sae_trainer, "tqdm", quiet):
        return trainer.fit()
