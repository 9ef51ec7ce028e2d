"""Reading the thoughts: logit and tuned lens, readout, probes, early answers, value-matched patching.

References: the HF + peft CODI (logits at every latent step, runs with fewer thoughts), hand-computed
chains and ranks, and invariants that hold exactly (identity lens = logit lens, a value's own mean
thought fed back = the run itself).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from codi_lens import load_codi
from codi_lens.data import load_problems, problem_from_record
from codi_lens.early_answers import early_answer_rows
from codi_lens.interventions import replace_thoughts
from codi_lens.lens import (
    LensError,
    TunedLens,
    lens_logits,
    logit_lens,
    readout_frame,
    readout_targets,
    thought_states,
    train_tuned_lens,
    value_ranks,
)
from codi_lens.probes import fit_probe, probe_labels, probe_table, step_operations
from codi_lens.value_patching import CONDITIONS, ValueMeans, answer_with_value, substitutions, value_patching_rows

ATOL = 1e-4  # fp32 against the HF reference, as in test_parity


@pytest.fixture(scope="module")
def toy():
    model = load_codi("toy-arith")
    problems = load_problems("toy:test", limit=48)
    return model, problems, thought_states(model, problems, max_new_tokens=24, progress=False)


def _problem(solution: str, index: int = 0):
    return problem_from_record({"question": "q", "answer": solution}, source="hand", split="test", index=index)


def test_logit_lens_at_the_last_layer_is_the_models_own_logits(toy, tiny_checkpoint, questions):
    model, problems, states = toy
    run = model.run_codi([p.question for p in problems[:8]], max_new_tokens=2, return_logits=True)
    last = lens_logits(model, states.residuals[:8])[:, -1]  # BOT and thoughts 1..6
    # fp32, other batch sizes (48 problems against 8): the matmuls' blocking may differ by CPU, so the
    # last bits may too (bitwise equal on one instance type, ~1e-7 relative apart on another).
    torch.testing.assert_close(last, run.step_logits[:, :7], rtol=1e-5, atol=1e-5)
    # Against the independent HF implementation (its logits at BOT and every thought).
    ckpt = tiny_checkpoint("llama")
    tiny = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    reference = ckpt.reference()
    tiny_states = thought_states(tiny, [_problem_like(q) for q in questions], max_new_tokens=2, progress=False)
    ours = lens_logits(tiny, tiny_states.residuals)[:, -1]
    for i, question in enumerate(questions):
        ref = reference.run(question, n_latents=6, max_new_tokens=1)["step_logits"][:7]
        assert (ours[i] - ref).abs().max() <= ATOL
    # Layer 0 at thought k is the fed thought itself (LLaMA has no position embedding).
    assert torch.allclose(tiny_states.residuals[:, 0, 1:], tiny_states.thought_embeds, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_at_every_layer_matches_hf_hidden_states(tiny_checkpoint, questions, family):
    """Every layer x (BOT, thought 1..6) of the logit lens against HF's ``output_hidden_states`` of the reference
    loop read through its own final norm and ``lm_head`` (layer 0: the embedding output, with GPT-2's position
    embedding; layer l: block l - 1's output), fp32."""
    ckpt = tiny_checkpoint(family)
    tiny = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    reference = ckpt.reference()
    states = thought_states(tiny, [_problem_like(q) for q in questions], max_new_tokens=1, progress=False)
    ours = lens_logits(tiny, states.residuals)  # [problem, layer, latent, vocab]
    assert ours.shape[1:3] == (tiny.cfg.n_layers + 1, 7)
    for i, question in enumerate(questions):
        expected = reference.logit_lens_at_latents(question)
        assert (ours[i] - expected).abs().max() <= ATOL, i


def _problem_like(question: str):
    return problem_from_record({"question": question, "answer": "#### 1"}, source="hand", split="test", index=0)


def test_identity_tuned_lens_is_the_logit_lens_and_saves_exactly(toy, tmp_path):
    model, _, states = toy
    lens = TunedLens(model.cfg.n_layers, model.cfg.d_model)
    assert torch.equal(lens_logits(model, states.residuals, lens), lens_logits(model, states.residuals))
    with torch.no_grad():
        lens.weight.add_(0.01 * torch.randn_like(lens.weight))
        lens.bias.normal_()
    lens.save(tmp_path / "lens", note="test")
    loaded = TunedLens.load(tmp_path / "lens", model)
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    manual = logit_lens(model, states.residuals[:, 0] @ lens.weight[0].detach() + lens.bias[0].detach())
    assert torch.allclose(lens_logits(model, states.residuals, loaded)[:, 0], manual, atol=1e-5)

    from safetensors.torch import save_file

    save_file(
        {"weight": lens.weight.detach(), "bias": torch.zeros(3)}, str(tmp_path / "lens" / "tuned_lens.safetensors")
    )
    with pytest.raises(LensError, match="'bias' has shape"):
        TunedLens.load(tmp_path / "lens")


def test_trained_tuned_lens_is_closer_to_the_final_distribution_on_held_out_problems(toy):
    model, _, states = toy
    lens = train_tuned_lens(model, states.residuals[:32], steps=150, lr=3e-3, progress=False)
    held_out = states.residuals[32:]
    final = torch.log_softmax(lens_logits(model, held_out)[:, -1], -1)

    def kl(logits):
        return torch.nn.functional.kl_div(torch.log_softmax(logits, -1), final, log_target=True, reduction="sum")

    for layer in range(model.cfg.n_layers):
        tuned, plain = lens_logits(model, held_out, lens)[:, layer], lens_logits(model, held_out)[:, layer]
        assert kl(tuned) < 0.8 * kl(plain), layer


def test_value_ranks_by_hand():
    logits = torch.tensor(
        [[[[0.1, 3.0, 2.0, -1.0]]], [[[5.0, 4.0, 3.0, 2.0]]]]
    )  # [problem 2, layer 1, latent 1, vocab 4]
    ranks = value_ranks(logits, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 3, 0]))
    assert ranks.flatten().tolist() == [0, 1, 3, 0]


def test_readout_control_reads_another_problems_values_with_as_many_steps(toy):
    model, problems, states = toy
    targets = readout_targets(problems, seed=3)
    own, control = targets[~targets["control"]], targets[targets["control"]]
    assert len(own) == sum(len(p.intermediates) + 1 for p in problems)
    by_id = {p.id: p for p in problems}
    for (reader, _), rows in control.groupby(["reader", "problem_id"]):
        values = tuple(rows[rows["target"] == "intermediate"]["value"])
        donors = [p for p in problems if p.intermediates == values and p.id != problems[reader].id]
        assert donors and all(d.n_steps == by_id[problems[reader].id].n_steps for d in donors)
    frame = readout_frame(model, states.residuals, targets, {"logit": None})
    n_cells = (model.cfg.n_layers + 1) * 7
    assert len(frame) == len(targets) * n_cells  # every toy value is one token
    # The answer's rank at the last layer of thought 6 is its rank in the model's own logits there.
    row = frame[(frame["target"] == "answer") & ~frame["control"] & (frame["layer"] == 2) & (frame["thought"] == 6)]
    logits = model.run_codi([problems[0].question], max_new_tokens=1, return_logits=True).step_logits[:, 6]
    first = row.iloc[0]
    expected = int((logits[0] > logits[0, int(first["token"])]).sum())
    assert first["problem_id"] == problems[0].id and first["rank"] == expected


def test_probe_recovers_a_planted_linear_signal_and_its_control_sits_at_chance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16))
    weights = rng.normal(size=(16, 4))
    y = np.array(list("abcd"))[(x @ weights).argmax(1)]
    fit = fit_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:])
    assert fit.test_hits.mean() > 0.9
    # Through probe_table: residual-shaped features, labels by problem, shuffled control near chance.
    residuals = torch.tensor(x, dtype=torch.float32)[:, None, None, :]
    labels = pd.DataFrame({"index": range(600), "problem_id": [str(i) for i in range(600)], "target": "t", "label": y})
    table = probe_table(residuals, labels, range(300), range(300, 400), range(400, 600), progress=False)
    probe, control = table[table["task"] == "probe"].iloc[0], table[table["task"] == "control"].iloc[0]
    assert probe["accuracy"] > 0.9 and probe["low"] > 0.85
    assert abs(control["accuracy"] - 0.25) < 0.1 and control["accuracy"] < probe["chance"] + 0.1
    with pytest.raises(ValueError, match="disjoint"):
        probe_table(residuals, labels, range(300), range(300, 400), range(350, 600), progress=False)


def test_probe_labels_and_operations_by_hand():
    p = _problem("<<16+6=22>> <<22*2=44>> <<44/2=22>> <<22-3=19>> <<19//2=9>>\n#### 9")
    assert step_operations(p) == ["+", "*", "/", "-", "//"]
    labels = probe_labels([p], [False]).set_index("target")["label"]
    assert labels["value:2"] == "44" and labels["operation:4"] == "-" and labels["answer_correct"] == "False"


def test_answer_with_value_recomputes_the_rest_of_the_chain_by_hand():
    p = _problem("<<16+6=22>> <<22+10=32>> <<32-3=29>>\n#### 29")
    assert answer_with_value(p, 1, 20) == 27  # 20 + 10 - 3
    assert answer_with_value(p, 2, 32) == 29
    assert answer_with_value(p, 3, 7) == 7
    assert answer_with_value(_problem("<<16+6=22>> <<5*2=10>>\n#### 10"), 1, 3) is None  # step 1 is not used


def test_early_answers_match_runs_with_fewer_thoughts_and_the_reference(toy, tiny_checkpoint, questions):
    model, problems, _ = toy
    rows = early_answer_rows(model, problems[:6], max_new_tokens=24)
    full = model.run_codi([p.question for p in problems[:6]], max_new_tokens=24)
    assert rows[rows["k"] == 6]["prediction"].tolist() == full.prediction
    ckpt = tiny_checkpoint("llama")
    tiny = load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    reference = ckpt.reference()
    tiny_rows = early_answer_rows(tiny, [_problem_like(q) for q in questions], max_new_tokens=8)
    for k in (1, 3):
        for question, text in zip(questions, tiny_rows[tiny_rows["k"] == k]["answer_text"]):
            assert text == reference.run(question, n_latents=k, max_new_tokens=8)["answer_text"]


def test_feeding_a_problems_own_mean_thought_changes_nothing(toy):
    model, problems, states = toy
    subset = problems[:4]
    means = ValueMeans.from_reference(subset[:1], states.thought_embeds[:1])  # problem 0 alone
    rows = value_patching_rows(model, subset, means, thoughts=[2], conditions=("same",), min_count=1, max_new_tokens=24)
    own = rows[rows["problem_id"] == subset[0].id]
    assert len(own) == subset[0].n_steps and own["value"].tolist() == list(subset[0].intermediates)
    baseline = model.run_codi([subset[0].question], max_new_tokens=24).prediction[0]
    assert (own["prediction"] == baseline).all()


def test_value_patching_branches_answer_as_one_full_run_per_configuration():
    """Each (thought, step, condition) generation branches off the problems' unpatched run, side by side with
    other configurations' in blocks; its prediction equals a whole run of that configuration's problems with
    ``z_k`` replaced (``run_codi`` with the same hook), for every thought, step and condition."""
    from codi_lens import load_pretrained

    model = load_pretrained()  # toy-chain: its answers need its thoughts (4% right with them zeroed)
    problems = load_problems("toy-chain:test", limit=30)
    evaluated, reference = problems[:6], problems[6:]
    means = ValueMeans.from_reference(reference, thought_states(model, reference, progress=False).thought_embeds)
    rows = value_patching_rows(
        model, evaluated, means, thoughts=[1, 3, 6], min_count=1, max_new_tokens=24, max_rows=5
    )  # blocks of 5 generations cut across configurations
    assert set(rows["condition"]) == set(CONDITIONS) and set(rows["thought"]) == {1, 3, 6}
    for (k, step, condition), group in rows.groupby(["thought", "step", "condition"]):
        chosen = substitutions(evaluated, means, step, condition, min_count=1)
        fed = torch.stack([m[k - 1] for _, _, m, _ in chosen])
        whole = model.run_codi(
            [evaluated[r].question for r, *_ in chosen], max_new_tokens=24, fwd_hooks=replace_thoughts({k: fed})
        )
        expected = [np.nan if x is None else float(x) for x in whole.prediction]
        assert group["problem_id"].tolist() == [evaluated[r].id for r, *_ in chosen]
        np.testing.assert_array_equal(group["prediction"].to_numpy(), expected)


def test_read_thoughts_experiment_writes_every_output_and_resumes(tmp_path):
    from experiments import read_thoughts

    args = ["--limit", "100", "--out", str(tmp_path), "--tuned-lens-steps", "20", "--max-new-tokens", "24",
            "--patch-thoughts", "1,3"]  # fmt: skip
    summary = read_thoughts.main(args)
    for name in ("results.parquet", "readout_rates.parquet", "probes.parquet", "early_answers.parquet",
                 "readout_logit.html", "readout_tuned.html", "probes.html", "early_answers.html",
                 "value_patching.html", "tuned_lens/tuned_lens.safetensors", "summary.json"):  # fmt: skip
        assert (tmp_path / name).exists(), name
    results = pd.read_parquet(tmp_path / "results.parquet")
    assert set(results["lens"]) == {"logit", "tuned"} and results["problem_id"].nunique() == summary["n_eval"]
    assert summary["n_fit"] + summary["n_eval"] == 100
    probes = pd.read_parquet(tmp_path / "probes.parquet")
    assert set(probes["task"]) == {"probe", "control"} and "value:1" in set(probes["target"])
    patched = pd.read_parquet(tmp_path / "value_patching" / "results.parquet")
    assert set(patched["thought"]) == {1, 3}
    again = read_thoughts.main(args)  # everything resumes from disk: same table, same headline
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), results)
    assert again["early_answer_accuracy"] == summary["early_answer_accuracy"]
    with pytest.raises(Exception, match="different settings"):
        read_thoughts.main([*args[:-2], "--patch-thoughts", "2"])


def test_thought_states_move_their_bar_per_block(monkeypatch):
    """Collecting the thought states (half a minute per batch at the 1B shape) tells its bar of every block."""
    from codi_lens import load_pretrained
    from codi_lens.data import load_problems
    from codi_lens.lens import thought_states
    from codi_lens.run.store import WorkBar

    heard: list[str] = []
    told = WorkBar.forward
    monkeypatch.setattr(WorkBar, "forward", lambda bar, *a: (heard.append(bar.bar.desc.rstrip(": ")), told(bar, *a)))
    model = load_pretrained()
    problems = load_problems("toy-chain:test", limit=3)
    states = thought_states(model, problems, n_latents=2, max_new_tokens=2, batch_size=2)
    assert states.residuals.shape[0] == 3
    assert set(heard) == {"thought states"} and len(heard) >= 2 * (1 + 2) * model.cfg.n_layers
