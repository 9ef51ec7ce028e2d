"""What ships inside the package: the models, the datasets, and which model a command uses by default.

Every name a user can give for a shipped asset is one entry here: ``load_pretrained("toy-chain")``,
``--checkpoint toy-arith``, ``load_problems("gsm8k:test")``, ``--data toy-chain:validation``. A model's
folder holds its checkpoint (``model.safetensors``), ``config.json``, tokenizer, card and
``training.json`` (the generator settings of its synthetic data); a dataset is a JSONL file in the
package or a split regenerated from a shipped model's ``training.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from codi_lens.core.registry import Registry

PACKAGE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ShippedModel:
    """A model inside the package: its folder, and the name of its own data (``toy-chain`` ->
    ``toy-chain:test``, ``toy-chain:train``, ...)."""

    folder: Path
    data: str


@dataclass(frozen=True)
class ShippedDataset:
    """A dataset a name loads: a JSONL file inside the package (``file``, relative to it), or a split that
    the synthetic generator regenerates with the arguments a shipped model's ``training.json`` recorded
    (``model``, ``split``)."""

    file: str | None = None
    model: str | None = None
    split: str | None = None

    @property
    def generated(self) -> bool:
        return self.file is None


SHIPPED_MODELS: Registry[ShippedModel] = Registry("shipped model")
SHIPPED_MODELS.add("toy-arith", ShippedModel(PACKAGE / "pretrained" / "toy_arith", "toy"))
SHIPPED_MODELS.add("toy-chain", ShippedModel(PACKAGE / "pretrained" / "toy_chain", "toy-chain"))
#: toy-chain's Coconut twin: the same data (its own splits are toy-chain's) and architecture.
SHIPPED_MODELS.add("toy-coconut", ShippedModel(PACKAGE / "pretrained" / "toy_coconut", "toy-chain"))

#: The model every command and :func:`codi_lens.load_pretrained` use when none is named.
DEFAULT_MODEL = "toy-chain"

DATASETS: Registry[ShippedDataset] = Registry("dataset")
DATASETS.add("gsm8k:test", ShippedDataset(file="datasets/gsm8k/test.jsonl"))
DATASETS.add("gsm8k:train", ShippedDataset(file="datasets/gsm8k/train.jsonl"))
DATASETS.add("toy:test", ShippedDataset(file="pretrained/toy_arith/data/test.jsonl"))
DATASETS.add("toy:train", ShippedDataset(model="toy-arith", split="train"))
DATASETS.add("toy:validation", ShippedDataset(model="toy-arith", split="validation"))
DATASETS.add("toy-chain:test", ShippedDataset(file="pretrained/toy_chain/data/test.jsonl"))
DATASETS.add("toy-chain:train", ShippedDataset(model="toy-chain", split="train"))
DATASETS.add("toy-chain:validation", ShippedDataset(model="toy-chain", split="validation"))

#: Each shipped model's folder by name (a view of :data:`SHIPPED_MODELS`).
PRETRAINED = {name: model.folder for name, model in SHIPPED_MODELS.items()}


def default_data(checkpoint: str | Path, split: str = "test") -> str:
    """The problems a command runs on when none are named: a shipped model's own ``split``
    (``"toy-chain:test"``), and GSM8K's for any other checkpoint (CODI checkpoints are GSM8K models)."""
    name = str(checkpoint)
    return f"{SHIPPED_MODELS[name].data if name in SHIPPED_MODELS else 'gsm8k'}:{split}"
