"""Summarise a CODI checkpoint file without a base model.

    python -m experiments.inspect_checkpoint PATH [--json]

Prints the architecture family, layer count, vocabulary (and the implied base vocabulary), LoRA
use and rank, projection-head dims and LayerNorm, dtypes with tensor counts, and the key count.
"""

from __future__ import annotations

import argparse
import json

from codi_lens.loading.inspect import format_summary, summarize_checkpoint
from codi_lens.loading.registry import SHIPPED_MODELS
from codi_lens.run.cli import run_main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help=f"checkpoint directory or file, or a shipped model name ({SHIPPED_MODELS.help()})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    summary = summarize_checkpoint(args.path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return summary


if __name__ == "__main__":
    run_main(main)
