"""What a patching sweep can patch: the kinds of activation (a registry) and the grid of sites of a sweep.

A sweep patches :class:`~codi_lens.core.sites.Site` s: a hook at a position (``question:-1``, the changed
number's tokens ``"changed"``, BOT, thought k, EOT), or at a span of latent steps of one layer at once
(:data:`SPAN_STARTS`: ``"thoughts"`` = thoughts 1..n, ``"latents"`` = BOT and thoughts 1..n). Adding a kind
of activation to every sweep and to ``--kinds`` is one entry in :data:`PATCH_KINDS`, named as
TransformerLens names the activation (:func:`codi_lens.core.names.act_name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codi_lens.core.registry import Registry
from codi_lens.core.sites import Site

#: Positions that stand for a span of latent steps (patched at once), with the first step each covers.
SPAN_STARTS = {"thoughts": 1, "latents": 0}
#: The position of the changed number's question tokens (matched by their index in each question).
CHANGED = "changed"


@dataclass(frozen=True)
class PatchKind:
    """An activation a sweep patches.

    Attributes:
        description: one line for ``--help`` and the docs.
        per_head: one site per attention head (``z``: ``[batch, pos, head, d_head]``).
        per_layer: one site per block (False for the fed thought, which has one per thought).
    """

    description: str
    per_head: bool = False
    per_layer: bool = True


PATCH_KINDS: Registry[PatchKind] = Registry("patch kind")
PATCH_KINDS.add("resid_post", PatchKind("the residual stream after block L"))
PATCH_KINDS.add("resid_pre", PatchKind("the residual stream entering block L"))
PATCH_KINDS.add("attn_out", PatchKind("block L's attention output"))
PATCH_KINDS.add("mlp_out", PatchKind("block L's MLP output"))
PATCH_KINDS.add("z", PatchKind("one head's output before W_O mixes heads", per_head=True))
PATCH_KINDS.add("thought_input", PatchKind("the continuous thought fed at thought k", per_layer=False))


def span_positions(site: Site, n_latents: int) -> list[str]:
    """The named positions a site writes: thoughts 1..n for ``"thoughts"``, BOT and thoughts 1..n for
    ``"latents"``, else its own position (not for ``"changed"``, whose tokens are found per question)."""
    if site.position in SPAN_STARTS:
        first = SPAN_STARTS[site.position]
        return ["bot"] * (first == 0) + [f"thought:{k}" for k in range(1, n_latents + 1)]
    return [site.position]


def sweep_sites(
    n_layers: int,
    n_latents: int = 6,
    *,
    kinds: Sequence[str] = ("resid_post",),
    positions: Sequence[str] | None = None,
    n_heads: int | None = None,
    layer_only: bool = False,
) -> list[Site]:
    """Every site of a sweep. Default positions: the changed number's tokens, the last question token, BOT,
    thoughts 1..n, EOT. ``layer_only`` adds, per layer and kind, two sites: every thought at once
    (``"thoughts"``) and BOT with every thought (``"latents"``). ``thought_input`` sites (the fed thought,
    position only) cover thoughts 1..n."""
    PATCH_KINDS.check(kinds)
    if positions is None:
        positions = [CHANGED, "question:-1", "bot", *[f"thought:{k}" for k in range(1, n_latents + 1)], "eot"]
    sites = []
    for kind in kinds:
        entry = PATCH_KINDS[kind]
        if not entry.per_layer:
            sites += [Site.of(kind, None, f"thought:{k}") for k in range(1, n_latents + 1)]
            continue
        for layer in range(n_layers):
            heads = range(n_heads or 0) if entry.per_head else [None]
            for head in heads:
                sites += [Site.of(kind, layer, p, head) for p in positions]
                if layer_only:
                    sites += [Site.of(kind, layer, span, head) for span in SPAN_STARTS]
    return sites
