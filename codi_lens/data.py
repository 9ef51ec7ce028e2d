"""Math word problems: one :class:`Problem` type for GSM8K, local JSONL files and the synthetic data.

Sources (:func:`load_problems`):

- ``"gsm8k:test"`` / ``"gsm8k:train"``: the copy of GSM8K shipped inside the package (MIT licence,
  ``codi_lens/datasets/gsm8k/LICENSE``), read with :mod:`importlib.resources`;
- ``"toy:test"``: the shipped toy-arith model's held-out synthetic test split;
- ``"toy:train"`` / ``"toy:validation"``: its training and validation splits, regenerated from the same seed
  (:data:`codi_lens.synthetic.SHIPPED_SPLITS`; no question is shared with ``toy:test``);
- ``"toy-chain:test"``, ``"toy-chain:train"``, ``"toy-chain:validation"``: the same for the shipped
  toy-chain model (its generator settings are read from its ``training.json``);
- a local GSM8K-format ``.jsonl`` file (``question``, ``answer`` with ``<<...>>`` spans and a final
  ``#### N`` line; an ``id`` field, when present, is kept as the record's id);
- a hub dataset name (needs the optional ``datasets`` extra; never used by tests).

Every problem carries its provenance (source, split, index in the file) and its gold answer parsed
with upstream's rule. Difficulty is the number of ``<<...>>`` calculator spans in the solution.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from codi_lens.answers import parse_gold_answer
from codi_lens.checkpoint import PRETRAINED

CALC_SPAN = re.compile(r"<<([^<>]*)>>")
#: Datasets shipped inside the package, by name: (package directory, file name).
SHIPPED_DATASETS = {
    "gsm8k:test": ("datasets/gsm8k", "test.jsonl"),
    "gsm8k:train": ("datasets/gsm8k", "train.jsonl"),
    "toy:test": ("pretrained/toy_arith/data", "test.jsonl"),
    "toy-chain:test": ("pretrained/toy_chain/data", "test.jsonl"),
}

#: Splits of the shipped toy data regenerated on request, by name: (the shipped model whose
#: ``training.json`` holds the generator's arguments, the split of ``make_splits``).
GENERATED_DATASETS = {
    "toy:train": ("toy-arith", "train"),
    "toy:validation": ("toy-arith", "validation"),
    "toy-chain:train": ("toy-chain", "train"),
    "toy-chain:validation": ("toy-chain", "validation"),
}


#: The dataset of each shipped model's splits (``"toy-chain"`` -> ``toy-chain:test``, ``toy-chain:train``, ...).
SHIPPED_MODEL_DATA = {"toy-arith": "toy", "toy-chain": "toy-chain"}


def default_data(checkpoint: str | Path, split: str = "test") -> str:
    """The problems a command runs on when none are named: a shipped model's own ``split``
    (``"toy-chain:test"``), and GSM8K's for any other checkpoint (CODI checkpoints are GSM8K models)."""
    return f"{SHIPPED_MODEL_DATA.get(str(checkpoint), 'gsm8k')}:{split}"


class DataError(ValueError):
    """A data source that cannot be read as GSM8K-format problems (names the file and record)."""


@dataclass(frozen=True)
class Problem:
    """One math word problem.

    Attributes:
        id: the record's own ``id`` when it has one, else ``"{source}:{split}:{index}"`` where
            ``source`` is the shipped dataset's name or, for a local file, its stem and a digest of its
            content (two files named ``test.jsonl`` in different folders get different ids).
        question: the question text as stored (the model cleans it with upstream's rule).
        solution: the GSM8K-format solution (calculator spans, final ``#### N`` line).
        gold: the parsed gold answer.
        n_steps: number of ``<<...>>`` calculator spans (difficulty).
        source, split, index: provenance (``index`` is the record's line among the file's records).
        intermediates: the result of each calculator span in order (``<<a*b=c>>`` gives c), the
            ground truth for logit-lens and probing; spans whose result is not a number are skipped.
    """

    id: str
    question: str
    solution: str
    gold: float
    n_steps: int
    source: str
    split: str
    index: int
    intermediates: tuple[float, ...] = ()

    @property
    def cot(self) -> str:
        """The equation-only chain of thought (GSM8k-Aug format): ``"<<a*b=c>> <<c+d=e>>"``."""
        return " ".join(f"<<{span}>>" for span in CALC_SPAN.findall(self.solution))

    @property
    def answer_value(self) -> int | float:
        """The gold answer as the model writes it: an int when it is a whole number."""
        return int(self.gold) if float(self.gold).is_integer() else self.gold


def count_steps(solution: str) -> int:
    """Number of ``<<...>>`` calculator spans in a solution."""
    return len(CALC_SPAN.findall(solution))


def span_results(solution: str) -> tuple[float, ...]:
    """The result of every ``<<expr=result>>`` span, in order (non-numeric results skipped)."""
    results = []
    for span in CALC_SPAN.findall(solution):
        value = span.rsplit("=", 1)[-1].replace(",", "").strip()
        try:
            results.append(float(value))
        except ValueError:
            continue
    return tuple(results)


def problem_from_record(
    row: dict, *, source: str, split: str, index: int, question_field: str = "question", answer_field: str = "answer"
) -> Problem:
    """Build a :class:`Problem` from one GSM8K-format record (raises :class:`DataError` naming the field)."""
    for needed in (question_field, answer_field):
        if needed not in row:
            raise DataError(f"{source}: record {index} has no field {needed!r} (fields: {sorted(row)})")
    solution = str(row[answer_field])
    try:
        gold = parse_gold_answer(solution)
    except ValueError as exc:
        raise DataError(f"{source}: record {index}: {exc}") from exc
    return Problem(
        id=str(row["id"]) if row.get("id") is not None else f"{source}:{split}:{index}",
        question=row[question_field],
        solution=solution,
        gold=gold,
        n_steps=count_steps(solution),
        source=source,
        split=split,
        index=index,
        intermediates=span_results(solution),
    )


def records_from_jsonl(text: str, name: str) -> list[dict]:
    """One JSON object per non-empty line (raises :class:`DataError` naming ``name`` and the line)."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{line_no}: not valid JSON ({exc.msg})") from exc
    return rows


def _records_from_hub(name: str, split: str) -> list[dict]:
    """Rows of a hub dataset (needs the optional ``datasets`` package and network or a local HF cache)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise DataError(
            f"{name!r} is neither a local file nor a shipped dataset ({', '.join(SHIPPED_DATASETS)}); "
            "loading a hub dataset needs the optional extra: pip install 'codi-lens[hub]'"
        ) from exc
    config = "main" if name in ("gsm8k", "openai/gsm8k") else None
    return [dict(r) for r in load_dataset(name, config, split=split)]


def shipped_dataset_text(name: str) -> str:
    """The text of a dataset shipped inside the package (see ``SHIPPED_DATASETS``)."""
    folder, file = SHIPPED_DATASETS[name]
    return resources.files("codi_lens").joinpath(folder, file).read_text()


def generated_split(name: str) -> list[Problem]:
    """A split of a shipped model's synthetic data (``GENERATED_DATASETS``), regenerated with the
    generator arguments its ``training.json`` recorded; ids are ``"{dataset}:{split}:{index}"``."""
    from codi_lens.synthetic import make_splits  # the generator imports this module

    model, split = GENERATED_DATASETS[name]
    data = json.loads((PRETRAINED[model] / "training.json").read_text())["data"]
    return make_splits(**data, name=name.split(":")[0])[split]


def load_problems(
    source: str | Path,
    *,
    split: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Problem]:
    """Load GSM8K-format problems.

    Args:
        source: a shipped dataset name (``"gsm8k:test"``, ``"gsm8k:train"``, ``"toy:test"``, ``"toy:train"``,
            ``"toy:validation"``, and the same three for ``"toy-chain"``), a local
            ``.jsonl`` path (one ``{"question", "answer"}`` object per line) or a hub dataset name such
            as ``"openai/gsm8k"`` (then ``split`` is required).
        split: recorded as provenance; defaults to the shipped name's split or the file's stem.
        question_field, answer_field: field names in each record.
        limit: keep only the first ``limit`` problems (file order, so runs are comparable).

    Raises:
        FileNotFoundError: a path that looks like a file or folder does not exist.
        DataError: a record is not valid JSON, lacks a field or has no ``#### N`` answer line.
    """
    name = str(source)
    path = Path(source)
    if name in GENERATED_DATASETS:
        problems = generated_split(name)
        return problems[:limit] if limit is not None else problems
    if name in SHIPPED_DATASETS:
        text = shipped_dataset_text(name)
        source_name, split = name.split(":")[0], split or name.split(":")[1]
        rows = records_from_jsonl(text, name)
    elif path.is_file():
        text = path.read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        source_name, split = f"{path.stem}-{digest}", split or path.stem
        rows = records_from_jsonl(text, str(path))
    elif path.suffix == ".jsonl" or path.is_dir():
        raise FileNotFoundError(f"no JSONL file at {name!r}")
    else:
        if split is None:
            raise DataError(f"split is required to load hub dataset {name!r}")
        rows, source_name = _records_from_hub(name, split), name
    rows = rows[:limit] if limit is not None else rows
    return [
        problem_from_record(
            row, source=source_name, split=split, index=i, question_field=question_field, answer_field=answer_field
        )
        for i, row in enumerate(rows)
    ]


def problems_fingerprint(problems: list[Problem]) -> str:
    """A digest of the problems' ids, questions and gold answers (recorded in ``run.json``)."""
    digest = hashlib.sha256()
    for p in problems:
        digest.update(f"{p.id}\t{p.question}\t{p.gold}\n".encode())
    return digest.hexdigest()


def problems_frame(problems: list[Problem]) -> pd.DataFrame:
    """The problems as a tidy DataFrame, one row per problem."""
    return pd.DataFrame([asdict(p) for p in problems])


#: Difficulty buckets by number of calculator spans, as past CODI work grouped GSM8K.
DIFFICULTY_BUCKETS = ("<=2", "3", "4", "5+")


def difficulty_bucket(n_steps: int) -> str:
    """``"<=2"``, ``"3"``, ``"4"`` or ``"5+"``."""
    if n_steps <= 2:
        return "<=2"
    return "5+" if n_steps >= 5 else str(n_steps)


def stratified_sample(problems: list[Problem], n_per_bucket: int, *, seed: int) -> list[Problem]:
    """Up to ``n_per_bucket`` problems from each difficulty bucket, drawn with ``random.Random(seed)``,
    returned in their original order (a bucket with fewer problems gives all of them)."""
    rng = random.Random(seed)
    chosen: set[int] = set()
    for bucket in DIFFICULTY_BUCKETS:
        members = [i for i, p in enumerate(problems) if difficulty_bucket(p.n_steps) == bucket]
        chosen.update(rng.sample(members, min(n_per_bucket, len(members))))
    return [p for i, p in enumerate(problems) if i in chosen]
