"""The evaluate CLI: progress, predictions written as produced, resumable without loss or duplicates."""

from __future__ import annotations

import json

from conftest import GSM8K_TEST

from codi_lens.answers import extract_prediction
from codi_lens.data import load_problems
from codi_lens.evaluate import main as evaluate_main

LIMIT = 5


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(ckpt, out, capsys, batch_size):
    evaluate_main(
        [
            "--checkpoint",
            str(ckpt.checkpoint_dir),
            "--base",
            str(ckpt.base_dir),
            "--data",
            str(GSM8K_TEST),
            "--limit",
            str(LIMIT),
            "--batch-size",
            str(batch_size),
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ]
    )
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_evaluate_matches_reference_and_resumes(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "preds.jsonl"
    last_line = _run(ckpt, out, capsys, batch_size=2)
    rows = _rows(out)
    problems = load_problems(GSM8K_TEST, limit=LIMIT)
    assert [r["id"] for r in rows] == [p.id for p in problems]

    # Every row agrees with the independent reference run one question at a time.
    reference = ckpt.reference()
    for row, problem in zip(rows, problems):
        ref = reference.run(problem.question, n_latents=6, max_new_tokens=6)
        assert row["answer_text"] == ref["answer_text"]
        assert row["prediction"] == extract_prediction(ref["answer_text"])
        assert row["gold"] == problem.gold
        assert row["correct"] == (row["prediction"] == problem.gold)
    assert last_line == f"accuracy: {sum(r['correct'] for r in rows)}/{LIMIT}"

    # Simulate a kill after two rows, in the middle of writing the third.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])
    last_line_again = _run(ckpt, out, capsys, batch_size=3)
    resumed = _rows(out)
    assert [r["id"] for r in resumed] == [r["id"] for r in rows]  # nothing lost, nothing duplicated
    assert resumed == rows
    assert last_line_again == last_line

    # A finished file is left alone.
    before = out.read_text()
    _run(ckpt, out, capsys, batch_size=2)
    assert out.read_text() == before
