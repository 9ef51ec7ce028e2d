"""Every command checks its flags and inputs before it loads a model, and stops in one line when nothing is
left to measure, with the counts by reason written to ``summary.json``.

The model loader is replaced by one that fails the test, so a check that ran after loading (paying for the
weights first) fails here, as does any traceback in place of the one ``error:`` line.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from codi_lens.run import cli
from experiments import (
    ablation_attention,
    evaluate,
    feature_pathways,
    iterative_patching,
    logit_attribution,
    make_pairs,
    path_patching,
    position_patching,
    read_thoughts,
    route_patching,
    sae_features,
    step_importance,
    toy_model_report,
    train_saes,
)

#: The commands that share the common flags.
COMMANDS = {
    "evaluate": evaluate,
    "step_importance": step_importance,
    "ablation_attention": ablation_attention,
    "position_patching": position_patching,
    "iterative_patching": iterative_patching,
    "route_patching": route_patching,
    "logit_attribution": logit_attribution,
    "path_patching": path_patching,
    "read_thoughts": read_thoughts,
    "train_saes": train_saes,
    "sae_features": sae_features,
    "feature_pathways": feature_pathways,
    "toy_model_report": toy_model_report,
}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every check below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_codi", refuse)


def one_error_line(module, argv, capsys) -> str:
    """Run a command as ``python -m`` would; return its one ``error:`` line, the last on stderr (and check exit
    status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(module.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == errors[0]  # progress bars may come before it, nothing after
    return errors[0]


def bad_values(tmp_path) -> list[tuple[list[str], str]]:
    """``(flags, the start of the message)`` for a bad value of every shared flag."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--limit", "-3"], "error: --limit must be at least 1, got -3"),
        (["--limit", "0"], "error: --limit must be at least 1, got 0"),
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1, got 0"),
        (["--lora-alpha", "0"], "error: --lora-alpha must be positive, got 0.0"),
        (["--ray-cpus", "-1"], "error: --ray-cpus must be positive, got -1.0"),
        (["--device", "toaster"], "error: --device 'toaster' is not a device name"),
        (["--out", str(a_file)], f"error: --out {a_file}: {a_file} is a file, not a folder"),
        (["--out", str(a_file / "below")], f"error: --out {a_file / 'below'}: {a_file} is a file, not a folder"),
        (["--data", str(empty)], f"error: --data {empty}: no problems to run on"),
        (["--data", str(tmp_path / "missing.jsonl")], "error: "),
        (["--checkpoint", str(tmp_path / "nope")], "error: --base is required for checkpoint"),
        (["--checkpoint", str(tmp_path / "nope"), "--base", "gpt2"], f"error: checkpoint {str(tmp_path / 'nope')!r}"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "error: --device cuda: this machine has no CUDA device"))
    return cases


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_shared_flag_is_checked_before_the_model_loads(name, tmp_path, capsys, no_model):
    module = COMMANDS[name]
    out = ["--out", str(tmp_path / "out")]
    for flags, message in bad_values(tmp_path):
        argv = [*out, *flags] if "--out" not in flags else flags
        line = one_error_line(module, argv, capsys)
        assert line.startswith(message), (name, flags, line)


@pytest.mark.parametrize("name", ["step_importance", "ablation_attention"])
def test_limit_and_stratified_together_are_refused(name, tmp_path, capsys, no_model):
    line = one_error_line(COMMANDS[name], ["--limit", "5", "--stratified", "2", "--out", str(tmp_path)], capsys)
    assert (
        line == "error: give --limit (the first N records) or --stratified (N per bucket of the whole split), not both"
    )
    line = one_error_line(COMMANDS[name], ["--stratified", "0", "--out", str(tmp_path)], capsys)
    assert line == "error: --stratified must be at least 1, got 0"


def test_command_specific_inputs_are_checked_before_the_model_loads(tmp_path, capsys, no_model):
    out = ["--out", str(tmp_path / "out")]
    line = one_error_line(step_importance, [*out, "--limit", "1"], capsys)
    assert line.startswith(
        "error: --interventions zero,mean,noise,swap,shuffle: swapping thoughts with --donors 1 needs 2"
    )
    line = one_error_line(train_saes, [*out, "--train-limit", "64"], capsys)
    assert line.startswith("error: 64 training rows per site cannot fill one batch of 256: raise --train-limit")
    line = one_error_line(train_saes, [*out, "--sites", "blocks.7.hook_resid_post@thought:2"], capsys)
    assert line == "error: --sites: blocks.7.hook_resid_post@2 names layer 7; this model has layers 0..1"
    line = one_error_line(iterative_patching, [*out, "--layers", "5"], capsys)
    assert line == "error: --layers: layer 5 is outside 0..1"
    for module in (sae_features, feature_pathways):
        line = one_error_line(module, [*out, "--saes", str(tmp_path / "no_saes")], capsys)
        assert "no_saes" in line, line
    empty_pairs = tmp_path / "empty_pairs.parquet"
    pd.DataFrame(
        columns=["pair_id", "clean_question", "corrupted_question", "clean_answer", "corrupted_answer"]
    ).to_parquet(empty_pairs)
    line = one_error_line(position_patching, [*out, "--pairs", str(empty_pairs)], capsys)
    assert line == f"error: --pairs {empty_pairs}: the file holds no pairs"
    no_spans = tmp_path / "plain.jsonl"
    no_spans.write_text(
        "".join(
            json.dumps({"question": f"Tom has {i} apples and buys 3 more. How many?", "answer": f"#### {i + 3}"}) + "\n"
            for i in range(2, 6)
        )
    )
    line = one_error_line(position_patching, [*out, "--data", str(no_spans)], capsys)
    assert (
        line == f"error: --data {no_spans}: none of 4 problems gives a clean/corrupted pair "
        "(4 no calculator spans in the solution)"
    )


def test_make_pairs_stops_when_no_pair_is_made(tmp_path, capsys):
    no_spans = tmp_path / "plain.jsonl"
    no_spans.write_text(
        json.dumps({"question": "Tom has 2 apples and buys 3 more. How many?", "answer": "#### 5"}) + "\n"
    )
    line = one_error_line(make_pairs, ["--data", str(no_spans), "--out", str(tmp_path / "mp")], capsys)
    assert (
        line == "error: no usable pair (1 no calculator spans in the solution); "
        f"counts in {tmp_path / 'mp' / 'summary.json'}"
    )
    summary = json.loads((tmp_path / "mp" / "summary.json").read_text())
    assert summary["n_pairs"] == 0 and summary["problems_without_pair_by_first_reason"] == {
        "no calculator spans in the solution": 1
    }
    line = one_error_line(make_pairs, ["--limit", "-3", "--out", str(tmp_path / "mp")], capsys)
    assert line == "error: --limit must be at least 1, got -3"


@pytest.fixture(scope="module")
def wrong_pairs(tmp_path_factory):
    """Pairs of the shipped model's test split whose claimed clean answers are all wrong, so the model
    answers every clean question "wrong" and every pair is skipped."""
    folder = tmp_path_factory.mktemp("pairs")
    make_pairs.main(["--limit", "6", "--out", str(folder)])
    pairs = pd.read_parquet(folder / "pairs.parquet")
    pairs["clean_answer"] += 1000
    pairs.to_parquet(folder / "wrong.parquet", index=False)
    return folder / "wrong.parquet", len(pairs)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("position_patching", []),
        ("position_patching", ["--method", "attribution"]),
        ("iterative_patching", ["--layers", "1"]),
        ("route_patching", ["--spans", "2"]),
        ("logit_attribution", []),
        ("path_patching", []),
    ],
)
def test_when_every_pair_is_skipped_the_counts_are_written_and_the_command_stops(
    name, extra, wrong_pairs, tmp_path, capsys
):
    path, n = wrong_pairs
    out = tmp_path / "out"
    argv = ["--pairs", str(path), "--max-new-tokens", "8", "--out", str(out), *extra]
    line = one_error_line(COMMANDS[name], argv, capsys)
    reason = "the model answers the clean question wrong"
    assert line == (
        f"error: nothing left to measure: all {n} pairs were skipped ({n} {reason}); counts in {out / 'summary.json'}"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pairs"] == n and summary["n_pairs_used"] == 0 and summary["skipped_by_reason"] == {reason: n}
    rows = pd.read_parquet(out / "results.parquet")
    assert sorted(rows["pair_id"]) == sorted(pd.read_parquet(path)["pair_id"]) and (rows["reason"] == reason).all()


def test_a_checked_import_feeds_position_patching(tmp_path):
    """``make_pairs --import`` writes the agreeing pairs as a table ``position_patching --pairs`` reads."""
    made = tmp_path / "made"
    make_pairs.main(["--limit", "6", "--out", str(made)])
    pairs = pd.read_parquet(made / "pairs.parquet")
    foreign = tmp_path / "foreign.json"
    rows = [
        {"pair_id": f"ext-{i}", "clean_question": r.clean_question, "corrupted_question": r.corrupted_question}
        for i, r in enumerate(pairs.itertuples())
    ]
    foreign.write_text(json.dumps(rows))
    make_pairs.main(["--import", str(foreign), "--data", "toy-chain:test", "--out", str(tmp_path / "imp")])
    imported = pd.read_parquet(tmp_path / "imp" / "pairs.parquet")
    assert imported["pair_id"].tolist() == [f"ext-{i}" for i in range(len(pairs))]
    for column in ("clean_answer", "corrupted_answer", "n_steps"):
        assert imported[column].tolist() == pairs[column].tolist(), column
    summary = position_patching.main(
        [
            "--pairs",
            str(tmp_path / "imp" / "pairs.parquet"),
            "--max-new-tokens",
            "16",
            "--hooks",
            "thought_input",
            "--out",
            str(tmp_path / "pp"),
        ]
    )
    assert summary["n_pairs"] == len(pairs) and summary["n_pairs_used"] > 0
    first = position_patching.main(
        ["--pairs", str(tmp_path / "imp" / "pairs.parquet"), "--limit", "2", "--max-new-tokens", "16"]
        + ["--hooks", "thought_input", "--out", str(tmp_path / "pp2")]
    )
    assert first["n_pairs"] == 2  # --limit takes the first pairs of a pair file
    assert pd.read_parquet(tmp_path / "pp2" / "pairs.parquet")["pair_id"].tolist() == ["ext-0", "ext-1"]


def test_stratified_draws_from_the_whole_split_and_records_the_ids(tmp_path, capsys):
    """``--stratified N`` ignores the command's default ``--limit`` (300 of toy-chain's 1,000 test problems),
    names the buckets short of N, and writes the chosen ids to the folder and to ``run.json``."""
    from codi_lens.data import DIFFICULTY_BUCKETS, difficulty_bucket, load_problems

    parser = cli.command_parser(None, out=str(tmp_path), limit=300)
    cli.add_selection_args(parser)
    run = cli.start_run(cli.parse_common_args(parser, ["--stratified", "60", "--seed", "3", "--out", str(tmp_path)]))
    chosen = run.problems()
    everything = load_problems("toy-chain:test")
    counts = {b: sum(difficulty_bucket(p.n_steps) == b for p in everything) for b in DIFFICULTY_BUCKETS}
    assert counts["<=2"] < 60 <= min(counts["3"], counts["4"], counts["5+"])  # the shipped split's shape
    drawn = {b: sum(difficulty_bucket(p.n_steps) == b for p in chosen) for b in DIFFICULTY_BUCKETS}
    assert drawn == {b: min(60, n) for b, n in counts.items()}
    assert max(p.index for p in chosen) >= 300  # beyond the first --limit records
    assert capsys.readouterr().err.splitlines() == [
        f"bucket <=2 holds {counts['<=2']} problems, fewer than 60: taking all of them"
    ]
    ids = [p.id for p in chosen]
    assert json.loads((tmp_path / "selected_problems.json").read_text()) == ids
    settings = run.settings()
    assert settings["selected_problem_ids"] == ids and settings["limit"] is None


def test_every_forward_pass_is_heard(tmp_path):
    """``model.listening``: each transformer block of each forward pass is told (rows, block); the prompt, each of
    the n thoughts and each decoded token is one pass (a run that stops at EOS has fewer), so a bar told of them
    moves within a batch and within one long pass."""
    from codi_lens import load_pretrained

    model = load_pretrained()
    heard: list[tuple[int, int]] = []
    with model.listening(lambda rows, block: heard.append((rows, block))):
        result = model.run_codi(["Uma owns 8 cards. How many cards does Uma own?"] * 3, n_latents=4, max_new_tokens=5)
    longest = max(len(t) for t in result.answer_tokens)
    passes = 1 + 4 + longest
    assert heard == [(3, block) for _ in range(passes) for block in range(model.cfg.n_layers)]
    model.run_codi(["Uma owns 8 cards."], n_latents=2, max_new_tokens=2)
    assert len(heard) == passes * model.cfg.n_layers  # not told outside the block


def test_a_dry_run_prints_the_plan_keeps_its_first_batch_and_the_full_run_goes_on(tmp_path, capsys):
    flags = [
        "--limit",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--interventions",
        "zero",
        "--scopes",
        "single",
    ]
    assert cli.run_main(step_importance.main, [*flags, "--out", str(tmp_path / "dry"), "--dry-run"]) is None
    err = capsys.readouterr().err
    assert "plan: step importance: 4 of 4 units to compute (24 branches) in 2 batch(es) of up to 2" in err
    assert "first batch: 12 branches in " in err and "for the remaining 12" in err
    assert err.strip().splitlines()[-1].startswith("dry run: stopped after the first batch")
    assert re.search(r"loading: 100%.*\b7/7\b", err) and "loaded in" in err  # 2 blocks + 5 parts
    assert not (tmp_path / "dry" / "results.parquet").exists()
    kept = pd.concat(pd.read_parquet(f) for f in sorted((tmp_path / "dry" / "parts").glob("part-*.parquet")))
    assert kept["problem_id"].nunique() == 2
    step_importance.main([*flags, "--out", str(tmp_path / "dry")])
    assert "plan: step importance: 2 of 4 units to compute (12 branches)" in capsys.readouterr().err
    step_importance.main([*flags, "--out", str(tmp_path / "straight")])
    resumed = pd.read_parquet(tmp_path / "dry" / "results.parquet")
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(tmp_path / "straight" / "results.parquet"))


def test_mean_thoughts_move_a_bar_and_equal_the_mean_of_one_run(monkeypatch):
    """The 'mean' intervention's reference pass (minutes at the 1B shape, before any other bar) has its own
    bar told of every block; batching does not change the mean (one run over all questions, averaged here)."""
    from codi_lens import load_pretrained
    from codi_lens.data import load_problems
    from codi_lens.interventions.thoughts import mean_thought_embeds
    from codi_lens.run.store import WorkBar

    heard: list[str] = []
    told = WorkBar.forward
    monkeypatch.setattr(WorkBar, "forward", lambda bar, *a: (heard.append(bar.bar.desc.rstrip(": ")), told(bar, *a)))
    model = load_pretrained()
    questions = [p.question for p in load_problems("toy-chain:test", limit=5)]
    means = mean_thought_embeds(model, questions, n_latents=3, batch_size=2)
    assert set(heard) == {"mean thoughts"} and len(heard) == 3 * (1 + 3) * model.cfg.n_layers  # 3 batches
    expected = model.run_latents(questions, n_latents=3).thought_embeds.double().mean(0)
    assert torch.allclose(means.double(), expected, atol=1e-6)
