"""PCCoT checkpoints (whyNLP/PCCoT): strict loading of upstream's peft directory on its base's weights, parity
of the Jacobi loop with the independent HF + peft reference of upstream's inference (fp32, CPU, 1e-4) at every
sweep, batch invariance, per-sweep hooks and positions, and what a Jacobi loop refuses."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from pccot_factory import make_tiny_pccot
from pccot_reference import ReferencePCCoT
from safetensors.torch import load_file, save_file

from codi_lens import CheckpointError, load_codi
from codi_lens.core import loop
from codi_lens.core.branching import grow_trunk
from codi_lens.core.errors import CodiLensError, HookNameError, LoopScheduleError, PositionError
from codi_lens.core.gradients import loop_gradients
from codi_lens.core.hooks import zero_at_positions
from codi_lens.core.names import sweep_hook_name
from codi_lens.loading import check_codi
from codi_lens.loading.inspect import format_summary, summarize_checkpoint

ATOL = 1e-4
MAX_NEW = 8
N_LATENTS, N_SWEEPS = 4, 3


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pccot(request, tmp_path_factory):
    """``(checkpoint dir, base dir, codi_lens model, reference)`` of a tiny PCCoT checkpoint with a head."""
    root = tmp_path_factory.mktemp(f"pccot-{request.param}")
    checkpoint, base = make_tiny_pccot(root, request.param, n_latents=N_LATENTS, n_sweeps=N_SWEEPS)
    return checkpoint, base, load_codi(checkpoint, base), ReferencePCCoT.from_checkpoint(checkpoint, base)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _record_sweeps(model):
    """Hooks recording every sweep's inputs and hidden states: ``(hooks, store)``."""
    store: dict[str, torch.Tensor] = {}

    def keep(acts, hook):
        store[hook.name] = acts.detach().clone()

    names = [
        sweep_hook_name(k, s, kind)
        for k in range(1, N_LATENTS + 1)
        for s in range(N_SWEEPS + 1)
        for kind in ("input", "hidden")
    ]
    return [(name, keep) for name in names], store


def _sweeps(store, kind: str, row: int) -> torch.Tensor:
    """``[n_sweeps + 1, n, d_model]`` of one row."""
    return torch.stack(
        [
            torch.stack([store[sweep_hook_name(k, s, kind)][row] for k in range(1, N_LATENTS + 1)])
            for s in range(N_SWEEPS + 1)
        ]
    )


def test_batched_run_matches_reference_at_every_sweep(pccot, questions):
    """One batch of questions of different lengths against the reference run one question at a time (upstream
    runs its sweeps without the attention mask, so a padded upstream batch would attend to padding)."""
    _, _, model, reference = pccot
    assert model.latent_loop.method == "pccot" and model.latent_loop.n_sweeps == N_SWEEPS and model.prj is not None
    hooks, store = _record_sweeps(model)
    ours = model.run_codi(questions, max_new_tokens=MAX_NEW, fwd_hooks=hooks, return_logits=True)
    for row, question in enumerate(questions):
        ref = reference.run(question, max_new_tokens=MAX_NEW)
        assert _max_diff(_sweeps(store, "hidden", row), ref["sweep_hidden"]) <= ATOL
        assert _max_diff(_sweeps(store, "input", row), ref["fed"]) <= ATOL
        assert _max_diff(ours.latent_states[row, 0], ref["h_bot"]) <= ATOL
        assert _max_diff(ours.latent_states[row, 1:], ref["sweep_hidden"][-1]) <= ATOL
        assert torch.equal(ours.thought_embeds[row], _sweeps(store, "input", row)[-1])
        first = ours.step_logits[row, 1 + N_LATENTS]  # BOT, the thoughts, then the first answer token's
        assert _max_diff(first, ref["first_logits"]) <= ATOL
        assert ours.answer_tokens[row] == ref["answer_tokens"]


def test_teacher_forcing_feeds_the_answer_prompt(pccot, questions):
    """score_answers feeds EOT and "The answer is:" before the answer: its first row is the reference's first
    answer token's logits, its next the reference's after that token."""
    _, _, model, reference = pccot
    ref = reference.run(questions[0], max_new_tokens=2)
    scores = model.score_answers(questions[:1], [ref["answer_tokens"]])
    assert _max_diff(scores.logits[0, 0], ref["first_logits"]) <= ATOL
    run = model.run_codi(questions[:1], max_new_tokens=2, return_logits=True)
    assert _max_diff(scores.logits[0, 1], run.step_logits[0, -1]) <= ATOL
    prompt = len(reference.prompt_ids)
    assert scores.positions.answer_start == scores.positions.eot + 1 + prompt


def test_batch_is_invariant(pccot, questions):
    _, _, model, _ = pccot
    batch = model.run_codi(questions, max_new_tokens=MAX_NEW)
    for i, question in enumerate(questions):
        alone = model.run_codi([question], max_new_tokens=MAX_NEW)
        assert _max_diff(batch.latent_states[i], alone.latent_states[0]) <= 1e-5
        assert batch.answer_tokens[i] == alone.answer_tokens[0]


def test_sweep_hooks_follow_the_jacobi_schedule(pccot, questions):
    """Zeroing thought 2's input at sweep 1 leaves every earlier sweep and thought 1 of sweep 1 unchanged,
    changes thought 2 at sweep 1 and, through the projection, thought 3 at sweep 2 (not thought 2 there, whose
    input is sweep 1's thought 1)."""
    _, _, model, _ = pccot
    hooks, plain = _record_sweeps(model)
    model.run_codi(questions[:1], max_new_tokens=1, fwd_hooks=hooks)
    hooks, edited = _record_sweeps(model)
    zero = (sweep_hook_name(2, 1, "input"), lambda x, hook: torch.zeros_like(x))
    model.run_codi(questions[:1], max_new_tokens=1, fwd_hooks=[zero, *hooks])
    before, after = _sweeps(plain, "hidden", 0), _sweeps(edited, "hidden", 0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1, 0], after[1, 0])
    assert _max_diff(before[1, 1], after[1, 1]) > 1e-3
    assert torch.equal(_sweeps(edited, "input", 0)[1, 1], torch.zeros(model.cfg.d_model))
    assert torch.equal(_sweeps(plain, "input", 0)[2, 1], _sweeps(edited, "input", 0)[2, 1])
    assert _max_diff(_sweeps(plain, "input", 0)[2, 2], _sweeps(edited, "input", 0)[2, 2]) > 1e-3


@pytest.mark.parametrize("sweep", [1, N_SWEEPS])
def test_named_position_acts_at_its_sweep(pccot, questions, sweep):
    """A positional hook at ``thought:2@sweep:s`` on the first block's input does what the sweep-s input hook
    does (GPT-2 adds its position embedding in both runs alike); plain ``thought:2`` is the last sweep."""
    _, _, model, _ = pccot
    name = "hook_embed"
    at_sweep = model.run_codi(
        questions[:1], max_new_tokens=3, fwd_hooks=[(name, zero_at_positions(model, [f"thought:2@sweep:{sweep}"]))]
    )
    by_hook = model.run_codi(
        questions[:1],
        max_new_tokens=3,
        fwd_hooks=[(sweep_hook_name(2, sweep, "input"), lambda x, hook: torch.zeros_like(x))],
    )
    assert _max_diff(at_sweep.latent_states, by_hook.latent_states) <= 1e-6
    assert at_sweep.answer_tokens == by_hook.answer_tokens
    if sweep == N_SWEEPS:
        plain = model.run_codi(
            questions[:1], max_new_tokens=3, fwd_hooks=[(name, zero_at_positions(model, ["thought:2"]))]
        )
        assert _max_diff(plain.latent_states, by_hook.latent_states) <= 1e-6


def test_sweeps_outside_the_run_are_refused(pccot, questions):
    _, _, model, _ = pccot
    identity = lambda x, hook: x  # noqa: E731
    with pytest.raises(PositionError, match=r"sweeps 0\.\.3"):
        model.run_codi(questions[:1], max_new_tokens=1, fwd_hooks=[(sweep_hook_name(1, 4, "input"), identity)])
    with pytest.raises(PositionError, match="sweeps are 0..3"):
        model.run_codi(
            questions[:1], max_new_tokens=1, fwd_hooks=[("hook_embed", zero_at_positions(model, ["thought:1@sweep:4"]))]
        )
    with pytest.raises(PositionError, match="not a thought position"):
        model.run_codi(
            questions[:1], max_new_tokens=1, fwd_hooks=[("hook_embed", zero_at_positions(model, ["eot@sweep:1"]))]
        )
    tokens, mask = loop.prepare(model, questions[:1], N_LATENTS)
    positions = loop.run_positions(model, mask, N_LATENTS, [1])
    # a CodiLensError: a command prints it as one error line, as for any input the method cannot take
    with pytest.raises(LoopScheduleError, match="stopping the loop after thought 2 needs a sequential loop.*pccot"):
        loop.run_latents(model, tokens, mask, positions, through=2)
    assert issubclass(LoopScheduleError, CodiLensError)


def test_cache_holds_the_last_sweep(pccot, questions):
    _, _, model, _ = pccot
    result, cache = model.run_codi_with_cache(
        questions[:1], max_new_tokens=2, names_filter=lambda n: n.endswith("hook_resid_post") or ".sweep." in n
    )
    width = result.positions.bot
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, width + 1 : width + 1 + N_LATENTS]
    assert _max_diff(model.ln_final(last), result.latent_states[0, 1:]) <= 1e-5
    assert cache[sweep_hook_name(3, 0, "hidden")].shape == (1, model.cfg.d_model)


def test_inspect_names_pccot(pccot):
    checkpoint, *_ = pccot
    summary = summarize_checkpoint(checkpoint)
    assert (summary["method"], summary["n_latents"], summary["n_sweeps"]) == ("pccot", N_LATENTS, N_SWEEPS)
    text = format_summary(summary)
    assert "PCCoT" in text and "sweeps" in text


def test_identity_feedback_without_a_head(tmp_path, questions):
    """``use_projection`` false (upstream's config default): latents are fed back unchanged, the head's hooks
    are refused by name, and the run still matches the reference."""
    checkpoint, base = make_tiny_pccot(tmp_path, "gpt2", use_projection=False, n_latents=3, n_sweeps=2)
    model, reference = load_codi(checkpoint, base), ReferencePCCoT.from_checkpoint(checkpoint, base)
    assert model.prj is None and model.latent_loop.feedback == "identity"
    ours = model.run_codi(questions[:1], max_new_tokens=MAX_NEW)
    ref = reference.run(questions[0], max_new_tokens=MAX_NEW)
    assert _max_diff(ours.latent_states[0, 1:], ref["sweep_hidden"][-1]) <= ATOL
    assert ours.answer_tokens[0] == ref["answer_tokens"]
    with pytest.raises(HookNameError, match=re.escape("thought.1.sweep.0.hook_projection") + ".*no projection head"):
        model.run_codi(
            questions[:1], max_new_tokens=1, fwd_hooks=[("thought.1.sweep.0.hook_projection", lambda x, hook: x)]
        )


def test_gpt2_hub_base_file_is_read(pccot, tmp_path, questions):
    """GPT-2's hub file names keys without ``transformer.`` and holds causal-mask buffers."""
    checkpoint, base, model, _ = pccot
    if model.cfg.original_architecture != "GPT2LMHeadModel":
        pytest.skip("GPT-2 only")
    hub = tmp_path / "gpt2-hub"
    shutil.copytree(base, hub)
    state = {k.removeprefix("transformer."): v for k, v in load_file(hub / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(state, hub / "model.safetensors")
    assert (
        load_codi(checkpoint, hub).run_codi(questions[:1], max_new_tokens=MAX_NEW).answer_tokens
        == model.run_codi(questions[:1], max_new_tokens=MAX_NEW).answer_tokens
    )


def _copy(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    return broken


def test_bad_adapters_are_named(pccot, tmp_path):
    checkpoint, base, *_ = pccot
    broken = _copy(checkpoint, tmp_path)
    adapter = load_file(broken / "adapter_model.safetensors")
    lora = sorted(k for k in adapter if ".lora_A." in k)[0]
    delta = next(k for k in adapter if k.endswith("trainable_tokens_delta"))
    adapter.pop(lora)
    adapter["base_model.model.extra.weight"] = torch.zeros(2)
    adapter[delta] = adapter[delta][:, :-1].contiguous()
    save_file(adapter, broken / "adapter_model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_codi(broken, base)
    message = str(error.value)
    assert f"1 missing key(s): '{lora}'" in message and "'base_model.model.extra.weight'" in message
    with pytest.raises(CheckpointError, match=re.escape(lora)):  # what a command checks before it loads
        check_codi(broken, base)
    assert check_codi(checkpoint, base).d_model == pccot[2].cfg.d_model
    assert re.search(re.escape(delta) + r" has \(5, \d+\), expected", message)


def test_bad_settings_and_files_are_named(pccot, tmp_path):
    checkpoint, base, *_ = pccot
    broken = _copy(checkpoint, tmp_path)
    args = json.loads((broken / "pccot_args.json").read_text())
    del args["num_latent_tokens"]
    (broken / "pccot_args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="pccot_args.json' has no field 'num_latent_tokens'"):
        load_codi(broken, base)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks \['adapter_config.json'\]"):
        load_codi(broken, base)
    with pytest.raises(CheckpointError, match="--base is required for PCCoT"):
        load_codi(checkpoint)
    with pytest.raises(CheckpointError, match="holds only an adapter: base 'gpt2' must be a local directory"):
        load_codi(checkpoint, "gpt2")
    weightless = tmp_path / "weightless"
    shutil.copytree(base, weightless)
    (weightless / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds none of"):
        load_codi(checkpoint, weightless)


def test_branches_equal_one_run_per_intervention(pccot, questions):
    """Branches of a Jacobi loop (every thought start recomputes the sweeps from BOT's cache) give the
    teacher-forced logits and generations of one full run per intervention."""
    _, _, model, _ = pccot
    from codi_lens.core.branching import Branch, run_branches

    answers = [model.run_codi([q], max_new_tokens=4).answer_tokens[0] for q in questions]
    interventions = [
        (2, [(sweep_hook_name(2, 1, "input"), lambda x, hook: torch.zeros_like(x))]),
        (3, [("blocks.0.hook_resid_post", zero_at_positions(model, ["thought:3"]))]),
        (1, [("hook_embed", zero_at_positions(model, ["thought:1@sweep:0"]))]),
        (N_LATENTS + 1, []),
    ]
    trunk = grow_trunk(model, questions, n_latents=N_LATENTS)
    outputs = run_branches(
        model, trunk, [Branch(hooks, start) for start, hooks in interventions], answers, max_new_tokens=4
    )
    for (_, hooks), output in zip(interventions, outputs):
        alone = model.score_answers(questions, answers, fwd_hooks=hooks)
        generated = model.run_codi(questions, max_new_tokens=4, fwd_hooks=hooks)
        assert _max_diff(output.logits, alone.logits) <= ATOL
        assert output.answer_tokens == generated.answer_tokens
    assert _max_diff(outputs[1].logits, outputs[-1].logits) > 1e-3  # the interventions did something


@pytest.mark.parametrize("start", [-1, 2])
def test_gradients_match_reference_autograd(pccot, questions, start):
    """loop_gradients through the sweeps: the metric (an answer token's logit) and its gradient at the question's
    embeddings (total, through every sweep) and at the last sweep's inputs equal the reference's autograd, also
    when the run starts from a trunk (start 2: every sweep recomputed from BOT's cache)."""
    _, _, model, reference = pccot
    question = questions[1]
    answer = model.run_codi([question], max_new_tokens=3).answer_tokens[0]
    row = 1 if len(answer) > 1 else 0
    ref = reference.answer_gradients(question, answer, row)
    grads = loop_gradients(
        model,
        [question],
        [answer],
        [row],
        lambda logits: logits[:, answer[row]],
        ["hook_embed"],
        n_latents=N_LATENTS,
        start=start,
    )
    assert _max_diff(grads.metric[0], ref["metric"]) <= ATOL
    assert _max_diff(grads.thought_grads[0], ref["fed_grad"]) <= ATOL
    width = grads.positions.bot + 1
    if start == -1:
        assert _max_diff(grads.grads["hook_embed"][0, :width], ref["prefix_grad"]) <= ATOL
    assert grads.acts["hook_embed"].shape[1] == width + N_LATENTS + len(loop.answer_opening(model)) + len(answer) - 1
    assert float(ref["fed_grad"].abs().max()) > 1e-3


def test_float32_rows_beside_a_bfloat16_embedding_keep_their_precision(pccot, tmp_path):
    """peft saves the trained rows in float32 beside a bfloat16 grown embedding; the model's rows are the
    float32 values, not their bfloat16 rounding."""
    checkpoint, base, *_ = pccot
    broken = _copy(checkpoint, tmp_path)
    adapter = load_file(broken / "adapter_model.safetensors")
    for key in [k for k in adapter if k.endswith("token_adapter.base_layer.weight")]:
        adapter[key] = adapter[key].to(torch.bfloat16)
    save_file(adapter, broken / "adapter_model.safetensors")
    model = load_codi(broken, base)
    delta = next(v for k, v in adapter.items() if k.endswith("embed_tokens.token_adapter.trainable_tokens_delta")
                 or k.endswith("wte.token_adapter.trainable_tokens_delta"))  # fmt: skip
    assert delta.dtype == torch.float32
    bot = model.codi_tokens.bot
    assert torch.equal(model.embed.W_E[bot], delta[0]) and torch.equal(model.unembed.W_U[:, bot], delta[0])
    assert not torch.equal(delta[0].to(torch.bfloat16).float(), delta[0])  # the rounding would show


def test_report_reads_pccot_chain_in_teacher_mode(pccot):
    """PCCoT trains the same LM to write the chain (upstream's cot_loss), so the report's chain condition is
    its teacher mode, as for CODI."""
    from codi_lens.reports.model_report import chain_condition

    _, _, model, _ = pccot
    condition = chain_condition(model, 8)
    assert (condition.name, condition.mode) == ("teacher_explicit_cot", "explicit")


def test_a_run_lists_exactly_the_hooks_it_accepts(pccot, tiny_checkpoint, questions):
    """One rule says which step hooks a run reaches: every hook point ``hook_names_of_run(n)`` lists is accepted
    by a run with n thoughts, and every one it leaves out (thought n + 1's hooks, sweeps past the last, a sweep
    hook in a sequential loop) is refused, in a Jacobi loop and in a sequential one (CODI)."""
    built = tiny_checkpoint("llama")
    identity = lambda x, hook: x  # noqa: E731
    n = N_LATENTS - 1
    for model in (pccot[2], load_codi(built.checkpoint_dir, built.base_dir)):
        model.hook_names_of_run(N_LATENTS)  # hook points up to thought N_LATENTS exist
        listed = set(model.hook_names_of_run(n))
        _, mask = loop.prepare(model, questions[:1], n)
        positions = loop.run_positions(model, mask, n, [1])
        candidates = [*model.hook_dict, sweep_hook_name(1, N_SWEEPS + 1, "input"), sweep_hook_name(1, 0, "hidden")]
        for name in candidates:
            try:
                loop.check_hooks(model, [(name, identity)], positions)
                accepted = True
            except (HookNameError, PositionError):
                accepted = False
            assert accepted == (name in listed), (model.latent_loop.method, name)
        assert f"thought.{N_LATENTS}.hook_input" in model.hook_dict and f"thought.{N_LATENTS}.hook_input" not in listed
        if model.latent_loop.is_jacobi:
            assert sweep_hook_name(n, N_SWEEPS, "projection") in listed
            assert sweep_hook_name(N_LATENTS, 0, "input") not in listed
        else:
            assert not any(".sweep." in name for name in listed)
