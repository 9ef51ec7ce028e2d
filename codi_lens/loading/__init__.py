"""Loading: checkpoints on disk (CODI, Coconut and SIM-CoT files, strictly validated), base architectures,
tokenizers and the shipped assets, into a :class:`~codi_lens.core.model.CODIModel`. Imports only the core.

Modules in dependency order: ``registry`` (shipped models and datasets), ``architectures`` (base models),
``checkpoint`` (the upstream file layout and its validation), ``llama_tokenizer`` (the offline Llama 3
tokenizer), ``load`` (:func:`load_codi`, :func:`load_pretrained`, :class:`LoadSpec`).
"""

from codi_lens.loading.load import LoadSpec, check_codi, load_codi, load_pretrained
from codi_lens.loading.registry import DATASETS, DEFAULT_MODEL, PRETRAINED, SHIPPED_MODELS, default_data

__all__ = [
    "DATASETS",
    "DEFAULT_MODEL",
    "PRETRAINED",
    "SHIPPED_MODELS",
    "LoadSpec",
    "check_codi",
    "default_data",
    "load_codi",
    "load_pretrained",
]
