"""GSM8K-format accuracy of a CODI checkpoint, resumable.

    python -m codi_lens.evaluate --checkpoint DIR --base DIR_OR_NAME --data PATH \\
        [--limit N] [--batch-size B] --out predictions.jsonl

Each prediction is appended to ``--out`` (JSON Lines) as soon as its batch finishes. Rerunning the
same command after a kill skips the problems already in the file (a half-written last line is
discarded), so no row is lost or duplicated. The last line printed is ``accuracy: X/N``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from codi_lens.answers import is_correct
from codi_lens.data import Problem, load_problems
from codi_lens.loading import DEFAULT_MODEL, load_codi
from codi_lens.model import CODIModel, CODIResult


def read_finished_rows(path: Path) -> list[dict]:
    """Rows already written to ``path``; drops a trailing partial line left by a kill."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def _batches(items: list[Problem], size: int) -> Iterator[list[Problem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


Runner = Callable[[list[str]], CODIResult]


def codi_runner(
    model: CODIModel, *, n_latents: int = 6, max_new_tokens: int = 256, fwd_hooks: Sequence[tuple] = ()
) -> Runner:
    """A runner answering questions with the CODI loop (optionally under interventions)."""
    return lambda questions: model.run_codi(
        questions, n_latents=n_latents, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks
    )


def evaluate(
    run: Runner,
    problems: list[Problem],
    out: str | Path,
    *,
    batch_size: int = 8,
    condition: str = "latents",
    progress: bool = True,
) -> pd.DataFrame:
    """Answer every problem not yet in ``out`` with ``run``; return all rows as a DataFrame.

    ``run`` maps a list of questions to a :class:`CODIResult` (see :func:`codi_runner`;
    ``model.generate_explicit`` evaluates the explicit-CoT teacher mode). ``condition`` labels rows.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {row["id"] for row in read_finished_rows(out)}
    todo = [p for p in problems if p.id not in done]
    bar = tqdm(
        total=len(problems),
        initial=len(problems) - len(todo),
        desc=f"evaluate {condition}",
        unit="problem",
        disable=not progress,
    )
    with open(out, "a") as f:
        for batch in _batches(todo, batch_size):
            result = run([p.question for p in batch])
            for p, text, pred in zip(batch, result.answer_text, result.prediction):
                row = {
                    "id": p.id,
                    "condition": condition,
                    "index": p.index,
                    "split": p.split,
                    "n_steps": p.n_steps,
                    "gold": p.gold,
                    "prediction": pred,
                    "correct": is_correct(pred, p.gold),
                    "answer_text": text,
                }
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    wanted = {p.id for p in problems}
    return pd.DataFrame([r for r in read_finished_rows(out) if r["id"] in wanted])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL, help="checkpoint dir/file or shipped model name")
    parser.add_argument("--base", default=None, help="base model dir or built-in name")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (needed with a built-in base)")
    parser.add_argument("--data", required=True, help="GSM8K-format JSONL path or hub dataset name")
    parser.add_argument("--split", default=None, help="split name (required for a hub dataset)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-latents", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", required=True, help="predictions JSONL (appended to; resumable)")
    args = parser.parse_args(argv)

    model = load_codi(
        args.checkpoint,
        args.base,
        tokenizer=args.tokenizer,
        lora_alpha=args.lora_alpha,
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    run = codi_runner(model, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens)
    frame = evaluate(run, problems, args.out, batch_size=args.batch_size)
    print(f"accuracy: {int(frame['correct'].sum())}/{len(frame)}")


if __name__ == "__main__":
    main()
