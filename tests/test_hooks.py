"""Hooks inside the CODI loop, checked against full-sequence HF forwards of the reference model.

codi_lens runs the loop in KV-cache chunks; these tests re-run the *whole* resulting sequence in one
HF pass (no cache, the reference's own weights) with the same intervention applied by a PyTorch hook
at the same position, and require the thoughts, latent states and activations to agree.
"""

from __future__ import annotations

import pytest
import torch

from codi_lens import load_codi, positional_hook, thought_hook_name, zero_at_positions

ATOL = 1e-4


def _hf_layers(ref):
    base = ref.model.get_base_model() if hasattr(ref.model, "get_base_model") else ref.model
    return base.transformer.h if hasattr(base, "transformer") else base.model.layers


def _hf_sequence_embeds(ref, question_ids: list[int], thoughts: torch.Tensor, tail_ids: list[int]) -> torch.Tensor:
    """Embeddings of [question, BOT, thoughts..., EOT, tail tokens] as the reference model sees them."""
    embed = ref.model.get_input_embeddings()
    head = embed(torch.tensor([question_ids + [ref.bot_id]]))
    tail = embed(torch.tensor([[ref.eot_id] + tail_ids]))
    return torch.cat([head, thoughts[None].to(head.dtype), tail], dim=1)


def _question_ids(model, question: str) -> list[int]:
    tokens, mask = model.tokenize_questions([question])
    return tokens[0, mask[0].bool()].tolist()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_checkpoint):
    ckpt = tiny_checkpoint(request.param)
    return load_codi(ckpt.checkpoint_dir, ckpt.base_dir), ckpt.reference()


def test_interventions_inside_the_loop_match_a_full_hf_pass(setup, questions):
    """Zero thought 3's input and add a vector to layer-0 resid_post at thought 2, in a padded batch."""
    model, ref = setup
    batch = questions[:2]
    probe = model.run_codi(batch, max_new_tokens=1)
    thought2 = probe.positions.thoughts[1]
    push = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    hooks = [
        (thought_hook_name(3, "input"), lambda z, hook: torch.zeros_like(z)),
        ("blocks.0.hook_resid_post", positional_hook(model, [thought2], lambda acts, hook, pos: acts + push)),
    ]
    result = model.run_codi(batch, max_new_tokens=3, fwd_hooks=hooks)
    assert not torch.allclose(result.latent_states, probe.latent_states, atol=1e-3), "the hooks must change something"

    for i, question in enumerate(batch):
        ids = _question_ids(model, question)
        rel_bot = len(ids)

        def add_push(module, args, output, pos=rel_bot + 2):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[:, pos] += push
            return output

        handle = _hf_layers(ref)[0].register_forward_hook(add_push)
        try:
            with torch.no_grad():
                out = ref.model(
                    inputs_embeds=_hf_sequence_embeds(ref, ids, result.thought_embeds[i], []), output_hidden_states=True
                )
        finally:
            handle.remove()
        hf_latents = out.hidden_states[-1][0, rel_bot : rel_bot + 7]
        assert (hf_latents - result.latent_states[i]).abs().max() <= ATOL
        with torch.no_grad():
            hf_projected = ref.prj(hf_latents)
        for k in range(1, 7):
            expected = torch.zeros_like(hf_projected[0]) if k == 3 else hf_projected[k - 1]
            assert (result.thought_embeds[i, k - 1] - expected).abs().max() <= ATOL
        first_answer = out.logits[0, -1, : model.cfg.d_vocab - 1].argmax().item()
        assert first_answer == result.answer_tokens[i][0]


def test_stitched_cache_equals_a_full_hf_pass(setup, questions):
    model, ref = setup
    batch = questions[:2]
    result, cache = model.run_codi_with_cache(batch, max_new_tokens=4)
    n_layers = model.cfg.n_layers
    for i, question in enumerate(batch):
        ids = _question_ids(model, question)
        fed_answer = result.answer_tokens[i][:-1]
        with torch.no_grad():
            embeds = _hf_sequence_embeds(ref, ids, result.thought_embeds[i], fed_answer)
            out = ref.model(inputs_embeds=embeds, output_hidden_states=True, output_attentions=True)
        start = result.positions.n_pad[i]
        length = out.hidden_states[0].shape[1]
        # hook_embed: the reference's embedding rows of the question, BOT, EOT and fed answer tokens, and the
        # fed thoughts themselves at thought positions (GPT-2's position embeddings come after, at hook_pos_embed).
        assert cache["hook_embed"].shape[1] == cache["blocks.0.hook_resid_pre"].shape[1] >= start + length
        assert (cache["hook_embed"][i, start : start + length] - embeds[0]).abs().max() <= ATOL
        for layer in range(n_layers - 1):  # the last HF hidden state has the final norm applied
            ours = cache[f"blocks.{layer}.hook_resid_post"][i, start : start + length]
            assert (ours - out.hidden_states[layer + 1][0]).abs().max() <= ATOL
        pattern = cache[f"blocks.{n_layers - 1}.attn.hook_pattern"][
            i, :, start : start + length, start : start + length
        ]
        assert (pattern - out.attentions[-1][0]).abs().max() <= ATOL
        # Thought hooks against the full pass: h_k is HF's last hidden state (final norm applied) at
        # BOT + k, and prj.hook_out is the reference projection head applied to it.
        rel_bot = len(ids)
        hf_latents = out.hidden_states[-1][0, rel_bot : rel_bot + 7]
        for k in range(7):
            assert (cache[thought_hook_name(k, "hidden")][i] - hf_latents[k]).abs().max() <= ATOL
        with torch.no_grad():
            hf_projected = ref.prj(hf_latents)
        assert (cache["prj.hook_out"][i] - hf_projected).abs().max() <= ATOL
        # What the loop fed at thought k is the projection of step k - 1.
        assert torch.equal(cache["prj.hook_out"][i, :6], result.thought_embeds[i])
    # No autograd graph is kept (the weights require grad): a graph held through the KV cache grew
    # the 1B-shape run by tens of MB per generated token.
    assert any(p.requires_grad for p in model.parameters())
    assert not result.latent_states.requires_grad and not result.thought_embeds.requires_grad


def test_names_filter_and_zero_at_positions(setup, questions):
    model, _ = setup
    probe = model.run_codi(questions[:2], max_new_tokens=2)
    eot = probe.positions.eot
    result, cache = model.run_codi_with_cache(
        questions[:2],
        max_new_tokens=2,
        names_filter=lambda n: n.endswith("hook_resid_post"),
        fwd_hooks=[("blocks.0.hook_resid_post", zero_at_positions(model, [eot]))],
    )
    assert set(cache.keys()) == {f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)}
    assert cache["blocks.0.hook_resid_post"][:, eot].abs().max() == 0
    assert cache["blocks.0.hook_resid_post"][:, eot - 1].abs().max() > 0
    # Thoughts are before EOT, so the latent loop is untouched.
    assert torch.equal(result.latent_states, probe.latent_states)


def test_hooks_are_removed_even_when_a_hook_raises(setup, questions):
    model, _ = setup

    def boom(acts, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_codi(questions[:1], max_new_tokens=1, fwd_hooks=[(thought_hook_name(2, "hidden"), boom)])
    assert all(len(hp._forward_hooks) == 0 for hp in model.hook_dict.values())
    model.run_codi(questions[:1], max_new_tokens=1)  # runs clean afterwards


def test_thought_hooks_fire_once_per_step(setup, questions):
    model, _ = setup
    seen: dict[str, list[tuple]] = {}

    def record(acts, hook):
        seen.setdefault(hook.name, []).append(tuple(acts.shape))

    n = 8
    result = model.run_codi(
        questions, n_latents=n, max_new_tokens=1, fwd_hooks=[(lambda name: name.startswith("thought."), record)]
    )
    assert result.latent_states.shape == (3, n + 1, model.cfg.d_model)
    expected = {thought_hook_name(k, kind) for k in range(n + 1) for kind in ("hidden", "projection")}
    expected |= {thought_hook_name(k, "input") for k in range(1, n + 1)}
    assert set(seen) == expected
    assert all(shapes == [(3, model.cfg.d_model)] for shapes in seen.values())
    with pytest.raises(ValueError):
        thought_hook_name(0, "input")


def test_replace_and_zero_thought_interventions(setup, questions):
    from codi_lens.interventions import replace_thoughts, zero_thoughts

    model, _ = setup
    clean = model.run_codi(questions[:2], max_new_tokens=3)
    # Feeding the model its own thoughts changes nothing.
    same = model.run_codi(
        questions[:2],
        max_new_tokens=3,
        fwd_hooks=replace_thoughts({k: clean.thought_embeds[:, k - 1] for k in range(1, 7)}),
    )
    assert torch.equal(same.latent_states, clean.latent_states) and same.answer_tokens == clean.answer_tokens
    # Swapping the two problems' thoughts feeds exactly the other problem's vectors.
    swapped = model.run_codi(
        questions[:2],
        max_new_tokens=3,
        fwd_hooks=replace_thoughts({k: clean.thought_embeds.flip(0)[:, k - 1] for k in range(1, 7)}),
    )
    assert torch.equal(swapped.thought_embeds, clean.thought_embeds.flip(0))
    assert torch.equal(swapped.latent_states[:, 0], clean.latent_states[:, 0])  # h_0 precedes every thought
    zeroed = model.run_codi(questions[:2], max_new_tokens=3, fwd_hooks=zero_thoughts([2, 5]))
    assert zeroed.thought_embeds[:, [1, 4]].abs().max() == 0
    assert torch.equal(zeroed.latent_states[:, :2], clean.latent_states[:, :2])
    assert not torch.equal(zeroed.latent_states[:, 2], clean.latent_states[:, 2])


def test_saes_attach_inside_the_codi_loop(setup, questions):
    """An SAE spliced at a residual hook runs at every chunk of the loop; with the error term it is exact."""
    from sae_lens import StandardSAE, StandardSAEConfig

    model, _ = setup
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    clean, plain = model.run_codi_with_cache(questions[:2], max_new_tokens=3, names_filter="blocks.0.hook_resid_post")
    model.add_sae(sae, use_error_term=True)
    try:
        spliced, cache = model.run_codi_with_cache(
            questions[:2], max_new_tokens=3, names_filter=lambda n: "hook_sae_acts_post" in n
        )
        assert (spliced.latent_states - clean.latent_states).abs().max() <= 1e-4
        acts = cache["blocks.0.hook_resid_post.hook_sae_acts_post"]
        assert acts.shape == (
            2,
            spliced.positions.answer_start + max(spliced.positions.answer_lengths) - 1,
            sae.cfg.d_sae,
        )
        # The feature activations at every position, written out for a ReLU SAE: relu((x - b_dec) W_enc + b_enc)
        # of the plain run's residual there (the error term leaves the run itself unchanged).
        x = plain["blocks.0.hook_resid_post"]
        with torch.no_grad():
            expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        assert (acts - expected).abs().max() <= 1e-4
        model.add_sae(sae, use_error_term=False)  # reconstruction only: the thoughts now change
        lossy = model.run_codi(questions[:2], max_new_tokens=3)
        assert (lossy.latent_states - clean.latent_states).abs().max() > 1e-3
    finally:
        model.reset_saes()
    assert torch.equal(model.run_codi(questions[:2], max_new_tokens=3).latent_states, clean.latent_states)


def test_positional_hooks_on_rotated_keys_hold_for_later_chunks(tiny_checkpoint, questions):
    """Zeroing a rotated key equals zeroing it before rotation (rotation is linear). hook_k sees only the
    new positions and the cache keeps the zeroed key; hook_rot_k sees every cached position at every
    chunk, so the positional hook must zero it in every chunk to agree."""
    model = load_codi(tiny_checkpoint("llama").checkpoint_dir, tiny_checkpoint("llama").base_dir)
    batch = questions[:2]
    bot = model.run_codi(batch, max_new_tokens=1).positions.bot
    zero = lambda name: [(name, zero_at_positions(model, [bot - 1, bot]))]  # noqa: E731
    before = model.run_codi(batch, max_new_tokens=3, fwd_hooks=zero("blocks.0.attn.hook_k"))
    after = model.run_codi(batch, max_new_tokens=3, fwd_hooks=zero("blocks.0.attn.hook_rot_k"))
    plain = model.run_codi(batch, max_new_tokens=3)
    assert not torch.allclose(before.latent_states, plain.latent_states, atol=1e-3)
    assert (before.latent_states - after.latent_states).abs().max() <= ATOL
    assert before.answer_tokens == after.answer_tokens
