"""SAEs attached inside the latent loop, so ``run_codi``, ``score_answers`` and ``run_codi_with_cache`` see them.

At thought hook points (``thought.k.hook_hidden`` ...) an SAE applies to the whole ``[batch, d]`` activation;
at hooks with a position axis, only at its thought's position of each chunk (elsewhere the activation passes
through unchanged). The cache then holds ``<hook>.hook_sae_acts_post`` at every step, and feature edits
(:mod:`codi_lens.saes.edits`) act on it as ordinary ``fwd_hooks``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, set_deep_attr
from sae_lens.saes.sae import _disable_hooks
from torch import Tensor

from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.names import sae_hook_name
from codi_lens.core.recording import ActivationRecorder
from codi_lens.core.sites import Site
from codi_lens.saes.io import SAEError, sae_site


class ThoughtSAE(_SAEWrapper):
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
        self.chunk_scope = model.chunk_scope
        self.site = site

    def bypass(self, x: Float[Tensor, "batch *pos d"]) -> Bool[Tensor, "batch pos 1"] | None:
        """``[batch, pos, 1]``: True where the SAE is not applied (None for a thought hook)."""
        if self.site.is_thought_hook:
            return None
        index = self.chunk_scope.current.index_in_chunk(self.site.position).to(x.device)
        return (torch.arange(x.shape[1], device=x.device)[None, :] != index[:, None]).unsqueeze(-1)

    def forward(self, original_output: Float[Tensor, "batch *pos d"]) -> Float[Tensor, "batch *pos d"]:
        bypass = self.bypass(original_output)
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
def attached(model: CODIModel, saes: Sequence[SAE], *, use_error_term: bool = False) -> Iterator[CODIModel]:
    """Attach SAEs inside the latent loop for the ``with`` block (each at its metadata's hook, see the
    module docstring): ``HookedSAETransformer.add_sae`` registers each, and a :class:`ThoughtSAE` takes the
    place of SAELens' wrapper at the hook; ``reset_saes`` removes them on exit. Two SAEs on one hook are
    refused."""
    sites = [sae_site(s) for s in saes]
    hooks = [s.hook for s in sites]
    if len(set(hooks)) != len(hooks):
        raise SAEError(f"two SAEs attach to one hook: {sorted(h for h in hooks if hooks.count(h) > 1)[0]}")
    model.ensure_thought_hooks(max(s.thought for s in sites) if sites else 0)
    try:
        for sae, site in zip(saes, sites):
            if site.hook not in model.hook_dict:
                raise SAEError(f"the SAE's hook {site.hook!r} is not a hook point of this model")
            model.add_sae(sae, use_error_term=use_error_term)
            set_deep_attr(model, site.hook, ThoughtSAE(sae, model, site, use_error_term))
            model.setup()
        yield model
    finally:
        model.reset_saes()


def sae_acts_hook_name(sae: SAE) -> str:
    """The hook name of an attached SAE's feature activations (what caches and edits use)."""
    return sae_hook_name(sae_site(sae).hook, "acts_post")


def feature_recorder(model: CODIModel, saes: Sequence[SAE]) -> tuple[ActivationRecorder, Hooks]:
    """A recorder keeping the feature activations of attached ``saes`` as computed (with their graph when
    autograd is on), and the ``fwd_hooks`` that feed it; read them with :func:`recorded_features`."""
    recorder = ActivationRecorder(model.chunk_scope, keep_graph=True)
    return recorder, [(sae_acts_hook_name(sae), recorder) for sae in saes]


def recorded_site(recorder: ActivationRecorder, sae: SAE) -> tuple[Tensor, int | None]:
    """The tensor the recorder kept that holds ``sae``'s feature activations at its site, and the site's index
    on its position axis (None for a thought hook): the tensor a gradient is taken against."""
    return recorder.at(sae_acts_hook_name(sae), sae_site(sae).position)


def at_site(tensor: Tensor, index: int | None) -> Float[Tensor, "batch d_sae"]:
    """``tensor`` (a recorded activation or its gradient) at the site's index, ``[batch, d_sae]``."""
    return tensor if index is None else tensor[:, index]


def recorded_features(recorder: ActivationRecorder, sae: SAE) -> Float[Tensor, "batch d_sae"]:
    """The feature activations of ``sae`` at its own site, ``[batch, d_sae]``, as the recorder kept them (thought
    positions align across a batch, so the site is one index of a positional hook's chunk)."""
    return at_site(*recorded_site(recorder, sae))
