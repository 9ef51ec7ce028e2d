"""Sparse autoencoders on continuous thoughts, trained with SAELens and attached inside the latent loop.

Modules in dependency order: ``io`` (SAELens folders that name their site), ``ids`` (feature ids), ``train``
(SAELens' trainer on one site's activations; the registry of architectures), ``splice`` (attaching SAEs
inside the loop), ``edits`` (feature edits as ``fwd_hooks``), ``quality`` (reconstruction and splicing
metrics), ``suite`` (train and evaluate many), ``legacy`` (earlier CODI SAE files).
"""

from codi_lens.saes.edits import FEATURE_OPS, feature_edit
from codi_lens.saes.io import SAEError, load_sae, load_saes, sae_site, save_sae, site_metadata
from codi_lens.saes.legacy import convert_legacy_sae
from codi_lens.saes.quality import (
    DENSE_THRESHOLD,
    PlainRun,
    encode_decode,
    explained_variance,
    explained_variance_ci,
    reconstruction_metrics,
    splice_effect,
)
from codi_lens.saes.splice import ThoughtSAE, attached, sae_acts_hook_name
from codi_lens.saes.train import SAE_ARCHITECTURES, SAERecipe, ShuffledBatches, recipe_dict, train_sae, training_sae

__all__ = [
    "DENSE_THRESHOLD",
    "FEATURE_OPS",
    "SAE_ARCHITECTURES",
    "PlainRun",
    "SAEError",
    "SAERecipe",
    "ShuffledBatches",
    "ThoughtSAE",
    "attached",
    "convert_legacy_sae",
    "encode_decode",
    "explained_variance",
    "explained_variance_ci",
    "feature_edit",
    "load_sae",
    "load_saes",
    "reconstruction_metrics",
    "recipe_dict",
    "sae_acts_hook_name",
    "sae_site",
    "save_sae",
    "site_metadata",
    "splice_effect",
    "train_sae",
    "training_sae",
]
