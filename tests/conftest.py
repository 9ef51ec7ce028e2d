"""Shared fixtures: tiny CODI checkpoints in the upstream layout and the HF + peft reference."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hf_reference import ReferenceCODI
from preloaded import PreloadedPython
from upstream_factory import make_tiny_codi

from codi_lens import load_codi
from codi_lens.data import shipped_dataset_text
from codi_lens.loading import PRETRAINED

# 2 threads on the 2-core machines; CODI_LENS_TEST_THREADS=1 when several test processes share them (mutmut).
torch.set_num_threads(int(os.environ.get("CODI_LENS_TEST_THREADS", "2")))


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI`` set to anything but empty, 0 or false; ``.ci/run`` sets it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def skip_unless_ci(reason: str) -> None:
    """Skip the calling test (or module) for ``reason``; in CI, fail instead: there a missing optional
    dependency or program is a broken install, and a skip would hide the feature it tests."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: nothing may be skipped)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, reason: str):
    """``import module``, or :func:`skip_unless_ci` with ``reason`` when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_unless_ci(reason)


@pytest.fixture(scope="session")
def preloaded():
    """Runs ``python -m ...`` and ``python -c ...`` commands in processes that start with codi_lens imported
    (``tests/preloaded.py``)."""
    with PreloadedPython() as server:
        yield server


TINY_LORA_R = 8
TINY_PRJ_DIM = 96


@dataclass(frozen=True)
class TinyCheckpoint:
    family: str
    fmt: str
    use_lora: bool
    prj_ln: bool
    checkpoint_dir: Path
    base_dir: Path

    @property
    def file(self) -> Path:
        name = "model.safetensors" if self.fmt == "safetensors" else "pytorch_model.bin"
        return self.checkpoint_dir / name

    def reference(self) -> ReferenceCODI:
        return ReferenceCODI.from_checkpoint(
            self.checkpoint_dir,
            self.base_dir,
            lora_r=TINY_LORA_R,
            use_lora=self.use_lora,
            prj_dim=TINY_PRJ_DIM,
            prj_ln=self.prj_ln,
            dtype=torch.float32,
        )


_BUILT: dict[tuple, TinyCheckpoint] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory fixture: ``tiny_checkpoint(family, fmt=..., use_lora=..., prj_ln=...)``, built once per session."""

    def build(family: str, fmt: str = "safetensors", use_lora: bool = True, prj_ln: bool = True) -> TinyCheckpoint:
        key = (family, fmt, use_lora, prj_ln)
        if key not in _BUILT:
            root = tmp_path_factory.mktemp(
                f"{family}-{fmt}-{'lora' if use_lora else 'full'}-{'ln' if prj_ln else 'noln'}"
            )
            ckpt_dir, base_dir = make_tiny_codi(root, family, fmt=fmt, use_lora=use_lora, prj_ln=prj_ln)
            _BUILT[key] = TinyCheckpoint(family, fmt, use_lora, prj_ln, Path(ckpt_dir), Path(base_dir))
        return _BUILT[key]

    return build


@pytest.fixture(scope="session")
def questions() -> list[str]:
    """Real GSM8K test questions of clearly different lengths (shortest, median, a long one)."""
    rows = [json.loads(line) for line in shipped_dataset_text("gsm8k:test").splitlines()]
    by_length = sorted((r["question"] for r in rows[:200]), key=len)
    return [by_length[0], by_length[len(by_length) // 2], by_length[-40]]


@pytest.fixture(scope="session")
def llama_model(tiny_checkpoint):
    """The tiny LLaMA checkpoint loaded with codi_lens (float32)."""
    ckpt = tiny_checkpoint("llama")
    return load_codi(ckpt.checkpoint_dir, ckpt.base_dir)


#: The shipped toy models' projection width (their files hold no LoRA: trained from scratch).
TOY_PRJ_DIM = 256


def toy_reference(name: str) -> ReferenceCODI:
    """The HF reference of a shipped toy model (its folder is its own base: config.json and tokenizer)."""
    folder = PRETRAINED[name]
    return ReferenceCODI.from_checkpoint(folder, folder, lora_r=0, use_lora=False, prj_dim=TOY_PRJ_DIM)


@pytest.fixture(scope="session")
def toy_arith_reference() -> ReferenceCODI:
    return toy_reference("toy-arith")
