"""Fixed-budget training (CODI's objective or Coconut's curriculum, :data:`~codi_lens.training.objectives.OBJECTIVES`)
with periodic validation and exact resume (:class:`Trainer`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from codi_lens.data.problems import Problem
from codi_lens.training.batches import batch_to
from codi_lens.training.config import BOOKKEEPING_FIELDS, TrainConfig
from codi_lens.training.export import to_codi_model
from codi_lens.training.objectives import OBJECTIVES, Objective

#: Values of fields that states written before the field existed were trained with.
OLDER_DEFAULTS = {"micro_batches": 1, "dtype": "float32", "method": "codi", "stage_steps": 0, "thoughts_per_step": 1}


@dataclass
class Trainer:
    """Fixed-budget training with periodic validation and exact resume, by ``cfg.method``'s objective (the
    module: :class:`~codi_lens.training.module.CODIModule` for CODI,
    :class:`~codi_lens.training.coconut.CoconutModule` for Coconut).

    ``train_problems`` / ``val_problems`` are :class:`codi_lens.data.Problem` records (GSM8K or
    synthetic). ``workdir`` receives ``train_state.pt``
    (resume point), ``log.jsonl`` (losses and validation accuracy) and, at the end, the export.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    base_vocab: int
    cfg: TrainConfig
    train_problems: list[Problem]
    val_problems: list[Problem] = field(default_factory=list)
    workdir: Path | None = None
    step: int = 0
    #: Training wall time summed over every invocation (resumes included), seconds.
    wall_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.objective: Objective = OBJECTIVES[self.cfg.method]
        if self.cfg.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.cfg.dtype!r}: choose float32 or bfloat16")
        self.model.to(self.cfg.device)
        if len(self.train_problems) < self.cfg.batch_size:
            raise ValueError(
                f"{len(self.train_problems)} training problems cannot fill one batch of {self.cfg.batch_size}; "
                "lower batch_size or give more problems"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if self.workdir is not None:
            self.workdir = Path(self.workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        progress = (step - self.cfg.warmup_steps) / max(1, self.cfg.steps - self.cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def batch_indices(self, step: int) -> list[int]:
        """The problems of ``step``: a seeded permutation per epoch, so the order depends only on the seed."""
        n, bs = len(self.train_problems), self.cfg.batch_size
        per_epoch = n // bs
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        return order[offset * bs : (offset + 1) * bs].tolist()

    def micro_batches(self, step: int) -> list[tuple[Any, float]]:
        """The step's problems sorted by length and cut into ``cfg.micro_batches`` batches, each
        with its share of the step's problems (the weight of its loss)."""
        problems = [self.train_problems[i] for i in self.batch_indices(step)]
        if self.cfg.micro_batches > 1:
            problems = sorted(problems, key=lambda p: len(p.question) + len(p.cot))
        bounds = torch.linspace(0, len(problems), self.cfg.micro_batches + 1).round().long().tolist()
        groups = [problems[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
        stage = self.objective.stage(step, self.cfg)
        return [
            (self.objective.batch(g, self.tokenizer, self.base_vocab, self.cfg, stage), len(g) / len(problems))
            for g in groups
        ]

    def train_step(self) -> dict[str, float]:
        self.model.train()
        if self.step and self.objective.stage(self.step, self.cfg) != self.objective.stage(self.step - 1, self.cfg):
            self.optimizer.state.clear()  # a new curriculum stage starts with fresh moments, as upstream's
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        autocast = torch.autocast(
            torch.device(self.cfg.device).type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16"
        )
        for batch, share in self.micro_batches(self.step):
            with autocast:
                losses = self.objective.losses(self.model, batch_to(batch, self.cfg.device), self.cfg)
            (losses["loss"] * share).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() * share
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return totals

    def validate(self) -> float:
        """Greedy latent-loop accuracy on the first ``val_size`` validation problems (hooked model), with as many
        latents as the current stage trains."""
        model = to_codi_model(self.model, self.tokenizer)
        problems = self.val_problems[: self.cfg.val_size]
        n_latents, max_new_tokens = self.objective.validation(self.objective.stage(self.step - 1, self.cfg), self.cfg)
        correct = 0
        for start in range(0, len(problems), 100):
            chunk = problems[start : start + 100]
            result = model.run_codi([p.question for p in chunk], n_latents=n_latents, max_new_tokens=max_new_tokens)
            correct += sum(pred == p.answer_value for pred, p in zip(result.prediction, chunk))
        return correct / max(1, len(problems))

    # -- checkpoints
    def save_state(self) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "config": asdict(self.cfg),
                "wall_seconds": self.wall_seconds,
                # Plain tensors, so that a weights_only load restores them (the data order needs no
                # state: it is a function of the seed and the step).
                "torch_rng": torch.get_rng_state(),
            },
            self.workdir / "train_state.pt.tmp",
        )
        (self.workdir / "train_state.pt.tmp").replace(self.workdir / "train_state.pt")

    def load_state(self) -> bool:
        """Resume from ``workdir/train_state.pt`` if present; returns whether it did."""
        path = None if self.workdir is None else self.workdir / "train_state.pt"
        if path is None or not path.exists():
            return False
        state = torch.load(path, weights_only=True, map_location="cpu")
        saved, current = (
            {k: v for k, v in config.items() if k not in BOOKKEEPING_FIELDS}
            for config in ({**OLDER_DEFAULTS, **state["config"]}, asdict(self.cfg))
        )
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"{path} was written with a different config ({', '.join(changed)}); use a fresh workdir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.wall_seconds = state.get("wall_seconds", 0.0)
        if "torch_rng" in state:  # older states did not keep it
            torch.set_rng_state(state["torch_rng"])
        return True

    def _log(self, record: dict) -> None:
        if self.workdir is not None:
            with open(self.workdir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, progress: bool = True, stop_at: int | None = None) -> dict[str, float]:
        """Train until ``cfg.steps`` (resuming if a state exists); returns the last losses.

        ``stop_at`` ends the call early at that step (the schedule still follows ``cfg.steps``), as a
        kill would; a later ``fit`` resumes from the last checkpoint.
        """
        torch.set_num_threads(self.cfg.threads)
        self.load_state()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"{self.cfg.method} training", disable=not progress)
        last: dict[str, float] = {}
        start = time.perf_counter()
        while self.step < min(self.cfg.steps, stop_at or self.cfg.steps):
            tick = time.perf_counter()
            last = self.train_step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
            record: dict[str, Any] = {"step": self.step, **last, "elapsed_s": round(time.perf_counter() - start, 1)}
            if self.val_problems and (self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps):
                record["val_accuracy"] = self.validate()
                bar.write(f"step {self.step}: validation accuracy {record['val_accuracy']:.3f}")
            self.wall_seconds += time.perf_counter() - tick
            record["wall_seconds"] = round(self.wall_seconds, 1)
            self._log(record)
            if self.workdir is not None and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps):
                self.save_state()
        bar.close()
        if self.workdir is not None and self.step < self.cfg.steps:
            self.save_state()  # stopped early on purpose: keep every finished step
        return last
