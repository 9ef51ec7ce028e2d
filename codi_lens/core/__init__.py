"""The core: the CODI model, its latent loop, positions and hooks. It imports nothing of codi_lens outside itself.

Modules in dependency order (each imports only those above it):

- independent: ``errors`` (the project's error classes), ``registry`` (string choices), ``answers``
  (upstream's text rules), ``padding``, ``hashing``, ``names`` (every hook name), ``components`` (the
  projection head, thought hook points, the marker token ids), ``latent_loop`` (what sets one method's loop
  apart: CODI's, Coconut's);
- on those: ``positions`` (named positions, the chunk scope), ``hooks`` (positional hooks), ``recording``
  (the activation recorder), ``results`` (what runs return), ``loop`` (the steps of a run);
- on the loop: ``model`` (:class:`~codi_lens.core.model.CODIModel`), then ``branching`` (runs sharing
  their start) and ``gradients`` (derivatives through the unrolled loop).
"""
