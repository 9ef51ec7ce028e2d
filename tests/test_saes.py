"""SAEs on the continuous thoughts: activation datasets, SAELens training and formats, splicing inside the
loop, feature edits, the legacy converter, and the train_saes experiment, on the shipped model.

References: hand-computed values (explained variance, the legacy SAE's forward pass written out), the
plain run without SAEs (activations, splicing with the error term), and exact invariants (a save/load
round trip, editing a feature that is zero)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from codi_lens import Site, load_pretrained
from codi_lens.activations import ActivationDataset, ActivationError, collect_activations
from codi_lens.core.errors import ChoiceError
from codi_lens.data import load_problems
from codi_lens.saes import (
    SAEError,
    SAERecipe,
    ShuffledBatches,
    attached,
    convert_legacy_sae,
    encode_decode,
    explained_variance,
    feature_edit,
    load_sae,
    reconstruction_metrics,
    sae_acts_hook_name,
    save_sae,
    train_sae,
    training_sae,
)

THOUGHT_SITE = Site("thought.3.hook_hidden")
RESID_SITE = Site.at_thought("blocks.1.hook_resid_post", 2)
SMALL = SAERecipe(architecture="topk", d_sae=256, k=8, batch_size=32, training_samples=6400, n_checkpoints=3)


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


@pytest.fixture(scope="module")
def problems():
    return load_problems("toy-chain:test", limit=96)


@pytest.fixture(scope="module")
def dataset(model, problems, tmp_path_factory):
    return collect_activations(
        model, problems, [THOUGHT_SITE, RESID_SITE], tmp_path_factory.mktemp("acts"), batch_size=16, progress=False
    )


@pytest.fixture(scope="module")
def trained(dataset):
    rows, _ = dataset.load(THOUGHT_SITE)
    return train_sae(rows, SMALL, THOUGHT_SITE, progress=False)


def _random_sae(site: Site, d_in: int, seed: int = 0):
    return training_sae(SAERecipe(d_sae=64, k=4, seed=seed), d_in, site)


def test_explained_variance_by_hand():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # per-dimension variance 1 and 1
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(0.0)
    half = torch.tensor([[0.5, 1.0], [1.5, 3.0]])  # residual variance 0.25 in dim 0, 0 in dim 1
    assert explained_variance(x, half) == pytest.approx(1 - 0.25 / 2)


def test_activation_dataset_equals_the_plain_run(model, problems, dataset):
    thought, ids = dataset.load(THOUGHT_SITE)
    assert ids == [p.id for p in problems]
    result, cache = model.run_codi_with_cache(
        [p.question for p in problems[:8]], names_filter="blocks.1.hook_resid_post", max_new_tokens=1
    )
    # fp32, collected in other batches than these 8: the matmuls' blocking may differ by CPU, so the last
    # bits may too (bitwise equal on one instance type, ~1e-7 relative apart on another).
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(thought[:8], result.latent_states[:, 3].float(), **close)  # h_3: what prj read
    resid, _ = dataset.load(RESID_SITE, [p.id for p in problems[:8]])
    torch.testing.assert_close(
        resid, cache["blocks.1.hook_resid_post"][:, result.positions.thoughts[1]].float(), **close
    )
    with pytest.raises(ActivationError, match="blocks.0.hook_resid_post@2 is not in"):
        dataset.load(Site.at_thought("blocks.0.hook_resid_post", 2))


def test_sites_are_checked_by_name(model, problems, tmp_path):
    with pytest.raises(ActivationError, match="no hook point named 'blocks.9.hook_resid_post'"):
        collect_activations(
            model, problems[:2], [Site.at_thought("blocks.9.hook_resid_post", 1)], tmp_path, progress=False
        )
    with pytest.raises(ActivationError, match="thought 7 is outside 0..6"):
        collect_activations(
            model, problems[:2], [Site.at_thought("blocks.0.hook_resid_post", 7)], tmp_path, progress=False
        )


def test_saelens_round_trip_is_exact(trained, dataset, tmp_path):
    folder = save_sae(trained, tmp_path / "sae")
    assert {p.name for p in folder.iterdir()} >= {"cfg.json", "sae_weights.safetensors"}
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "thought.3.hook_hidden" and meta["codi_thoughts"] == [3]
    loaded = load_sae(folder)
    rows, _ = dataset.load(THOUGHT_SITE)
    # Saving a training SAE folds its decoder norms into the inference weights: equal up to rounding.
    a_acts, a_out = encode_decode(trained, rows)
    b_acts, b_out = encode_decode(loaded, rows)
    assert torch.allclose(a_acts, b_acts, atol=1e-4) and torch.allclose(a_out, b_out, atol=1e-4)
    # An inference SAE saved and loaded again is bit for bit the same.
    again = load_sae(save_sae(loaded, tmp_path / "again"))
    assert loaded.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), again.state_dict().values()))
    c_acts, c_out = encode_decode(again, rows)
    assert torch.equal(b_acts, c_acts) and torch.equal(b_out, c_out)


def test_training_learns_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    rows, _ = dataset.load(THOUGHT_SITE)
    whole = train_sae(rows, SMALL, THOUGHT_SITE, workdir=tmp_path / "whole", progress=False)
    assert reconstruction_metrics(whole, rows)["explained_variance"] > 0.5  # 200 steps on 96 problems

    original = ShuffledBatches.__next__

    class Killed(Exception):
        pass

    def dies_at_step_70(self):
        if self.step == 70:
            raise Killed
        return original(self)

    monkeypatch.setattr(ShuffledBatches, "__next__", dies_at_step_70)
    with pytest.raises(Killed):
        train_sae(rows, SMALL, THOUGHT_SITE, workdir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(ShuffledBatches, "__next__", original)
    assert any((tmp_path / "killed" / "checkpoints").iterdir())
    resumed = train_sae(rows, SMALL, THOUGHT_SITE, workdir=tmp_path / "killed", progress=False)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("site", [THOUGHT_SITE, RESID_SITE], ids=lambda s: s.id)
def test_splicing_with_the_error_term_reproduces_the_loop(model, problems, site):
    questions = [p.question for p in problems[:16]]
    plain = model.run_codi(questions)
    sae = _random_sae(site, model.cfg.d_model)  # any SAE: the error term restores the activation
    answers = [f"The answer is: {p.gold:g}" for p in problems[:16]]
    plain_scores = model.score_answers(questions, answers)
    with attached(model, [sae], use_error_term=True):
        spliced = model.run_codi(questions)
        spliced_scores = model.score_answers(questions, answers)
    assert (spliced.latent_states - plain.latent_states).abs().max() <= 1e-5
    assert spliced.answer_tokens == plain.answer_tokens
    assert (spliced_scores.logits - plain_scores.logits).abs().max() <= 1e-4  # teacher forcing sees it too
    with attached(model, [sae], use_error_term=False):  # a random SAE's reconstruction does change the loop
        replaced = model.run_codi(questions)
    assert (
        replaced.latent_states[:, site.thought + 1 :] - plain.latent_states[:, site.thought + 1 :]
    ).abs().max() > 1e-2
    assert not any("hook_sae" in name for name in model.hook_dict)  # detached on exit


def test_splice_effect_reads_the_whole_answer_number(model, problems):
    """``splice_effect``: with the error term nothing moves (KL and the number's log-probability change 0);
    without it, ``logprob_change`` is the change of ``log p`` summed over the plain answer number's tokens,
    computed here from two teacher-forced runs."""
    from codi_lens.metrics import find_answer_number
    from codi_lens.saes.quality import splice_effect

    subset = problems[:8]
    questions = [p.question for p in subset]
    sae = _random_sae(THOUGHT_SITE, model.cfg.d_model)
    exact = splice_effect(model, subset, [sae], use_error_term=True, max_new_tokens=16)
    assert exact["kl"].abs().max() <= 1e-6 and exact["logprob_change"].abs().max() <= 1e-4
    changed = splice_effect(model, subset, [sae], use_error_term=False, max_new_tokens=16)
    plain = model.run_codi(questions, max_new_tokens=16)
    for i, tokens in enumerate(plain.answer_tokens):
        number = find_answer_number(model.tokenizer, tokens)
        forced = [list(number.prefix) + list(number.tokens)]
        before = model.score_answers([questions[i]], forced).logits[0].double().log_softmax(-1)
        with attached(model, [sae], use_error_term=False):
            after = model.score_answers([questions[i]], forced).logits[0].double().log_softmax(-1)
        rows = range(number.index, number.index + len(number.tokens))
        expected = sum(float(after[r, t] - before[r, t]) for r, t in zip(rows, number.tokens))
        assert changed["logprob_change"].iloc[i] == pytest.approx(expected, abs=1e-4)
    assert changed["logprob_change"].abs().max() > 1e-3


def test_residual_sae_touches_only_its_thought(model, problems):
    questions = [p.question for p in problems[:8]]
    _, plain = model.run_codi_with_cache(questions, names_filter="blocks.1.hook_resid_post", max_new_tokens=4)
    sae = _random_sae(RESID_SITE, model.cfg.d_model)
    with attached(model, [sae], use_error_term=False):
        result, spliced = model.run_codi_with_cache(
            questions, names_filter=lambda n: n.startswith("blocks.1.hook_resid_post"), max_new_tokens=4
        )
    at = result.positions.thoughts[RESID_SITE.thought - 1]
    before, after = plain["blocks.1.hook_resid_post"], spliced["blocks.1.hook_resid_post.hook_sae_output"]
    assert torch.equal(after[:, :at], before[:, :at])  # the question, BOT and thought 1 are untouched
    _, reconstruction = encode_decode(sae, spliced["blocks.1.hook_resid_post.hook_sae_input"][:, at])
    assert torch.allclose(after[:, at], reconstruction, atol=1e-6)


def test_cache_holds_feature_activations_of_the_thought(model, problems, trained):
    questions = [p.question for p in problems[:8]]
    plain = model.run_codi(questions, max_new_tokens=1)
    with attached(model, [trained], use_error_term=True):
        _, cache = model.run_codi_with_cache(questions, names_filter=lambda n: "hook_sae" in n, max_new_tokens=1)
    acts = cache[sae_acts_hook_name(trained)]
    expected, _ = encode_decode(trained, plain.latent_states[:, 3])
    assert acts.shape == (8, SMALL.d_sae)
    assert torch.allclose(acts.float(), expected, atol=1e-5)


def test_editing_a_zero_feature_changes_nothing_and_a_clamp_does(model, problems, trained):
    questions = [p.question for p in problems[:8]]
    plain = model.run_codi(questions, max_new_tokens=1)
    acts, _ = encode_decode(trained, plain.latent_states[:, 3])
    silent = int(torch.nonzero((acts == 0).all(0)).flatten()[0])  # zero on every one of these problems
    with attached(model, [trained], use_error_term=False):
        spliced = model.run_codi(questions)
        ablated = model.run_codi(questions, fwd_hooks=feature_edit(trained, [silent], "ablate"))
        scaled = model.run_codi(questions, fwd_hooks=feature_edit(trained, [silent], "scale", 5.0))
        clamped = model.run_codi(questions, fwd_hooks=feature_edit(trained, [silent], "clamp", 50.0))
    assert torch.equal(ablated.latent_states, spliced.latent_states)
    assert ablated.answer_tokens == spliced.answer_tokens
    assert torch.equal(scaled.latent_states, spliced.latent_states)
    assert (clamped.latent_states[:, 4:] - spliced.latent_states[:, 4:]).abs().max() > 1e-3


def test_swapping_features_moves_the_site_and_later_thoughts_as_recomputed(model, problems, trained):
    """Swapping three features at thought 3 (error term on): h_3 becomes the plain h_3 plus the decoder rows of
    those features weighted by (donor - own) activations, written out from W_dec (rows scaled as SAELens'
    TopK decoder scales them); h_0..h_2 and the thoughts fed
    before are bit-identical to the plain run; and everything after equals a plain run (no SAE) fed that h_3."""
    questions = [p.question for p in problems[:4]]
    plain = model.run_codi(questions, max_new_tokens=24)
    acts, _ = encode_decode(trained, plain.latent_states[:, 3])
    features = torch.topk(acts.sum(0), 3).indices.tolist()
    donor = acts[[1, 2, 3, 0]][:, features]  # each problem gets the next problem's values
    with attached(model, [trained], use_error_term=True):
        swapped = model.run_codi(questions, max_new_tokens=24, fwd_hooks=feature_edit(trained, features, "swap", donor))
    with torch.no_grad():  # SAELens' TopK decoder reads activations divided by each decoder row's norm
        rows = trained.W_dec[features]
        weight = 1 / rows.norm(dim=-1) if trained.cfg.rescale_acts_by_decoder_norm else torch.ones(len(features))
        moved = plain.latent_states[:, 3] + ((donor - acts[:, features]) * weight) @ rows
    assert (moved - plain.latent_states[:, 3]).abs().max() > 1e-2  # the swap does move h_3
    assert (swapped.latent_states[:, 3] - moved).abs().max() <= 1e-5
    assert torch.equal(swapped.latent_states[:, :3], plain.latent_states[:, :3])
    assert torch.equal(swapped.thought_embeds[:, :3], plain.thought_embeds[:, :3])
    recomputed = model.run_codi(
        questions, max_new_tokens=24, fwd_hooks=[("thought.3.hook_hidden", lambda h, hook: moved.to(h.dtype))]
    )
    assert (swapped.latent_states[:, 4:] - recomputed.latent_states[:, 4:]).abs().max() <= 1e-4
    assert swapped.answer_tokens == recomputed.answer_tokens


def test_a_lossy_splice_leaves_every_earlier_step_bit_identical(model, problems):
    """Without the error term the reconstruction replaces h_3: the question's run, h_0..h_2 and the thoughts fed
    at 1..3 are bit-identical to the plain run's; h_3 is the SAE's reconstruction of the plain h_3."""
    questions = [p.question for p in problems[:8]]
    plain, cache = model.run_codi_with_cache(questions, max_new_tokens=4, names_filter="blocks.1.hook_resid_post")
    sae = _random_sae(THOUGHT_SITE, model.cfg.d_model)
    with attached(model, [sae], use_error_term=False):
        lossy, lossy_cache = model.run_codi_with_cache(
            questions, max_new_tokens=4, names_filter="blocks.1.hook_resid_post"
        )
    assert torch.equal(lossy.latent_states[:, :3], plain.latent_states[:, :3])
    assert torch.equal(lossy.thought_embeds[:, :3], plain.thought_embeds[:, :3])
    through = plain.positions.thoughts[2]  # thought 3's position: computed before h_3 is read
    assert torch.equal(
        lossy_cache["blocks.1.hook_resid_post"][:, : through + 1], cache["blocks.1.hook_resid_post"][:, : through + 1]
    )
    _, reconstruction = encode_decode(sae, plain.latent_states[:, 3])
    assert (lossy.latent_states[:, 3] - reconstruction).abs().max() <= 1e-6
    assert (lossy.latent_states[:, 4:] - plain.latent_states[:, 4:]).abs().max() > 1e-2


def test_legacy_state_dict_converts_and_matches_its_forward_pass(tmp_path):
    torch.manual_seed(0)
    d_in, d_sae = 16, 40
    state = {
        "encoder.weight": torch.randn(d_sae, d_in),
        "encoder.bias": torch.randn(d_sae),
        "decoder.weight": torch.randn(d_in, d_sae),
        "decoder.bias": torch.randn(d_in),
    }
    plain = tmp_path / "pos_3_final.pt"
    torch.save(state, plain)
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": state, "config": {"hook_name": "blocks.0.hook_resid_post", "position": 2}}, wrapped)
    x = torch.randn(5, d_in)
    features = torch.relu(x @ state["encoder.weight"].T + state["encoder.bias"])  # what earlier CODI work computed
    expected = features @ state["decoder.weight"].T + state["decoder.bias"]
    for path, site in (
        (plain, Site.at_thought("thought.3.hook_hidden", 3)),
        (wrapped, Site.at_thought("blocks.0.hook_resid_post", 2)),
    ):
        sae = convert_legacy_sae(path, hook_name=site.hook if path is plain else None)
        acts, out = encode_decode(sae, x)
        assert torch.allclose(acts, features, atol=1e-5) and torch.allclose(out, expected, atol=1e-4)
        assert sae.cfg.metadata.hook_name == site.hook and sae.cfg.metadata.codi_thoughts == [site.thought]
        reloaded = load_sae(save_sae(sae, tmp_path / f"converted-{path.stem}"))
        assert torch.equal(encode_decode(reloaded, x)[1], out)


def test_legacy_files_with_a_bad_key_are_refused_by_name(tmp_path):
    state = {
        "encoder.weight": torch.zeros(8, 4),
        "encoder.bias": torch.zeros(8),
        "decoder.weight": torch.zeros(4, 7),
        "decoder.bias": torch.zeros(4),
    }
    torch.save(state, tmp_path / "pos_1_final.pt")
    with pytest.raises(SAEError, match=r"'decoder.weight' has shape \(4, 7\), expected \(4, 8\)"):
        convert_legacy_sae(tmp_path / "pos_1_final.pt", hook_name="thought.1.hook_hidden")
    del state["encoder.bias"]
    torch.save(state, tmp_path / "pos_1_final.pt")
    with pytest.raises(SAEError, match="missing key 'encoder.bias'"):
        convert_legacy_sae(tmp_path / "pos_1_final.pt", hook_name="thought.1.hook_hidden")


def test_train_saes_experiment_writes_saelens_folders_and_the_table(tmp_path, monkeypatch):
    """... and every stage that runs the model tells its progress bar of each forward pass (at the 1B shape
    the SAE stage's plain and spliced runs left the bar still for 30 s when it did not)."""
    from codi_lens.run.store import WorkBar
    from experiments import train_saes

    heard: set[str] = set()
    told = WorkBar.forward
    monkeypatch.setattr(WorkBar, "forward", lambda bar, *a: (heard.add(bar.bar.desc.rstrip(": ")), told(bar, *a)))

    out = tmp_path / "run"
    flags = ["--sites", "thought.2.hook_hidden,blocks.0.hook_resid_post@1", "--train-limit", "128", "--limit", "32"]
    flags += ["--splice-limit", "8", "--training-samples", "4096", "--sae-batch-size", "64", "--d-sae", "128"]
    flags += ["--out", str(out)]
    summary = train_saes.main(flags)
    table = pd.read_parquet(out / "results.parquet")
    required = {"sae_id", "hook", "thought", "architecture", "d_sae", "explained_variance", "l0", "dead_fraction"}
    assert required <= set(table.columns) and len(table) == 2
    assert set(table["site"]) == {"thought.2.hook_hidden", "blocks.0.hook_resid_post@1"}
    assert (table["accuracy_spliced_error"] == table["accuracy_plain"]).all()  # the error term restores the run
    assert json.loads((out / "train_problems.json").read_text())[:2] == ["toy-chain:train:0", "toy-chain:train:1"]
    for sae_id in table["sae_id"]:
        assert load_sae(out / "saes" / sae_id).cfg.d_sae == 128
    assert summary["n_saes"] == 2
    assert heard == {"thought activations", "SAEs"}  # the evaluation stage reads saved activations only
    again = train_saes.main(flags)  # a finished run reruns from its files
    assert again["explained_variance"] == summary["explained_variance"]
    assert ActivationDataset(out / "activations" / "heldout").problem_ids[0] == "toy-chain:test:0"


def test_train_saes_names_a_bad_flag_in_one_line(capsys, tmp_path):
    from experiments import train_saes

    with pytest.raises(SystemExit) as exit_info:
        train_saes.run_main(train_saes.main, ["--architectures", "topk,relu2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    expected = "unknown SAE architecture 'relu2'; choose from standard, topk, batchtopk, matryoshka"
    assert err == [f"error: --architectures: {expected}"]
    with pytest.raises(SystemExit):
        train_saes.run_main(train_saes.main, ["--sites", "blocks.1.hook_resid_post", "--out", str(tmp_path)])
    assert "needs a thought, e.g. blocks.1.hook_resid_post@3" in capsys.readouterr().err


def test_an_unknown_feature_op_is_refused_before_any_run(trained):
    with pytest.raises(ChoiceError, match="unknown feature op 'zap'; choose from ablate, scale, clamp, swap"):
        feature_edit(trained, [0], "zap")


def test_convert_legacy_sae_command_round_trips_a_hand_written_folder(tmp_path):
    """Two legacy files written by hand: a ReLU SAE named by the pos_<p>_ convention and a top-k one whose thought
    is given on the command line. The SAELens folders the command writes compute the files' own forward pass
    (written out here), and the reported explained variance is the one computed by hand on the model's thoughts."""
    from codi_lens.saes import sae_site
    from experiments import convert_legacy_sae

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    d, d_sae = 128, 16
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name in ("pos_2_relu.pt", "mine.pt"):
        state = {
            "encoder.weight": torch.randn(d_sae, d, generator=generator) / 8,
            "encoder.bias": torch.randn(d_sae, generator=generator) / 8,
            "decoder.weight": torch.randn(d, d_sae, generator=generator) / 4,
            "decoder.bias": torch.randn(d, generator=generator) / 8,
        }
        weights[name] = state
        blob = state if name.startswith("pos_") else {"model_state_dict": state, "config": {"k": 4}}
        torch.save(blob, legacy / name)
    out = tmp_path / "out"
    flags = ["--legacy", str(legacy), "--hook", "thought.{k}.hook_hidden", "--limit", "24", "--out", str(out)]
    with pytest.raises(SAEError, match="mine.pt: which thought is it"):
        convert_legacy_sae.main(flags)  # mine.pt says no thought and no one is at the terminal to ask
    summary = convert_legacy_sae.main([*flags, "--thought", "mine.pt=4"])
    assert summary["n_saes"] == 2
    table = pd.read_parquet(out / "results.parquet").set_index("file")
    model = load_pretrained()
    thoughts = model.run_codi([p.question for p in load_problems("toy-chain:test", limit=24)], max_new_tokens=1)
    for name, thought, k in (("pos_2_relu.pt", 2, None), ("mine.pt", 4, 4)):
        state = weights[name]
        sae = load_sae(out / "saes" / table.loc[name, "sae_id"])
        assert sae_site(sae) == Site(f"thought.{thought}.hook_hidden")
        x = thoughts.latent_states[:, thought].float()  # h_k, what thought.k.hook_hidden holds
        pre = torch.relu(x @ state["encoder.weight"].T + state["encoder.bias"])
        if k:
            top = pre.topk(k, dim=-1)
            pre = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        x_hat = pre @ state["decoder.weight"].T + state["decoder.bias"]
        acts, recon = encode_decode(sae, x)
        torch.testing.assert_close(acts, pre, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recon, x_hat, rtol=1e-5, atol=1e-5)
        by_hand = 1 - (x - x_hat).double().var(0, unbiased=False).sum() / x.double().var(0, unbiased=False).sum()
        assert table.loc[name, "explained_variance"] == pytest.approx(float(by_hand), abs=1e-5)
        assert table.loc[name, "l0"] == pytest.approx(float((pre > 0).sum(1).float().mean()))
