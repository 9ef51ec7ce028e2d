"""Interventions and answer metrics, against hand-computed values, exact invariants and the HF reference."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from codi_lens import load_codi, thought_hook_name
from codi_lens.interventions import (
    ablate_heads,
    compose,
    gaussian_noise_like,
    knockout_attention,
    mean_activation,
    mean_thought_embeds,
    mean_thoughts,
    noise_at,
    noise_thoughts,
    random_direction,
    replace_at,
    shuffle_thoughts,
    steer,
    swap_thoughts,
    thought_scope,
    zero_at,
    zero_thoughts,
)
from codi_lens.metrics import (
    classify_answer,
    find_answer_number,
    kl_divergence,
    logit_difference,
    logits_at_answer,
    normalised_recovery,
)
from codi_lens.stats import bootstrap_ci


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    return load_codi(ckpt.checkpoint_dir, ckpt.base_dir), ckpt.reference()


def identity(acts, hook):
    return acts


# ---------------------------------------------------------------------- thought interventions
def test_identity_hooks_reproduce_the_baseline(llama, questions):
    model, _ = llama
    base = model.run_codi(questions, max_new_tokens=6)
    names = [thought_hook_name(k, "input") for k in range(1, 7)] + ["blocks.0.hook_resid_post"]
    again = model.run_codi(questions, max_new_tokens=6, fwd_hooks=[(n, identity) for n in names])
    assert torch.equal(again.latent_states, base.latent_states)
    assert again.answer_tokens == base.answer_tokens


@pytest.mark.parametrize("k", [1, 3, 6])
def test_zeroing_thought_k_leaves_earlier_latents_bit_identical(llama, questions, k):
    model, _ = llama
    base = model.run_codi(questions, max_new_tokens=2)
    ablated = model.run_codi(questions, max_new_tokens=2, fwd_hooks=zero_thoughts([k]))
    # h_0 .. h_{k-1} are computed before thought k is fed; h_k is computed from it.
    assert torch.equal(ablated.latent_states[:, :k], base.latent_states[:, :k])
    assert torch.equal(ablated.thought_embeds[:, k - 1], torch.zeros_like(base.thought_embeds[:, k - 1]))
    assert (ablated.latent_states[:, k] - base.latent_states[:, k]).abs().max() > 1e-3


def test_scopes():
    assert thought_scope("single", 3, 6) == [3]
    assert thought_scope("cumulative", 3, 6) == [1, 2, 3]
    assert thought_scope("all", 0, 6) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="outside 1..6"):
        thought_scope("single", 7, 6)


def test_mean_over_a_one_problem_reference_set_is_that_problems_thought(llama, questions):
    model, _ = llama
    means = mean_thought_embeds(model, questions[:1])
    own = model.run_codi(questions[:1], max_new_tokens=1).thought_embeds[0]
    assert torch.allclose(means, own, atol=1e-6, rtol=0)
    # Feeding those means at every thought reproduces that problem's run exactly.
    base = model.run_codi(questions[:1], max_new_tokens=4)
    fed = model.run_codi(questions[:1], max_new_tokens=4, fwd_hooks=mean_thoughts(range(1, 7), means))
    assert (fed.latent_states - base.latent_states).abs().max() <= 1e-5
    # The mean of a residual activation at a named position, over one problem, is its own value.
    result, cache = model.run_codi_with_cache(questions[1:2], names_filter="blocks.1.hook_resid_post", max_new_tokens=1)
    where = result.positions.resolve(["thought:2", "question:-1"])[0]
    mean = mean_activation(model, questions[1:2], "blocks.1.hook_resid_post", ["thought:2", "question:-1"])
    assert torch.allclose(mean, cache["blocks.1.hook_resid_post"][0, where], atol=1e-6, rtol=0)


def test_swap_and_shuffle_feed_the_given_thoughts(llama, questions):
    model, _ = llama
    base = model.run_codi(questions, max_new_tokens=1)
    donors = base.thought_embeds.roll(1, dims=0)
    swapped = model.run_codi(questions, max_new_tokens=1, fwd_hooks=swap_thoughts([2], donors))
    assert torch.equal(swapped.thought_embeds[:, 1], donors[:, 1])
    assert torch.equal(swapped.latent_states[:, :2], base.latent_states[:, :2])
    hooks = shuffle_thoughts([1, 2, 3, 4, 5, 6], base.thought_embeds, seed=3)
    shuffled = model.run_codi(questions, max_new_tokens=1, fwd_hooks=hooks)
    # Every thought is the baseline's thought from another step, and each baseline thought is used once.
    matches = (shuffled.thought_embeds[:, :, None] == base.thought_embeds[:, None]).all(-1)  # [b, fed, source]
    assert matches.sum(-1).eq(1).all() and matches.sum(-2).eq(1).all()
    assert not matches.diagonal(dim1=1, dim2=2).any()


def test_noise_is_seeded_per_row_and_scaled_to_the_norm(llama, questions):
    model, _ = llama
    x = torch.randn(3, 4096, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.1]])
    noise = gaussian_noise_like(x, [1, 2, 3])
    assert torch.equal(noise[1:2], gaussian_noise_like(x[1:2], [2]))  # a row's noise ignores its batch
    ratio = noise.norm(dim=1) / x.norm(dim=1)
    assert torch.allclose(ratio, torch.ones(3, dtype=torch.float64), atol=0.05)  # sqrt(d) scaling, d = 4096
    batch = model.run_codi(questions, max_new_tokens=3, fwd_hooks=noise_thoughts([2], [10, 20, 30]))
    alone = model.run_codi(questions[1:2], max_new_tokens=3, fwd_hooks=noise_thoughts([2], [20]))
    assert (batch.latent_states[1] - alone.latent_states[0]).abs().max() <= 1e-5
    # Written out: thought 2 of row i gets a float64 N(0, I) draw seeded with seeds[i] + 2, scaled to the
    # thought's norm / sqrt(d_model); thought 1 is untouched.
    base = model.run_codi(questions, max_new_tokens=1)
    assert torch.equal(batch.thought_embeds[:, 0], base.thought_embeds[:, 0])
    for i, seed in enumerate([10, 20, 30]):
        z = base.thought_embeds[i, 1].double()
        draw = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
        expected = base.thought_embeds[i, 1] + (draw * z.norm() / z.numel() ** 0.5).float()
        assert torch.allclose(batch.thought_embeds[i, 1], expected, atol=1e-6)


# ---------------------------------------------------------------------- positional interventions
def test_positional_edits_touch_only_their_positions(llama, questions):
    model, _ = llama
    name = "blocks.0.hook_resid_post"
    base, clean = model.run_codi_with_cache(questions, names_filter=name, max_new_tokens=2)
    vector = torch.randn(model.cfg.d_model)
    steered, cache = model.run_codi_with_cache(
        questions, names_filter=name, max_new_tokens=2, fwd_hooks=steer(model, name, ["thought:3"], vector, alpha=2.0)
    )
    where = base.positions.resolve(["thought:3"])[:, 0]
    rows = torch.arange(len(questions))
    assert torch.allclose(cache[name][rows, where] - clean[name][rows, where], 2.0 * vector.expand(3, -1), atol=1e-5)
    before = int(where.min())
    assert torch.equal(cache[name][:, :before], clean[name][:, :before])
    # zero and replace, composed on one hook point, apply in order.
    value = torch.full((model.cfg.d_model,), 0.5)
    _, both = model.run_codi_with_cache(
        questions,
        names_filter=name,
        max_new_tokens=1,
        fwd_hooks=compose(zero_at(model, name, ["eot"]), replace_at(model, name, ["bot"], value[None])),
    )
    eot, bot = base.positions.resolve(["eot"])[:, 0], base.positions.resolve(["bot"])[:, 0]
    assert both[name][rows, eot].abs().max() == 0
    assert torch.equal(both[name][rows, bot], value.expand(3, -1))


def test_noise_at_a_position_is_seeded_per_row_and_touches_only_it(llama, questions):
    model, _ = llama
    name = "blocks.0.hook_resid_post"
    base, clean = model.run_codi_with_cache(questions, names_filter=name, max_new_tokens=1)
    hooks = noise_at(model, name, ["thought:2"], seeds=[7, 8, 9])
    _, noisy = model.run_codi_with_cache(questions, names_filter=name, max_new_tokens=1, fwd_hooks=hooks)
    where = base.positions.resolve(["thought:2"])[:, 0]
    rows = torch.arange(len(questions))
    added = noisy[name][rows, where] - clean[name][rows, where]
    # The documented noise written out: per row, a float64 N(0, I) draw from a generator seeded with the row's
    # seed plus the position's index among those given (0 here), scaled to norm(x) / sqrt(d_model).
    for i, seed in enumerate([7, 8, 9]):
        x = clean[name][i, where[i]].double()
        draw = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = (draw * x.norm() / x.numel() ** 0.5).float()
        assert torch.allclose(added[i], expected, atol=1e-5)
    assert torch.equal(noisy[name][:, : int(where.min())], clean[name][:, : int(where.min())])
    _, alone = model.run_codi_with_cache(
        questions[1:2], names_filter=name, max_new_tokens=1, fwd_hooks=noise_at(model, name, ["thought:2"], seeds=[8])
    )
    own = int(model.run_codi(questions[1:2], max_new_tokens=1).positions.resolve(["thought:2"])[0, 0])
    assert torch.allclose(alone[name][0, own], noisy[name][1, where[1]], atol=1e-5)


def test_random_direction_control_has_the_same_norm():
    v = torch.randn(64)
    r = random_direction(v, seed=1)
    assert math.isclose(float(r.norm()), float(v.norm()), rel_tol=1e-5)
    assert torch.equal(r, random_direction(v, seed=1)) and not torch.equal(r, random_direction(v, seed=2))


# ---------------------------------------------------------------------- attention
def _pattern_run(model, questions, hooks):
    return model.run_codi_with_cache(
        questions, names_filter=lambda n: n.endswith("hook_pattern"), max_new_tokens=2, fwd_hooks=hooks
    )


def test_attention_knockout_on_scores_and_on_pattern_agree_and_renormalise(llama, questions):
    model, _ = llama
    base, clean = _pattern_run(model, questions, [])
    by_scores = _pattern_run(model, questions, knockout_attention(model, ["thought:2"], layers=[0]))[1]
    by_pattern = _pattern_run(model, questions, knockout_attention(model, ["thought:2"], layers=[0], method="pattern"))[
        1
    ]
    name = "blocks.0.attn.hook_pattern"
    assert (by_scores[name] - by_pattern[name]).abs().max() <= 1e-5
    key = base.positions.resolve(["thought:2"])[:, 0]
    query = base.positions.resolve(["thought:3"])[:, 0]
    for i in range(len(questions)):
        pattern = by_scores[name][i]
        assert pattern[:, key[i] + 1 :, key[i]].abs().max() == 0  # later queries no longer see thought 2
        assert torch.equal(pattern[:, key[i], key[i]], clean[name][i, :, key[i], key[i]])  # it still sees itself
        # Thought 3's input was computed before the knockout could act, so its layer-0 row is the clean row
        # with thought 2's weight removed and the rest rescaled to sum to 1.
        row = clean[name][i, :, query[i]].clone()
        row[:, key[i]] = 0
        assert torch.allclose(pattern[:, query[i]], row / row.sum(-1, keepdim=True), atol=1e-6)
        visible = pattern[:, : query[i] + 1][:, :, : query[i] + 1]
        assert torch.allclose(visible.sum(-1)[:, base.positions.n_pad[i] :], torch.ones(1), atol=1e-5)


def test_knockout_of_some_heads_leaves_the_others(llama, questions):
    model, _ = llama
    _, clean = _pattern_run(model, questions[:1], [])
    _, cache = _pattern_run(model, questions[:1], knockout_attention(model, ["bot"], layers=[0], heads=[1]))
    name = "blocks.0.attn.hook_pattern"
    others = [h for h in range(model.cfg.n_heads) if h != 1]
    # Thought 1's input is prj(h_0), computed at BOT before any knocked-out row: its layer-0 row is clean
    # for every head but the knocked-out one.
    result = model.run_codi(questions[:1], max_new_tokens=1)
    t1 = int(result.positions.resolve(["thought:1"])[0, 0])
    assert torch.equal(cache[name][0, others, t1], clean[name][0, others, t1])
    assert cache[name][0, 1, t1, int(result.positions.bot)] == 0


def test_ablating_every_head_leaves_only_the_output_bias(llama, questions):
    model, _ = llama
    hooks = ablate_heads(model, 0, range(model.cfg.n_heads))
    _, cache = model.run_codi_with_cache(
        questions[:1], names_filter="blocks.0.hook_attn_out", max_new_tokens=2, fwd_hooks=hooks
    )
    expected = model.blocks[0].attn.b_O.detach().expand_as(cache["blocks.0.hook_attn_out"][0])
    assert torch.allclose(cache["blocks.0.hook_attn_out"][0], expected, atol=1e-6)


# ---------------------------------------------------------------------- metrics
def test_kl_is_zero_for_identical_runs_and_matches_a_hand_computed_value():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64).log()
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log(p / q)
    assert math.isclose(float(kl_divergence(p, q)[0]), expected, rel_tol=1e-12)
    assert float(kl_divergence(p + 3.0, p)[0]) == pytest.approx(0.0, abs=1e-15)  # logits are shift-invariant


def test_logit_difference_recovery_and_classification():
    logits = torch.tensor([[1.0, 4.0, 2.0]])
    assert float(logit_difference(logits, torch.tensor([1]), torch.tensor([2]))[0]) == 2.0
    assert normalised_recovery(3.0, 1.0, 5.0) == 0.5
    assert math.isnan(normalised_recovery(3.0, 2.0, 2.0))
    assert list(
        normalised_recovery(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0]))[:1]
    ) == [0.5]
    assert [classify_answer(x, 18, 20) for x in (18.0, 20.0, 7.0, None)] == ["clean", "corrupted", "other", "other"]


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that spells numbers digit by digit ("18" -> "1", "8")."""
    vocab = {c: i for i, c in enumerate(["<unk>", "</s>", *"Theanswris:0123456789 ."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_answer_number_position_for_numbers_split_into_several_tokens():
    tok = _char_tokenizer()
    ids = tok("The answer is: 18", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "The answer is: 18"
    number = find_answer_number(tok, ids)
    index = [tok.convert_ids_to_tokens(i) for i in ids].index("1")
    assert number.index == index and number.token == ids[index] and number.text == "18"
    assert number.prefix == tuple(ids[:index])
    assert find_answer_number(tok, tok("The answer is", add_special_tokens=False)["input_ids"]) is None


def test_answer_number_skips_special_tokens():
    """A special token spelled with a digit ('<pad7>') after the answer is not the answer's last number."""
    tok = _char_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad7>"})
    ids = tok("The answer is: 18", add_special_tokens=False)["input_ids"] + [tok.pad_token_id, tok.eos_token_id]
    number = find_answer_number(tok, ids)
    assert number.text == "18" and number.token == tok.convert_tokens_to_ids("1")


def test_logits_at_answer_match_the_reference(llama, questions):
    model, ref = llama
    base = model.run_codi(questions, max_new_tokens=8)
    numbers = [find_answer_number(model.tokenizer, t) for t in base.answer_tokens]
    chosen = [(i, n) for i, n in enumerate(numbers) if n is not None]
    if not chosen:  # random weights may write no digit: force one
        from codi_lens.metrics import AnswerNumber

        chosen = [(0, AnswerNumber(1, tuple(base.answer_tokens[0][:1]), base.answer_tokens[0][1], "x"))]
    qs = [questions[i] for i, _ in chosen]
    logits = logits_at_answer(model, qs, [n for _, n in chosen])
    for row, (i, n) in enumerate(chosen):
        expected = ref.teacher_forced_logits(questions[i], list(n.prefix) + [n.token])[n.index]
        assert (logits[row] - expected).abs().max() <= 1e-4
    assert torch.equal(kl_divergence(logits, logits), torch.zeros(len(chosen), dtype=torch.float64))
    i, n = chosen[0]  # a shorter loop: the reference with 3 thoughts
    short = logits_at_answer(model, [questions[i]], [n], n_latents=3)[0]
    expected = ref.teacher_forced_logits(questions[i], list(n.prefix) + [n.token], n_latents=3)[n.index]
    assert (short - expected).abs().max() <= 1e-4 and (short - logits[0]).abs().max() > 1e-3


def test_bootstrap_ci():
    estimate, low, high = bootstrap_ci([1.0, 1.0, 1.0])
    assert (estimate, low, high) == (1.0, 1.0, 1.0)
    # The percentile bootstrap of a 0/1 mean follows Binomial(100, 0.5) / 100: its 95% CI is that law's 2.5% and
    # 97.5% quantiles, [0.40, 0.60], to one step of 0.01 (Monte Carlo); a 90% CI ([0.42, 0.58]) is two steps off.
    estimate, low, high = bootstrap_ci([0, 1] * 50)
    expected = stats.binom.ppf([0.025, 0.975], 100, 0.5) / 100
    assert estimate == 0.5 and abs(low - expected[0]) <= 0.01 + 1e-12 and abs(high - expected[1]) <= 0.01 + 1e-12
