"""Every experiment on a random checkpoint in a real CODI layout, run as a user runs it, in a table.

    python -m benchmarks.real_scale_experiments [--family llama|gpt2] [--quick] [--workdir DIR]
        [--only NAME,...] [--timeout SECONDS] [--read-limit N] [--preload]

Writes a random-weight checkpoint once (``--family llama``: the 377-key CODI-LLaMA-3.2-1B layout with the
real 128,259-row vocabulary and the Llama 3 tokenizer of the ``llama`` extra; ``gpt2``: the 251-key CODI-GPT-2
layout with a stand-in tokenizer trained here on the shipped GSM8K text, whose ids fall below GPT-2's 50,257),
then runs each ``python -m experiments.<name>`` in its own process at a small ``--limit``, as a user with that
checkpoint would (``--checkpoint DIR --base ... --data gsm8k:test --max-new-tokens 16``). Random weights answer
nothing right, so patching teacher-forces the gold answers (``--answer-from gold``). ``--quick``: the same
layout at 4 layers and width 256 (the vocabulary stays real), for the test suite.

Prints one JSON line per experiment (``experiment, exit_status, wall_s, peak_rss_gb, rows, first_bar_s,
max_bar_gap_s, still_at, last_line``: ``max_bar_gap_s`` is the longest time the experiment's progress bar stood
still once it appeared, ``still_at`` what the bar showed then) and a table at the end; each child's stderr goes to
``<experiment>.log``, every write prefixed by the second it arrived. ``train_toy_codi`` and ``toy_model_report``
are for the shipped toy models and are not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from safetensors.torch import save_file

from benchmarks.common import PeakSampler, exit_status, machine_gb, preload, random_checkpoint_tensors
from codi_lens.data import load_problems
from codi_lens.loading.architectures import BUILTIN_BASES, architecture_from_config, describe_base
from codi_lens.loading.checkpoint import CheckpointLayout

#: The built-in base of each family, its LoRA rank and the width of the quick variant's heads.
FAMILIES = {
    "llama": {"base": "llama-3.2-1b-instruct", "lora_rank": 128},
    "gpt2": {"base": "gpt2", "lora_rank": 128},
}
#: The experiment module of a rehearsal entry that runs a module with other flags.
MODULE_OF = {"position_patching_attribution": "position_patching", "feature_pathways_targets": "feature_pathways"}
NOT_RUN = {"train_toy_codi": "trains the shipped toy models", "toy_model_report": "reports on a shipped toy model"}


def quick_config(family: str) -> dict:
    """The family's base config at 4 layers and width 256, its vocabulary unchanged."""
    config = dict(BUILTIN_BASES[FAMILIES[family]["base"]])
    if family == "llama":
        config.update(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, head_dim=8)
    else:
        config.update(n_layer=4, n_embd=256, n_head=8)
    return config


def stand_in_tokenizer(folder: Path, vocab_size: int = 2000):
    """A byte-level BPE trained on the shipped GSM8K questions and answers (ids below ``vocab_size``), saved in
    ``folder``: where a base's own tokenizer files are not at hand, any tokenizer whose ids fit its vocabulary
    serves random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for p in load_problems("gsm8k:train") for t in (p.question, p.solution)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def write_checkpoint(folder: Path, family: str, quick: bool, seed: int = 0) -> tuple[str, str | None]:
    """Random tensors for every key of the family's CODI layout (``benchmarks.common.random_checkpoint_tensors``),
    in ``folder/checkpoint``; returns the ``--base`` and ``--tokenizer`` to load it with."""
    spec = FAMILIES[family]
    base: str = spec["base"]
    tokenizer: str | None = None
    if quick or family == "gpt2":
        base_dir = folder / "base"
        base_dir.mkdir(parents=True, exist_ok=True)
        config = quick_config(family) if quick else dict(BUILTIN_BASES[base])
        (base_dir / "config.json").write_text(json.dumps(config))
        if family == "llama":
            from codi_lens.loading.llama_tokenizer import llama3_tokenizer

            llama3_tokenizer().save_pretrained(base_dir)
        else:
            stand_in_tokenizer(base_dir)
        base = str(base_dir) if quick else base
        tokenizer = None if quick else str(base_dir)
    arch = architecture_from_config(quick_config(family), "quick") if quick else describe_base(base)
    layout = CheckpointLayout(
        family=family,
        uses_lora=True,
        lora_rank=spec["lora_rank"],
        prj_dim=arch.d_model,
        prj_layernorm=True,
        n_layers=arch.n_layers,
        vocab=arch.codi_vocab,
    )
    tensors = random_checkpoint_tensors(arch, layout, seed)
    (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "checkpoint" / "model.safetensors"))
    return base, tokenizer


def _write_checkpoint_apart(folder: Path, family: str, quick: bool) -> tuple[str, str | None]:
    """:func:`write_checkpoint` in a child process, so that this one computes nothing with torch and can fork
    (``benchmarks.common.preload``)."""
    done = subprocess.run(
        [sys.executable, "-c", WRITE_CHECKPOINT, str(folder), family, str(quick)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"writing the checkpoint failed:\n{done.stderr}")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


WRITE_CHECKPOINT = (
    "import json, sys; from pathlib import Path; from benchmarks.real_scale_experiments import write_checkpoint; "
    "print(json.dumps(write_checkpoint(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == 'True')))"
)


def commands(
    folder: Path, base: str, tokenizer: str | None, quick: bool, read_limit: int | None = None
) -> dict[str, list[str]]:
    """The flags of each experiment, as a user with this checkpoint would run it at a small limit
    (``read_limit``: read_thoughts' ``--limit``, default 16, 8 with ``quick``)."""
    read_limit = read_limit or (8 if quick else 16)
    model = ["--checkpoint", str(folder / "checkpoint"), "--base", base, "--max-new-tokens", "16"]
    model += ["--tokenizer", tokenizer] if tokenizer else []
    data = [*model, "--data", "gsm8k:test"]
    out = folder / "results"
    pairs = ["--pairs", str(out / "make_pairs" / "pairs.parquet"), "--answer-from", "gold", "--limit", "4"]
    saes = ["--saes", str(out / "train_saes")]
    sae_sites = "thought.2.hook_hidden,thought.4.hook_hidden"
    return {
        "inspect_checkpoint": [str(folder / "checkpoint")],
        "evaluate": [*data, "--limit", "4", "--batch-size", "4"],
        "make_pairs": ["--data", "gsm8k:test", "--limit", "40"],
        "step_importance": [*data, "--limit", "2", "--interventions", "zero,mean,swap", "--scopes", "single,all"],
        "ablation_attention": [*data, "--limit", "2"],
        "position_patching": [*data, *pairs, "--hooks", "resid_post,thought_input", "--batch-size", "4"],
        "position_patching_attribution": [*data, *pairs, "--method", "attribution", "--batch-size", "4"],
        "iterative_patching": [*data, *pairs, "--layers", "0"],
        "route_patching": [*data, *pairs, "--spans", "bot,3,6"],
        "logit_attribution": [*data, *pairs],
        "path_patching": [*data, *pairs, "--groups", "thought_to_heads,recurrence"],
        "read_thoughts": [*data, "--limit", str(read_limit), "--tuned-lens-steps", "2", "--batch-size", "8"],
        "train_saes": [
            *data,
            "--limit",
            "4",
            "--train-data",
            "gsm8k:train",
            "--train-limit",
            "32",
            "--sae-batch-size",
            "16",
            "--training-samples",
            "64",
            "--splice-limit",
            "2",
            "--d-sae",
            "64",
            "--k",
            "4",
            "--sites",
            sae_sites,
        ],  # fmt: skip
        "sae_features": [*data, *saes, "--limit", "4", "--intervene", "1", "--top-features", "2"],
        "feature_pathways": [*data, *saes, "--limit", "4", "--candidates", "2"],
        "feature_screen": [
            *data,
            *saes,
            "--limit",
            "4",
            "--top-frequent",
            "4",
            "--block-size",
            "2",
            "--min-problems",
            "2",
        ],
        "feature_pathways_targets": [
            *data,
            *saes,
            "--limit",
            "4",
            "--targets",
            "strongest:2",
            "--screen",
            str(out / "feature_screen"),
            "--candidates",
            "2",
        ],  # fmt: skip
        "report": [
            *data,
            "--limit",
            "4",
            "--problems",
            "8",
            "--parts",
            "accuracy,attention,patching",
        ],
        "feature_report": [
            "--screen",
            str(out / "feature_screen"),
            "--pathways",
            str(out / "feature_pathways_targets"),
            "--features",
            str(out / "sae_features"),
            *saes,
        ],  # fmt: skip
    }


def run_one(name: str, argv: list[str], out: Path, timeout: float, preloaded: bool = False) -> dict:
    """One experiment in its own process: exit status, wall time, its peak resident memory, rows written, and
    the longest silence on its stderr once its first progress bar appeared (``max_bar_gap_s``: how long a user
    watched a bar that did not move). ``preloaded``: the process is forked from this one, which has imported
    the libraries (``benchmarks.common.preload``), instead of a fresh interpreter; its times then leave out the
    imports."""
    module = MODULE_OF.get(name, name)
    peak_file = out.with_suffix(".peak")
    shutil.rmtree(out, ignore_errors=True)  # a rehearsal measures a fresh run, not a resumed one
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = argv if name == "inspect_checkpoint" else [*argv, "--out", str(out)]
    started = time.perf_counter()
    pid, stdout_fd, stderr_fd = _start(module, str(peak_file), flags, preloaded)
    stderr_writes: list[tuple[float, bytes]] = []
    readers = [
        threading.Thread(target=_read, args=(stdout_fd, stdout := [])),
        threading.Thread(target=_read, args=(stderr_fd, stderr_writes)),
    ]
    for reader in readers:
        reader.start()
    status = _wait(pid, timeout)
    for reader in readers:
        reader.join()
    os.close(stdout_fd)
    os.close(stderr_fd)
    ended = time.perf_counter()
    err = b"".join(chunk for _, chunk in stderr_writes).decode(errors="replace")
    out_text = b"".join(chunk for _, chunk in stdout).decode(errors="replace")
    lines = (err if status else out_text or err).replace("\r", "\n").strip().splitlines()
    bars = [(t, chunk) for t, chunk in stderr_writes if b"|" in chunk]
    bar_times = [t for t, _ in bars]
    gaps = [b - a for a, b in zip(bar_times, [*bar_times[1:], ended])] if bar_times else []
    still_at = _last_bar(bars[gaps.index(max(gaps))][1]) if gaps else ""
    out.with_suffix(".log").write_text(
        "".join(f"{t - started:9.1f}s {chunk.decode(errors='replace')}\n" for t, chunk in stderr_writes)
    )
    written = [out / name for name in ("results.parquet", "pairs.parquet") if (out / name).exists()]
    return {
        "experiment": name,
        "exit_status": status,
        "wall_s": round(ended - started, 1),
        "peak_rss_gb": round(float(peak_file.read_text()), 2) if peak_file.exists() else None,
        "rows": pq.read_metadata(written[0]).num_rows if written else None,
        "first_bar_s": round(bar_times[0] - started, 1) if bar_times else None,
        "max_bar_gap_s": round(max(gaps), 1) if gaps else None,
        "still_at": still_at,
        "last_line": lines[-1][-200:] if lines else "",
    }


def _last_bar(chunk: bytes) -> str:
    """The last progress-bar line in ``chunk``: what the bar showed while it stood still."""
    shown = [line for line in chunk.decode(errors="replace").replace("\r", "\n").splitlines() if "|" in line]
    return shown[-1].strip()[:120] if shown else ""


def _read(fd: int, chunks: list) -> None:
    """Everything a child writes to the pipe ``fd``, as ``(arrival time, bytes)``."""
    while chunk := os.read(fd, 65536):
        chunks.append((time.perf_counter(), chunk))


def _start(module: str, peak_file: str, flags: list[str], preloaded: bool) -> tuple[int, int, int]:
    """Start the child running ``experiments.<module>``: a fresh interpreter, or a fork of this process when
    ``preloaded``. Returns its pid and the read ends of its stdout and stderr pipes."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    if preloaded:
        pid = os.fork()
        if pid == 0:
            os.close(out_read)
            os.close(err_read)
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            os._exit(exit_status(lambda: child(module, peak_file, flags)))
    else:
        command = [sys.executable, "-m", "benchmarks.real_scale_experiments", "--child", module, peak_file, *flags]
        pid = subprocess.Popen(command, stdout=out_write, stderr=err_write).pid
    os.close(out_write)
    os.close(err_write)
    return pid, out_read, err_read


def _wait(pid: int, timeout: float) -> int | str:
    """The child's exit status, or ``"timeout"`` (the child killed) after ``timeout`` seconds."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def child(module: str, peak_file: str, argv: list[str]) -> None:
    """Run ``experiments.<module>`` as ``python -m`` does; write this process's peak resident memory (GB),
    sampled from ``/proc`` (``ru_maxrss`` would count the parent's memory at the fork)."""
    from codi_lens.run.cli import run_main

    main = importlib.import_module(f"experiments.{module}").main
    sampler = PeakSampler(limit_gb=machine_gb())
    sampler.start()
    try:
        run_main(main, argv)
    finally:
        Path(peak_file).write_text(str(sampler.stop()))


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    keys = ["experiment", "exit_status", "wall_s", "peak_rss_gb", "rows", "first_bar_s", "max_bar_gap_s", "last_line"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")).replace("|", "/") for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], argv[3:])
        return []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--quick", action="store_true", help="4 layers, width 256, the real vocabulary")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and results go (default: a temp dir)")
    parser.add_argument("--only", default=None, help="comma-separated experiments (default: all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds an experiment may run")
    parser.add_argument(
        "--read-limit", type=int, default=None, help="read_thoughts' --limit (default 16; 8 with --quick)"
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        help="fork each experiment from this process once it has imported the libraries, not a fresh "
        "interpreter (saves about 6 s each; times then leave out the imports)",
    )
    args = parser.parse_args(argv)
    folder = Path(args.workdir or tempfile.mkdtemp(prefix=f"codi_rehearsal_{args.family}_"))
    started = time.perf_counter()
    base, tokenizer = _write_checkpoint_apart(folder, args.family, args.quick)
    if args.preload:
        preload()
    print(json.dumps({"checkpoint": str(folder / "checkpoint"), "written_s": round(time.perf_counter() - started, 1)}))
    planned = commands(folder, base, tokenizer, args.quick, args.read_limit)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(planned)
    rows = []
    for name in chosen:
        row = run_one(name, planned[name], folder / "results" / name, args.timeout, args.preload)
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows += [{"experiment": n, "exit_status": "not run", "last_line": why} for n, why in NOT_RUN.items()]
    print(table(rows))
    print(json.dumps({"machine_cores": os.cpu_count(), "total_s": round(time.perf_counter() - started, 1)}))
    return rows


if __name__ == "__main__":
    main()
