"""The evaluate CLI and the shared runner: rows against the reference, resume after a kill, no stale rows."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from codi_lens import extract_prediction
from codi_lens.data import load_problems, shipped_dataset_text
from codi_lens.run.store import ResultStore, SettingsMismatchError
from experiments.evaluate import main as evaluate_main

LIMIT = 5
DATA = "gsm8k:test"


def _run(ckpt, out, capsys, *extra: str):
    evaluate_main(
        [
            "--checkpoint",
            str(ckpt.checkpoint_dir),
            "--base",
            str(ckpt.base_dir),
            "--data",
            DATA,
            "--limit",
            str(LIMIT),
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
            *extra,
        ]
    )
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_evaluate_matches_reference_and_resumes_after_a_kill(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "eval"
    last_line = _run(ckpt, out, capsys, "--batch-size", "2")
    rows = pd.read_parquet(out / "results.parquet")
    problems = load_problems(DATA, limit=LIMIT)
    assert list(rows["problem_id"]) == [p.id for p in problems] == [f"gsm8k:test:{i}" for i in range(LIMIT)]

    # Every row agrees with the independent reference run one question at a time.
    reference = ckpt.reference()
    for row, problem in zip(rows.itertuples(), problems):
        ref = reference.run(problem.question, n_latents=6, max_new_tokens=6)
        assert row.answer_text == ref["answer_text"]
        expected = extract_prediction(ref["answer_text"])
        assert pd.isna(row.prediction) if expected is None else row.prediction == expected
        assert row.gold == problem.gold and row.correct == (row.prediction == problem.gold)
    assert last_line == f"accuracy: {int(rows['correct'].sum())}/{LIMIT}"

    # Simulate kill -9 after the first part and in the middle of writing the second: the finished
    # part stays, the half-written temporary file is discarded, and the rerun loses and repeats nothing.
    parts = sorted((out / "parts").glob("part-*.parquet"))
    assert len(parts) == 3  # batches of 2, 2, 1
    for part in parts[1:]:
        part.unlink()
    (out / "parts" / ".tmp-part-000001-deadbeef.parquet").write_bytes(b"PAR1 half a file")
    (out / "results.parquet").unlink()
    assert _run(ckpt, out, capsys, "--batch-size", "3") == last_line
    resumed = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(resumed, rows)
    assert not list((out / "parts").glob(".tmp-*"))

    # A finished folder is left alone: nothing is recomputed.
    before = sorted(p.name for p in (out / "parts").iterdir())
    _run(ckpt, out, capsys, "--batch-size", "2")
    assert sorted(p.name for p in (out / "parts").iterdir()) == before


def test_a_folder_of_another_run_is_refused_not_mixed(tiny_checkpoint, tmp_path, capsys):
    """Another checkpoint, budget or data into the same folder used to return the old predictions."""
    llama, gpt2 = tiny_checkpoint("llama"), tiny_checkpoint("gpt2")
    out = tmp_path / "eval"
    _run(llama, out, capsys)
    with pytest.raises(SettingsMismatchError, match="checkpoint_sha256"):
        _run(gpt2, out, capsys)
    with pytest.raises(SettingsMismatchError, match=r"max_new_tokens \(6 there, 7 now\)"):
        _run(llama, out, capsys, "--max-new-tokens", "7")
    # A checkpoint file with the same name but other content is caught by its hash, not its path.
    copy = tmp_path / "ckpt"
    shutil.copytree(llama.checkpoint_dir, copy)
    same_path = ["--checkpoint", str(copy), "--base", str(llama.base_dir), "--limit", "2", "--data", DATA]
    evaluate_main([*same_path, "--max-new-tokens", "2", "--out", str(tmp_path / "eval2")])
    (copy / llama.file.name).write_bytes(tiny_checkpoint("llama", use_lora=False).file.read_bytes())
    with pytest.raises(SettingsMismatchError, match="checkpoint_sha256"):
        evaluate_main([*same_path, "--max-new-tokens", "2", "--out", str(tmp_path / "eval2")])
    # --overwrite starts afresh.
    _run(gpt2, out, capsys, "--overwrite")
    assert json.loads((out / "run.json").read_text())["settings"]["checkpoint"] == str(gpt2.checkpoint_dir)


def test_cli_errors_are_one_line_naming_the_problem(tmp_path, preloaded):
    command = ["--checkpoint", str(tmp_path / "nope"), "--base", "gpt2", "--out", str(tmp_path / "o")]
    proc = preloaded.run(["-m", "experiments.evaluate", *command])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint {str(tmp_path / 'nope')!r} does not exist"]


def test_two_local_files_with_the_same_name_get_different_ids(tmp_path):
    rows = [json.loads(line) for line in shipped_dataset_text("gsm8k:test").splitlines()[:4]]
    for folder, chosen in (("a", rows[:2]), ("b", rows[2:])):
        (tmp_path / folder / "data").mkdir(parents=True)
        (tmp_path / folder / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    a = load_problems(tmp_path / "a" / "data" / "test.jsonl")
    b = load_problems(tmp_path / "b" / "data" / "test.jsonl")
    assert not {p.id for p in a} & {p.id for p in b}
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({**rows[0], "id": "my-problem-7"}) + "\n")
    assert load_problems(own)[0].id == "my-problem-7"


def test_result_store_keeps_units_without_rows_and_refuses_foreign_rows(tmp_path):
    store = ResultStore(tmp_path / "r", {"x": 1})
    units = ["a", "b", "c"]
    calls = []

    def work(batch):
        calls.append(list(batch))
        return pd.DataFrame({"unit_id": [u for u in batch if u != "b"], "value": [1.0 for u in batch if u != "b"]})

    first = store.run(units, work, unit_id=str, batch_size=2, progress=False)
    assert list(first["unit_id"]) == ["a", "c"] and calls == [["a", "b"], ["c"]]
    again = ResultStore(tmp_path / "r", {"x": 1}).run(units, work, unit_id=str, batch_size=2, progress=False)
    assert calls == [["a", "b"], ["c"]]  # "b" yielded no row but is done: not recomputed
    pd.testing.assert_frame_equal(again, first)
    with pytest.raises(ValueError, match="outside its batch"):
        ResultStore(tmp_path / "s", {}).run(
            ["a"], lambda b: pd.DataFrame({"unit_id": ["z"]}), unit_id=str, batch_size=1, progress=False
        )


def test_data_defaults_to_the_checkpoints_own_split():
    """With no ``--data`` a command runs on the checkpoint's own test split (a shipped model's, GSM8K's
    for any other checkpoint); ``--data`` always wins. ``value_limit`` keeps minimal pairs of either
    shipped toy split in the one-token range and leaves GSM8K's unbounded."""
    import argparse

    from codi_lens.data.synthetic import MAX_VALUE, value_limit
    from codi_lens.loading import DEFAULT_MODEL, default_data
    from codi_lens.run.cli import add_common_args, parse_common_args

    parser = argparse.ArgumentParser()
    add_common_args(parser, out="results/x")
    assert DEFAULT_MODEL == "toy-chain" and parse_common_args(parser, []).data == "toy-chain:test"
    assert parse_common_args(parser, ["--checkpoint", "toy-arith"]).data == "toy:test"
    assert parse_common_args(parser, ["--checkpoint", "ckpt/codi-llama1b"]).data == "gsm8k:test"
    assert parse_common_args(parser, ["--checkpoint", "toy-arith", "--data", "gsm8k:train"]).data == "gsm8k:train"
    assert default_data("toy-chain", "train") == "toy-chain:train" and default_data("toy-arith", "train") == "toy:train"
    for name in ("toy:test", "toy-chain:test", "toy-chain:validation"):
        assert value_limit(load_problems(name, limit=3)) == MAX_VALUE
    assert value_limit(load_problems("gsm8k:test", limit=3)) is None


def test_accuracy_table_carries_a_bootstrap_ci_over_problems():
    """Half the problems right (200): a percentile bootstrap resamples the 0/1 outcomes, so its accuracies
    follow Binomial(200, 0.5) / 200 and the 95% CI is that law's 2.5% and 97.5% quantiles, [0.43, 0.57],
    within one step of 1/200 (Monte Carlo); a 90% CI ([0.44, 0.56]) is two steps off and fails. Every problem
    right: a zero-width CI at 1; per-step rows count their own problems; the overall rows come first."""
    import numpy as np
    from scipy import stats

    from codi_lens.accuracy import accuracy_table

    steps = np.repeat([2, 3], 100)
    half = pd.DataFrame({"condition": "a", "n_steps": steps, "correct": np.tile([True, False], 100)})
    right = pd.DataFrame({"condition": "b", "n_steps": steps, "correct": True})
    table = accuracy_table(pd.concat([half, right]))
    assert table["group"].tolist()[:2] == ["all", "all"] and table["condition"].tolist()[:2] == ["a", "b"]
    a = table[(table["condition"] == "a") & (table["group"] == "all")].iloc[0]
    assert a["n"] == 200 and a["n_correct"] == 100 and a["accuracy"] == 0.5
    low, high = stats.binom.ppf([0.025, 0.975], 200, 0.5) / 200
    assert abs(a["low"] - low) <= 1 / 200 + 1e-12 and abs(a["high"] - high) <= 1 / 200 + 1e-12, (a["low"], a["high"])
    b = table[table["condition"] == "b"]
    assert (b["low"] == 1).all() and (b["high"] == 1).all()
    per_step = table[(table["condition"] == "a") & (table["group"] != "all")]
    assert per_step["group"].tolist() == ["2", "3"] and per_step["n"].tolist() == [100, 100]
