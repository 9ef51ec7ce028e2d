"""Command-line plumbing shared by every ``python -m experiments.<name>``.

One set of flags (:func:`command_parser` / :func:`add_common_args`, parsed by :func:`parse_common_args`),
one way to start a command's run from them (:func:`start_run`: the model, the problems, where work runs,
the settings that change a result), and one way to fail (:func:`run_main`): a bad flag, a missing file or
a checkpoint that does not load stops with a single ``error: ...`` line on stderr and exit status 2;
``--debug`` shows the traceback. The conventions every command follows are in ``docs/conventions.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from codi_lens.core.answers import ANSWER_METRICS, DEFAULT_ANSWER_METRIC
from codi_lens.core.errors import CodiLensError, FlagError
from codi_lens.core.model import CODIModel
from codi_lens.core.names import parse_act_name
from codi_lens.core.sites import Site
from codi_lens.data.pairs import make_pairs, read_pair_table
from codi_lens.data.problems import DataError, Problem, stratified_sample
from codi_lens.data.sources import load_problems
from codi_lens.data.synthetic import value_limit
from codi_lens.loading import DEFAULT_MODEL, check_codi, default_data, load_codi
from codi_lens.loading.architectures import BaseArchitecture
from codi_lens.run.executors import Executor, FirstBatchOnly, PlanShown, make_executor
from codi_lens.run.outcome import counts_text, stop_if_nothing_measured
from codi_lens.run.store import ResultStore

#: Errors that mean "the input was wrong", reported in one line without a traceback: the project's own
#: (every user-facing error subclasses :class:`~codi_lens.core.errors.CodiLensError`). Anything else is a
#: bug and keeps its traceback.
USER_ERRORS = (CodiLensError,)


def add_common_args(parser: argparse.ArgumentParser, *, out: str, batch_size: int = 64) -> None:
    """The flags every command shares (see ``docs/conventions.md``); parse them with :func:`parse_common_args`."""
    parser.add_argument(
        "--checkpoint", default=DEFAULT_MODEL, help=f"checkpoint dir/file or shipped model name ({DEFAULT_MODEL})"
    )
    parser.add_argument("--base", default=None, help="base model dir or built-in name (not needed for a shipped model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (needed with a built-in base)")
    parser.add_argument(
        "--data",
        default=None,
        help="gsm8k:test, gsm8k:train, toy-chain:test, toy:test, ..., template:cywinski, a local GSM8K-format "
        ".jsonl, or a hub name (default: a shipped model's own test split, gsm8k:test for any other checkpoint)",
    )
    parser.add_argument("--split", default=None, help="split name (required for a hub dataset)")
    parser.add_argument("--limit", type=int, default=None, help="the first N records in file order")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="problems per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer-token budget (upstream: 256)")
    parser.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha of the checkpoint (CODI: 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--ray",
        default=None,
        metavar="local|ADDRESS",
        help="run the units of work as Ray tasks: 'local' starts a cluster on this machine, an address joins "
        "one (extra codi-lens[ray]); results are the same as a local run's and resumable either way",
    )
    parser.add_argument("--ray-cpus", type=float, default=1, help="CPUs each Ray task requests (default 1)")
    parser.add_argument("--out", default=out, help=f"output folder (default {out})")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, compute the first batch (kept: the full run continues from it), print the "
        "time it took and the estimate for the rest, and stop",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def command_parser(doc: str | None, *, out: str, batch_size: int = 64, **defaults: Any) -> argparse.ArgumentParser:
    """A command's parser: its docstring as the description, the common flags (``--out`` defaulting to
    ``out``), and ``defaults`` for any flag (``limit=300``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out=out, batch_size=batch_size)
    parser.set_defaults(**defaults)
    return parser


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    """``--stratified N`` (a seeded sample per difficulty bucket) and ``--seed``."""
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, shuffles and samples")
    parser.add_argument(
        "--stratified", type=int, default=None, help="N problems per difficulty bucket (<=2, 3, 4, 5+), seeded"
    )


def add_pair_args(parser: argparse.ArgumentParser) -> None:
    """``--pairs FILE`` (else pairs are made from ``--data``), ``--n-latents``, ``--metric`` and
    ``--answer-from``; patching's defaults."""
    parser.add_argument(
        "--pairs",
        default=None,
        help="a pairs.parquet from experiments.make_pairs, its first --limit rows (else made from --data)",
    )
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.add_argument(
        "--metric",
        choices=ANSWER_METRICS.names(),
        default=DEFAULT_ANSWER_METRIC,
        help="how the clean and corrupted answer numbers are compared: " + ANSWER_METRICS.help(),
    )
    parser.add_argument(
        "--answer-from",
        choices=["model", "gold"],
        default="model",
        help="teacher-force the clean run's own answer (model; pairs it answers wrong are skipped) or the gold "
        "answer (gold: for checkpoints that do not answer right, such as random weights in a rehearsal)",
    )
    parser.set_defaults(limit=100, batch_size=16)


def parse_common_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with ``--data`` defaulting to the checkpoint's own test split
    (:func:`codi_lens.loading.default_data`), so ``--checkpoint toy-arith`` alone runs on ``toy:test``."""
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = default_data(args.checkpoint)
    given = sys.argv[1:] if argv is None else argv
    if getattr(args, "stratified", None) and any(a == "--limit" or a.startswith("--limit=") for a in given):
        raise FlagError(
            "give --limit (the first N records) or --stratified (N per bucket of the whole split), not both"
        )
    check_common_args(args)
    return args


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse, naming the flag, every shared flag whose value cannot work: checked before any model loads
    or any activation is collected (see :func:`parse_common_args`)."""
    for flag, minimum in (("limit", 1), ("batch_size", 1), ("max_new_tokens", 1), ("stratified", 1), ("n_latents", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            raise FlagError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    for flag in ("lora_alpha", "ray_cpus"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise FlagError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "out", None) is not None:
        check_out(args.out)


def check_device(device: str) -> None:
    """``--device``: a device name torch knows, present on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise FlagError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise FlagError(f"--device {device}: this machine has no CUDA device (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise FlagError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise FlagError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise FlagError(f"--device {device}: codi_lens runs on cpu, cuda or mps")


def check_out(out: str | Path) -> None:
    """``--out``: a folder, or a path that can become one (no file in the way)."""
    for path in (Path(out), *Path(out).parents):
        if path.exists() and not path.is_dir():
            raise FlagError(f"--out {out}: {path} is a file, not a folder")


def load_model(args: argparse.Namespace, progress: bool = False) -> CODIModel:
    """The model the common flags name (``progress``: a bar while its weights are copied in)."""
    return load_codi(
        args.checkpoint,
        args.base,
        tokenizer=args.tokenizer,
        lora_alpha=args.lora_alpha,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        progress=progress,
    )


def executor_from_args(args: argparse.Namespace) -> Executor:
    """Where the units of work run: here, or on the Ray cluster ``--ray`` names (GPUs requested per
    task when ``--device`` is CUDA)."""
    executor = make_executor(args.ray, device=args.device, cpus_per_task=args.ray_cpus)
    return FirstBatchOnly(executor) if getattr(args, "dry_run", False) else executor


def model_settings(model: CODIModel, args: argparse.Namespace) -> dict[str, Any]:
    """Result-changing settings of the model: its content hash, base, precision and device kind."""
    return {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": model.checkpoint_sha256,
        "base": None if args.base is None else str(args.base),
        "lora_alpha": args.lora_alpha,
        "dtype": args.dtype,
        "device": str(args.device).split(":")[0],
    }


@dataclass
class CommandRun:
    """A command once its flags are parsed: its problems, its model, where its work runs, and when it started.

    The model loads on first use of :attr:`model`, so a command reads and checks its data (:meth:`problems`,
    :meth:`pairs`) and every other input before paying for the weights.

    Attributes:
        args: the parsed flags.
        executor: where units of work run (here, or on the Ray cluster ``--ray`` names).
    """

    args: argparse.Namespace
    executor: Executor
    started: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @cached_property
    def model(self) -> CODIModel:
        """The model ``--checkpoint`` names, loaded as the flags say (on first use), saying so on stderr (a
        real checkpoint takes a minute on a CPU)."""
        started = time.perf_counter()
        _say(f"loading {self.args.checkpoint} ({self.architecture.family}, {self.args.dtype}, {self.args.device})")
        model = load_model(self.args, progress=True)
        _say(f"loaded in {time.perf_counter() - started:.1f} s")
        return model

    @cached_property
    def architecture(self) -> BaseArchitecture:
        """The checkpoint's base architecture (layers, heads, widths), read and checked against the checkpoint
        file's header without loading a weight (see :func:`~codi_lens.loading.check_codi`)."""
        return check_codi(self.args.checkpoint, self.args.base)

    def check_sites(self, sites: list[Site], flag: str) -> None:
        """Refuse, naming ``flag``, a site on a block the checkpoint does not have (needs no weights)."""
        n_layers = self.architecture.n_layers
        for site in sites:
            parsed = parse_act_name(site.hook)
            if parsed is not None and not 0 <= parsed[0] < n_layers:
                raise FlagError(f"{flag}: {site.id} names layer {parsed[0]}; this model has layers 0..{n_layers - 1}")

    def problems(self) -> list[Problem]:
        """The problems ``--data`` / ``--split`` / ``--limit`` name; with ``--stratified N``, a seeded sample of
        ``N`` per difficulty bucket of the whole split (see :func:`~codi_lens.data.problems.stratified_sample`).
        Refuses data with no problems, naming ``--data``."""
        return self._problems

    @cached_property
    def _problems(self) -> list[Problem]:
        stratified = getattr(self.args, "stratified", None)
        limit = None if stratified else self.args.limit
        problems = load_problems(self.args.data, split=self.args.split, limit=limit)
        if not problems:
            raise DataError(f"--data {self.args.data}: no problems to run on (the source holds no records)")
        if stratified:
            problems = stratified_sample(problems, stratified, seed=self.args.seed, report=_say)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "selected_problems.json").write_text(json.dumps([p.id for p in problems], indent=0))
        return problems

    def pairs(self) -> pd.DataFrame:
        """The clean/corrupted pairs of ``--pairs`` (a table from ``experiments.make_pairs``; its first ``--limit``
        rows), or made from the problems (one number changed, the answer recomputed; values within the toy models'
        range for toy data). Refuses an empty pair set, naming the flag and, for made pairs, why each problem gave
        none."""
        if getattr(self.args, "pairs", None):
            pairs = read_pair_table(self.args.pairs)
            if pairs.empty:
                raise DataError(f"--pairs {self.args.pairs}: the file holds no pairs")
            return pairs if self.args.limit is None else pairs.head(self.args.limit).reset_index(drop=True)
        problems = self.problems()
        pairs, rejections = make_pairs(problems, max_value=value_limit(problems))
        if pairs.empty:
            reasons = rejections.drop_duplicates("problem_id")["reason"].value_counts().to_dict()
            raise DataError(
                f"--data {self.args.data}: none of {len(problems)} problems gives a clean/corrupted pair "
                f"({counts_text(reasons)})"
            )
        return pairs

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The settings that change a result (the model's, the data and its limit), with ``extra``."""
        selection = {}
        if getattr(self.args, "stratified", None):
            selection = {"limit": None, "selected_problem_ids": [p.id for p in self.problems()]}
        return {
            **model_settings(self.model, self.args),
            "data_source": self.args.data,
            "limit": self.args.limit,
            **selection,
            **extra,
        }

    def elapsed(self) -> float:
        """Seconds since the command started (this invocation)."""
        return round(time.perf_counter() - self.started, 1)

    def pair_options(self) -> dict[str, Any]:
        """What every per-pair sweep takes from the common pair flags (:func:`add_pair_args`)."""
        args = self.args
        return {
            "n_latents": args.n_latents,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "metric": args.metric,
            "answer_from": args.answer_from,
            "settings": self.settings(pairs_file=args.pairs),
            "overwrite": args.overwrite,
            "executor": self.executor,
        }

    def finish_pairs(
        self,
        rows: pd.DataFrame,
        store: ResultStore,
        pairs: pd.DataFrame,
        write: Callable[[pd.DataFrame], dict[str, Any]],
        lines: Callable[[dict[str, Any]], str],
    ) -> dict[str, Any]:
        """The end of a per-pair command: stop (counts written) if no pair was measured; else write
        ``pairs.parquet`` and the report (``write(rows)`` returns the summary), finish the store with the summary
        and this invocation's wall time, print ``lines(summary)`` and return the summary."""
        stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs")
        pairs.to_parquet(self.out / "pairs.parquet", index=False)
        summary = write(rows)
        summary["wall_seconds_this_invocation"] = self.elapsed()
        store.finish(rows, summary)
        print(lines(summary))
        return summary


def start_run(args: argparse.Namespace) -> CommandRun:
    """Pick where work runs; the model the flags name loads on first use of ``run.model`` (the clock starts
    here, before loading)."""
    started = time.perf_counter()
    run = CommandRun(args, executor_from_args(args), started)
    _ = run.architecture  # a missing or mismatched checkpoint is named before anything else is read
    return run


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Call ``main(argv)``; user errors become one ``error:`` line on stderr and exit status 2; a ``--dry-run``
    that showed its plan and first batch ends here with exit status 0."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(args)
    except PlanShown:
        print(
            "dry run: stopped after the first batch, which is kept; rerun without --dry-run to go on", file=sys.stderr
        )
        return None
    except USER_ERRORS as exc:
        if "--debug" in args:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
