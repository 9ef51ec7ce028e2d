"""CODI training: losses decrease on a fixed batch, resume is exact, export loads strictly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from codi_lens import load_codi
from codi_lens.data.synthetic import DAYS, build_tokenizer, generate_problems
from codi_lens.loading.checkpoint import detect_layout, read_tensor_info
from codi_lens.training.batches import make_batch, result_positions
from codi_lens.training.config import TrainConfig
from codi_lens.training.export import export_codi
from codi_lens.training.losses import (
    chain_logit_loss,
    chain_loss,
    chain_targets,
    codi_losses,
    distillation_loss,
    student_forward,
)
from codi_lens.training.module import CODIModule, add_codi_tokens, build_llama_lm, fourier_number_embeddings
from codi_lens.training.trainer import Trainer

SHAPE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 64}


def _setup(seed: int = 0, **cfg):
    tok = build_tokenizer()
    lm = build_llama_lm(len(tok), seed=seed, **SHAPE)
    base_vocab = add_codi_tokens(lm)
    config = TrainConfig(batch_size=8, prj_dim=48, warmup_steps=2, **cfg)
    return tok, CODIModule(lm, config.prj_dim), base_vocab, config


def _assert_hooked_scores_match_training_pass(model, hooked, batch, problems, n_latents: int) -> None:
    """codi_lens' teacher-forced answer logits equal the training student pass's (fp32, 1e-4)."""
    model.eval()
    with torch.no_grad():
        logits, _, _ = student_forward(model, batch, n_latents)
    scores = hooked.score_answers(
        [p.question for p in problems], [f"The answer is: {p.answer_value}" for p in problems], append_eos=True
    )
    for i in range(len(problems)):
        n = int(scores.answer_mask[i].sum())
        assert (scores.logits[i, :n] - logits[i, :n]).abs().max() <= 1e-4


def test_training_steps_decrease_all_three_losses_on_a_fixed_batch():
    tok, model, base_vocab, cfg = _setup(lr=3e-3)
    batch = make_batch(generate_problems(8, seed=0), tok, base_vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    first = {k: v.item() for k, v in codi_losses(model, batch, cfg).items()}
    for _ in range(40):
        losses = codi_losses(model, batch, cfg)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    last = {k: v.item() for k, v in codi_losses(model, batch, cfg).items()}
    for name in ("ce_student", "ce_teacher", "distill", "loss"):
        assert last[name] < first[name], (name, first[name], last[name])
    assert first["distill"] > 0


def test_distillation_loss_by_hand_and_its_scale():
    """Upstream form: SmoothL1 / teacher std; standardised form: SmoothL1 of states / teacher std."""
    t = torch.tensor([[[0.0, 0.0], [1.0, 3.0]]])  # [batch 1, pos 2, d 2]; teacher std at pos 1 = sqrt(2)
    s = torch.tensor([[[1.0, 3.5], [9.0, 9.0]]])  # student at pos 0 differs by (0, 0.5) from teacher pos 1
    s_pos, t_pos = torch.tensor([0]), torch.tensor([1])
    sigma = 2**0.5
    upstream = distillation_loss([s], [t], s_pos, t_pos)  # smooth_l1 of (0, 0.5), beta 1: mean(0, 0.125)
    assert torch.isclose(upstream, torch.tensor(0.0625 / sigma))
    standardised = distillation_loss([s], [t], s_pos, t_pos, standardise=True)  # diffs (0, 0.5/sigma)
    assert torch.isclose(standardised, torch.tensor(0.5 * 0.5 * (0.5 / sigma) ** 2))
    # Scaling every state by c: the standardised loss is unchanged, upstream's scales with c.
    c = 0.02
    assert torch.isclose(distillation_loss([c * s], [c * t], s_pos, t_pos, standardise=True), standardised)
    assert torch.isclose(distillation_loss([c * s], [c * t], s_pos, t_pos), c * c * upstream / c, rtol=1e-4)


def test_result_positions_point_at_the_token_before_each_intermediate_result():
    """In the teacher sequence, the token after each chain position is that step's result, for every
    step (the whole chain when the last step is kept): the ``=`` of each equation, or the day word
    before each bare result of the ``results`` form."""
    tok, _, base_vocab, _ = _setup()
    problems = generate_problems(6, seed=3)
    batch = make_batch(problems, tok, base_vocab, drop_last_cot_step=False)
    for i, p in enumerate(problems):
        tokens = tok.convert_ids_to_tokens(batch.teacher_ids[i].tolist())
        positions = [j for j in batch.teacher_result_pos[i].tolist() if j >= 0]
        assert [tokens[j] for j in positions] == ["="] * p.n_steps
        assert [int(tokens[j + 1]) for j in positions] == [int(v) for v in p.intermediates]
    labels = [" ".join(f"{d} {eq}" for d, eq in zip(DAYS, p.cot.split())) for p in problems]
    days = [replace(p, solution=f"{label}\n#### {p.answer_value}") for p, label in zip(problems, labels)]
    labelled = make_batch(days, tok, base_vocab, drop_last_cot_step=False, cot_text="solution")
    results = make_batch(days, tok, base_vocab, drop_last_cot_step=False, cot_text="results")
    for i, p in enumerate(days):
        tokens = tok.convert_ids_to_tokens(labelled.teacher_ids[i].tolist())
        positions = [j for j in labelled.teacher_result_pos[i].tolist() if j >= 0]
        assert [tokens[j - 5] for j in positions] == DAYS[: p.n_steps]  # Monday << a op x =
        assert [int(tokens[j + 1]) for j in positions] == [int(v) for v in p.intermediates]
        # "Monday 6 Tuesday 18 ...": the question, then day and result alternating
        tokens = tok.convert_ids_to_tokens(results.teacher_ids[i].tolist())
        positions = [j for j in results.teacher_result_pos[i].tolist() if j >= 0]
        assert [tokens[j] for j in positions] == DAYS[: p.n_steps]
        assert [int(tokens[j + 1]) for j in positions] == [int(v) for v in p.intermediates]
        assert positions == [positions[0] + 2 * k for k in range(p.n_steps)]
    for form in ("solution", "results"):
        with pytest.raises(ValueError, match="drop_last_cot_step"):
            make_batch(days, tok, base_vocab, cot_text=form)
    with pytest.raises(ValueError, match="cot_text"):
        make_batch(days, tok, base_vocab, cot_text="words")
    dropped = make_batch(problems, tok, base_vocab)  # upstream: the last step is not in the teacher's chain
    assert [int((row >= 0).sum()) for row in dropped.teacher_result_pos] == [p.n_steps - 1 for p in problems]
    chain = "<<3+4=7>> <<7*2=14>>"  # << 3 + 4 = 7 >> << 7 * 2 = 14 >>
    assert result_positions(chain, [6, 16], tok) == [4, 11]
    assert result_positions("Monday 7 Tuesday 14", [7, 17], tok) == [0, 2]


def test_chain_loss_by_hand():
    """Thought j against the teacher at the position predicting result j, embeddings left out, pairs
    past a problem's last result (or past the last thought) ignored, states divided by the teacher's std."""
    teacher = [torch.full((2, 5, 2), 7.0), torch.zeros(2, 5, 2)]  # [embeddings, layer 1]: batch 2, pos 5, d 2
    teacher[1][0, 1] = torch.tensor([1.0, 3.0])  # problem 0, equation 1 at position 1
    teacher[1][1, 4] = torch.tensor([3.0, 1.0])  # problem 1, equation 1 at position 4
    equal_pos = torch.tensor([[1, -1, -1], [4, 2, 3]])  # problem 1 has a third equation but only 2 thoughts
    thoughts = [torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)]  # [batch, n_latents 2, d]
    thoughts[1][0, 0] = torch.tensor([1.0, 3.5])  # differs by 0.5 in one element
    thoughts[1][1, 0] = torch.tensor([3.0, 1.0])  # equal
    thoughts[1][1, 1] = torch.tensor([0.0, 0.0])  # equation 2 of problem 1 at position 2 holds (0, 0): equal
    target = torch.stack([teacher[1][0, 1], teacher[1][1, 4], teacher[1][1, 2]])
    sigma = target.std()
    expected = 0.5 * (0.5 / sigma) ** 2 / 6  # one element of six differs, quadratic part of SmoothL1
    assert torch.isclose(chain_loss(thoughts, teacher, equal_pos), expected)
    assert chain_loss(thoughts, teacher, torch.full((2, 3), -1)) == 0


def test_chain_logit_loss_by_hand():
    """KL(teacher || thought) over the paired (problem, thought) cells only, averaged over the pairs."""
    teacher = torch.zeros(2, 4, 3)  # batch 2, pos 4, vocab 3
    teacher[0, 2] = torch.tensor([2.0, 0.0, 0.0])
    teacher[1, 1] = torch.tensor([0.0, 1.0, 0.0])
    thoughts = torch.zeros(2, 2, 3)  # uniform logits at every thought
    thoughts[1, 1] = torch.tensor([0.0, 5.0, -5.0])  # unpaired: must not count
    pairs = torch.tensor([[2, -1], [1, -1]])
    p0 = torch.tensor([2.0, 0.0, 0.0]).softmax(-1)
    p1 = torch.tensor([0.0, 1.0, 0.0]).softmax(-1)
    uniform = torch.full((3,), 1 / 3)
    kl = lambda p, q: (p * (p / q).log()).sum()  # noqa: E731
    expected = (kl(p0, uniform) + kl(p1, uniform)) / 2
    assert torch.isclose(chain_logit_loss(thoughts, teacher, pairs), expected)
    assert chain_logit_loss(thoughts, torch.zeros(2, 4, 3), pairs) == 0  # teacher uniform too
    assert chain_logit_loss(thoughts, teacher, torch.full((2, 2), -1)) == 0


def test_chain_targets_carry_the_answer_position_past_the_last_result():
    results = torch.tensor([[3, 7, -1], [4, -1, -1]])
    answer = torch.tensor([12, 9])
    assert chain_targets(results, answer, 4, carry_answer=False).tolist() == [[3, 7, -1, -1], [4, -1, -1, -1]]
    assert chain_targets(results, answer, 4, carry_answer=True).tolist() == [[3, 7, 12, 12], [4, 9, 9, 9]]
    assert chain_targets(results, answer, 2, carry_answer=True).tolist() == [[3, 7], [4, 9]]


@pytest.mark.parametrize("carry_answer", [False, True])
def test_chain_logits_pair_each_thought_with_its_own_result(tmp_path, carry_answer):
    """``codi_losses``' chain logit loss, rebuilt independently: thought ``j``'s distribution from
    codi_lens' hooked loop (the last layer's residual at thought ``j``, whose projection is fed as
    thought ``j + 1``), the teacher's at the ``=`` before its ``j``-th result, found by searching the
    teacher's tokens (and, with ``carry_answer``, at the ``:`` before the answer for thoughts past the
    last result); the mean KL agrees to fp32 1e-5. Pairing thought ``j`` with result ``j + 1`` instead
    gives another value, so an off-by-one in the training loss would fail here."""
    tok, model, base_vocab, cfg = _setup(
        seed=5, chain_logit_weight=1.0, drop_last_cot_step=False, chain_carry_answer=carry_answer
    )
    problems = generate_problems(6, seed=7)
    assert len({p.n_steps for p in problems}) > 1 and all(p.n_steps < cfg.n_latents for p in problems)
    batch = make_batch(problems, tok, base_vocab, drop_last_cot_step=False)
    model.eval()
    with torch.no_grad():
        trained = codi_losses(model, batch, cfg)["chain_logits"]
        teacher_logits = model.codi(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask).logits
    teacher = torch.log_softmax(teacher_logits, -1)
    export_codi(model, tok, tmp_path / "export")
    hooked = load_codi(tmp_path / "export", tmp_path / "export")
    last = f"blocks.{hooked.cfg.n_layers - 1}.hook_resid_post"
    result, cache = hooked.run_codi_with_cache([p.question for p in problems], names_filter=[last], max_new_tokens=1)
    with torch.no_grad():
        thoughts = torch.log_softmax(hooked.unembed(hooked.ln_final(cache[last][:, result.positions.thoughts])), -1)

    def mean_kl(shift: int) -> torch.Tensor:
        terms = []
        for i, p in enumerate(problems):
            tokens = tok.convert_ids_to_tokens(batch.teacher_ids[i].tolist())
            equals = [k for k, t in enumerate(tokens) if t == "="]
            assert [int(tokens[k + 1]) for k in equals] == [int(v) for v in p.intermediates]
            answer = next(k for k, t in enumerate(tokens) if t == ":")
            for j in range(1, cfg.n_latents + 1):
                if j + shift <= p.n_steps:
                    target = equals[j + shift - 1]
                elif carry_answer:
                    target = answer
                else:
                    continue
                t, s = teacher[i, target], thoughts[i, j - 1, : teacher.shape[-1]]
                terms.append((t.exp() * (t - s)).sum())
        return torch.stack(terms).mean()

    assert hooked.cfg.d_vocab == teacher.shape[-1]
    torch.testing.assert_close(trained, mean_kl(0), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(trained, mean_kl(1), rtol=1e-3)


def test_fourier_number_embeddings_by_hand():
    """Value 0 gets cos 1 / sin 0 at every period; value 1 with periods (2, 4): cos(pi) = -1,
    cos(pi/2) = 0, sin(pi) = 0, sin(pi/2) = 1; other tokens and dimensions keep their weights."""
    tok = build_tokenizer()
    lm = build_llama_lm(len(tok), seed=0, **SHAPE)
    before = lm.get_input_embeddings().weight.detach().clone()
    ids = tok.convert_tokens_to_ids(["0", "1"])
    fourier_number_embeddings(lm, ids, [0, 1], scale=0.5, periods=(2.0, 4.0))
    added = lm.get_input_embeddings().weight.detach() - before
    expected = torch.zeros_like(added)
    expected[ids[0], :4] = 0.5 * torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected[ids[1], :4] = 0.5 * torch.tensor([-1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(added, expected, rtol=0, atol=1e-6)
    assert torch.equal(lm.get_output_embeddings().weight, lm.get_input_embeddings().weight)  # tied
    with pytest.raises(ValueError, match="d_model is 32"):
        fourier_number_embeddings(lm, ids, [0, 1], scale=1.0, periods=tuple(range(1, 18)))


def test_batch_layout_marks_the_token_before_the_answer_number():
    tok, _, base_vocab, _ = _setup()
    problems = generate_problems(4, seed=1)
    batch = make_batch(problems, tok, base_vocab)
    for i, p in enumerate(problems):
        teacher = tok.convert_ids_to_tokens(batch.teacher_ids[i].tolist())
        assert teacher[batch.teacher_distill_pos[i]] == ":" and teacher[batch.teacher_distill_pos[i] + 1] == str(
            p.answer_value
        )
        answer = batch.answer_ids[i].tolist()
        assert answer[0] == base_vocab + 2  # EOT
        assert tok.convert_ids_to_tokens([answer[batch.student_distill_pos[i]]]) == [":"]
        assert batch.prompt_ids[i, -1] == base_vocab + 1  # BOT closes the (left-padded) prompt
        # the last CoT step is dropped from the teacher sequence, as in GSM8k-Aug
        teacher_text = "".join(t for t in teacher if t is not None)
        kept, dropped = p.cot.split()[:-1], p.cot.split()[-1]
        assert all(step in teacher_text for step in kept)
        assert dropped not in teacher_text
    assert any(p.n_steps > 1 for p in problems)  # some problem keeps a step


def test_resume_continues_identically(tmp_path):
    problems = generate_problems(64, seed=2)

    def trainer(workdir, steps):
        tok, model, base_vocab, cfg = _setup(steps=steps, checkpoint_every=2, val_every=1000)
        return Trainer(model, tok, base_vocab, cfg, problems, workdir=workdir)

    straight = trainer(tmp_path / "a", 4)
    straight.fit(progress=False)
    first_half = trainer(tmp_path / "b", 4)
    first_half.fit(progress=False, stop_at=2)  # as if killed after the step-2 checkpoint
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)  # no pickled objects
    assert {"model", "optimizer", "scheduler", "torch_rng"} <= set(state) and state["optimizer"]["state"]
    resumed = trainer(tmp_path / "b", 4)
    assert resumed.load_state() and resumed.step == 2
    resumed.fit(progress=False)
    assert resumed.step == straight.step == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_loads_strictly_and_matches_the_training_loop(tmp_path):
    tok, model, base_vocab, cfg = _setup()
    problems = generate_problems(3, seed=4)
    export_codi(model, tok, tmp_path / "export")
    hooked = load_codi(tmp_path / "export", tmp_path / "export")
    layout = detect_layout(read_tensor_info(hooked.checkpoint_file))
    assert layout.uses_lora is False and layout.prj_dim == cfg.prj_dim
    # The training student pass and codi_lens' loop give the same answer logits (fp32, 1e-4).
    batch = make_batch(problems, tok, base_vocab)
    _assert_hooked_scores_match_training_pass(model, hooked, batch, problems, cfg.n_latents)


def test_lora_training_on_gpt2_exports_the_upstream_lora_layout(tmp_path):
    """Training works on another HF family with peft LoRA; the export is upstream's LoRA layout and
    codi_lens' loop reproduces the training student pass (fp32, 1e-4)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    base_vocab = add_codi_tokens(lm)
    lm = get_peft_model(
        lm,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        ),
    )
    cfg = TrainConfig(batch_size=8, prj_dim=24, lr=3e-3)
    model = CODIModule(lm, cfg.prj_dim)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("prj.") for n in trainable)

    problems = generate_problems(8, seed=5)
    batch = make_batch(problems, tok, base_vocab)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    first = codi_losses(model, batch, cfg)["loss"].item()
    for _ in range(15):
        losses = codi_losses(model, batch, cfg)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert codi_losses(model, batch, cfg)["loss"].item() < first

    export_codi(model, tok, tmp_path / "export")
    hooked = load_codi(tmp_path / "export", tmp_path / "export", lora_alpha=8)
    layout = detect_layout(read_tensor_info(hooked.checkpoint_file))
    assert layout.family == "gpt2" and layout.uses_lora and layout.lora_rank == 4
    _assert_hooked_scores_match_training_pass(model, hooked, batch, problems, cfg.n_latents)


def _gradients_after_one_step(problems, **cfg) -> tuple[dict[str, float], list[torch.Tensor]]:
    tok, model, base_vocab, config = _setup(distill_div_std=False, lr=0.0, **cfg)  # lr 0: weights stay
    config.batch_size = len(problems)
    losses = Trainer(model, tok, base_vocab, config, problems).train_step()
    return losses, [p.grad.clone() for p in model.parameters()]


def test_micro_batches_give_the_whole_batch_gradient_when_lengths_are_equal():
    """With equal lengths (no padding anywhere) and no std division, splitting a batch in two and
    weighting each half by its share is the same objective: same losses and gradients (fp32)."""
    tok = build_tokenizer()
    by_length: dict[tuple[int, int], list] = {}
    for p in generate_problems(400, seed=7):
        key = (len(tok(p.question)["input_ids"]), len(tok(p.cot)["input_ids"]))
        by_length.setdefault(key, []).append(p)
    problems = next(group for group in by_length.values() if len(group) >= 4)[:4]
    whole_losses, whole = _gradients_after_one_step(problems, micro_batches=1)
    split_losses, split = _gradients_after_one_step(problems, micro_batches=2)
    for name in whole_losses:
        assert abs(whole_losses[name] - split_losses[name]) <= 1e-6 * max(1.0, abs(whole_losses[name])), name
    for a, b in zip(whole, split):
        assert (a - b).abs().max() <= 1e-6 + 1e-4 * a.abs().max()


def test_micro_batches_group_by_length_and_cut_padding():
    tok, model, base_vocab, cfg = _setup(micro_batches=4)
    cfg.batch_size = 32
    trainer = Trainer(model, tok, base_vocab, cfg, generate_problems(64, seed=8))
    parts = trainer.micro_batches(0)
    assert [share for _, share in parts] == [0.25] * 4
    assert sum(b.prompt_ids.shape[0] for b, _ in parts) == 32
    cfg.micro_batches = 1
    ((whole, _),) = trainer.micro_batches(0)
    assert sum(b.teacher_ids.numel() for b, _ in parts) < 0.85 * whole.teacher_ids.numel()
    widths = [b.teacher_ids.shape[1] for b, _ in parts]
    assert widths == sorted(widths)


def test_bfloat16_mixed_precision_step_agrees_with_float32():
    """``dtype="bfloat16"`` autocasts the forward to bf16 (weights and optimizer stay fp32): the losses of
    one step agree with fp32's within bf16's precision (relative 3e-2), the gradients point the same way
    (cosine >= 0.99 over all parameters), and the weights stay fp32."""
    problems = generate_problems(8, seed=3)
    fp32_losses, fp32_grads = _gradients_after_one_step(problems)
    bf16_losses, bf16_grads = _gradients_after_one_step(problems, dtype="bfloat16")
    assert bf16_losses.keys() == fp32_losses.keys()
    for name, value in fp32_losses.items():
        assert abs(bf16_losses[name] - value) <= 3e-2 * max(1.0, abs(value)), (name, value, bf16_losses[name])
    a = torch.cat([g.flatten() for g in fp32_grads])
    b = torch.cat([g.flatten() for g in bf16_grads])
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # it really ran in another precision
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99


def test_an_unknown_training_dtype_is_refused_by_name():
    tok, model, base_vocab, cfg = _setup(dtype="float16")
    with pytest.raises(ValueError, match="dtype 'float16'"):
        Trainer(model, tok, base_vocab, cfg, generate_problems(8, seed=0))
