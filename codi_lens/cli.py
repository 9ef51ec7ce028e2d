"""Command-line plumbing shared by ``codi_lens.evaluate`` and every ``python -m experiments.<name>``.

One set of flags (``add_common_args``, parsed by ``parse_common_args``), one way to load the model
they name (``load_model``), and one way to fail (``run_main``): a bad flag, a missing file or a
checkpoint that does not load stops with a single ``error: ...`` line on stderr and exit status 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from codi_lens.activations import ActivationError
from codi_lens.architectures import BaseModelError
from codi_lens.checkpoint import CheckpointError
from codi_lens.data import DataError, default_data
from codi_lens.distributed import DistributedError, Executor, make_executor
from codi_lens.hooks import PositionError
from codi_lens.loading import DEFAULT_MODEL, load_codi
from codi_lens.model import CODIModel
from codi_lens.runner import SettingsMismatchError

#: Errors that mean "the input was wrong", reported in one line without a traceback.
USER_ERRORS = (
    ActivationError,
    BaseModelError,
    CheckpointError,
    DataError,
    DistributedError,
    SettingsMismatchError,
    PositionError,
    FileNotFoundError,
    KeyError,
)


def add_common_args(parser: argparse.ArgumentParser, *, out: str, batch_size: int = 64) -> None:
    """The flags every command shares (see ``shared/docs/experiment-conventions.md``); parse them with
    :func:`parse_common_args`."""
    parser.add_argument(
        "--checkpoint", default=DEFAULT_MODEL, help=f"checkpoint dir/file or shipped model name ({DEFAULT_MODEL})"
    )
    parser.add_argument("--base", default=None, help="base model dir or built-in name (not needed for a shipped model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (needed with a built-in base)")
    parser.add_argument(
        "--data",
        default=None,
        help="gsm8k:test, gsm8k:train, toy-chain:test, toy:test, ..., a local GSM8K-format .jsonl, or a hub name "
        "(default: a shipped model's own test split, gsm8k:test for any other checkpoint)",
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def parse_common_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with ``--data`` defaulting to the checkpoint's own test split
    (:func:`codi_lens.data.default_data`), so ``--checkpoint toy-arith`` alone runs on ``toy:test``."""
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = default_data(args.checkpoint)
    return args


def parse_choices(flag: str, text: str, allowed) -> list[str]:
    """A comma-separated flag value as a list, each item one of ``allowed`` (a ``KeyError`` naming the
    flag and the first unknown item otherwise)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise KeyError(f"{flag}: unknown {unknown[0] if unknown else '(empty)'!r}; choose from {', '.join(allowed)}")
    return items


def load_model(args: argparse.Namespace) -> CODIModel:
    """The model the common flags name."""
    return load_codi(
        args.checkpoint,
        args.base,
        tokenizer=args.tokenizer,
        lora_alpha=args.lora_alpha,
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )


def executor_from_args(args: argparse.Namespace) -> Executor:
    """Where the units of work run: here, or on the Ray cluster ``--ray`` names (GPUs requested per
    task when ``--device`` is CUDA)."""
    return make_executor(args.ray, device=args.device, cpus_per_task=args.ray_cpus)


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


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Call ``main(argv)``; user errors become one ``error:`` line on stderr and exit status 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(args)
    except USER_ERRORS as exc:
        if "--debug" in args:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
