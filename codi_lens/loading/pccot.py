"""Reading and strictly validating PCCoT checkpoints (whyNLP/PCCoT) in their upstream on-disk layout.

Upstream's ``run_ccot.py`` trains a peft-wrapped HF causal LM and saves it with ``save_pretrained``: a
directory holding

- ``adapter_model.safetensors``: LoRA ``A`` / ``B`` of every target module (``base_model.model.`` + the HF
  module path + ``.lora_A.weight``); the trainable token rows (``trainable_token_indices``: BOT, EOT, latent,
  pad and EOS) as ``<embedding>.token_adapter.trainable_tokens_delta``, ``[n_rows, d_model]``, which
  *replace* those rows (peft's ``index_copy``), and, for a tied unembedding, the same under ``lm_head``; when
  the vocabulary was grown, the whole grown matrices as ``<module>.token_adapter.base_layer.weight``; and,
  with ``use_projection``, the head ``prj`` = ``Sequential(Linear, GELU, Linear, LayerNorm)`` as ``prj.0``,
  ``prj.2``, ``prj.3`` (saved through ``modules_to_save``);
- ``adapter_config.json`` (rank, alpha, target modules, the trainable rows), ``config.json``
  (``model_type`` ``pccot-gpt2`` / ``pccot-llama``, ``use_projection``, ``num_iterations``: the sweeps after
  the first), ``pccot_args.json`` (the marker ids, ``num_latent_tokens``, ``answer_prompt``) and the tokenizer
  with ``<pcot.bot>``, ``<pcot.eot>``, ``<pcot.latent>`` (and ``[PAD]``) added.

The base model's weights stay in its own directory (``model.safetensors`` or ``pytorch_model.bin``; GPT-2's
hub file names its keys without the ``transformer.`` prefix and holds causal-mask buffers, both accepted).
:func:`read_pccot` checks every file, key and shape and raises :class:`CheckpointError` naming what is
wrong; :class:`PCCoTTensors` then shows the adapter and the base as one CODI-layout state dict (LoRA as peft's
``base_layer`` / ``lora_A`` / ``lora_B``, the embeddings with their trained rows, the head as ``prj.1`` /
``prj.3`` / ``prj.ln``) that the CODI loader's weight conversion reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from codi_lens.core.components import CODITokens
from codi_lens.core.latent_loop import PCCOT_LOOP, LatentLoop
from codi_lens.loading.architectures import BaseArchitecture, describe_base
from codi_lens.loading.checkpoint import (
    CheckpointError,
    CheckpointLayout,
    CheckpointTensors,
    LazyTensors,
    TensorInfo,
    expected_tensors,
    key_problems,
    projection_widths,
    read_tensor_info,
    resolve_checkpoint_file,
)

ADAPTER_FILE = "adapter_model.safetensors"
#: The files a PCCoT checkpoint directory holds besides the tokenizer.
PCCOT_FILES = (ADAPTER_FILE, "adapter_config.json", "config.json", "pccot_args.json")
PEFT_PREFIX = "base_model.model."
#: The tokens upstream's ``run_ccot.py`` adds, in its order: BOT, EOT and the latent placeholder.
PCCOT_TOKENS = ("<pcot.bot>", "<pcot.eot>", "<pcot.latent>")
#: Buffers a base model's file may hold that are no weights (GPT-2's causal masks).
BASE_BUFFERS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
#: Upstream's head, as peft saves it, and the names of the CODI head the loader reads.
HEAD_KEYS = {"prj.1": "prj.0", "prj.3": "prj.2", "prj.ln": "prj.3"}
#: adapter_config.json settings that would change what the adapter computes and that codi_lens does not run.
UNSUPPORTED_PEFT = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}


def is_pccot_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory saved by upstream PCCoT (it holds ``pccot_args.json``)."""
    return Path(path).is_dir() and (Path(path) / "pccot_args.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"PCCoT checkpoint file {str(path)!r} could not be read: {exc}") from exc


def _field(values: dict[str, Any], key: str, file: Path) -> Any:
    if key not in values:
        raise CheckpointError(f"{str(file)!r} has no field {key!r}; upstream PCCoT writes it")
    return values[key]


@dataclass(frozen=True)
class PCCoTCheckpoint:
    """A PCCoT checkpoint directory, its settings read.

    Attributes:
        directory: the checkpoint directory (the adapter, its configs and the tokenizer).
        family: ``"gpt2"`` or ``"llama"`` (from ``config.json``'s ``model_type``).
        n_latents, n_sweeps: ``num_latent_tokens`` and ``num_iterations`` (sweeps after sweep 0).
        use_projection: whether latents go through the head ``prj``.
        answer_prompt: what is fed after EOT before the answer.
        bot, eot, latent: the marker ids (``pccot_args.json``).
        lora_rank, lora_alpha, target_modules: the LoRA settings (``adapter_config.json``).
        trainable_rows: the embedding rows the adapter replaces, in its order.
        vocab: rows of the grown vocabulary (``config.json``'s ``vocab_size``).
    """

    directory: Path
    family: str
    n_latents: int
    n_sweeps: int
    use_projection: bool
    answer_prompt: str
    bot: int
    eot: int
    latent: int
    lora_rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    trainable_rows: tuple[int, ...]
    vocab: int

    @property
    def adapter_file(self) -> Path:
        return self.directory / ADAPTER_FILE

    @property
    def embedding_module(self) -> str:
        return "transformer.wte" if self.family == "gpt2" else "model.embed_tokens"

    def latent_loop(self) -> LatentLoop:
        """PCCoT's loop with this checkpoint's thoughts, sweeps, feedback and answer prompt."""
        return replace(
            PCCOT_LOOP,
            n_latents=self.n_latents,
            n_sweeps=self.n_sweeps,
            feedback="projection" if self.use_projection else "identity",
            answer_prompt=self.answer_prompt,
        )

    def layout(self, arch: BaseArchitecture) -> CheckpointLayout:
        """The CODI-layout description of what :class:`PCCoTTensors` shows (LoRA; the head as ``prj.1``, ``prj.3``,
        ``prj.ln``)."""
        return CheckpointLayout(
            family=self.family,  # type: ignore[arg-type]
            uses_lora=True,
            lora_rank=self.lora_rank,
            prj_dim=arch.d_model if self.use_projection else None,
            prj_layernorm=self.use_projection,
            n_layers=arch.n_layers,
            vocab=self.vocab,
            method="pccot",
        )

    def tokens(self, tokenizer: PreTrainedTokenizerBase) -> CODITokens:
        """The marker, pad, stop and latent ids, after checking that ``tokenizer`` gives PCCoT's tokens the ids
        ``pccot_args.json`` records."""
        ids = tokenizer.convert_tokens_to_ids(list(PCCOT_TOKENS))
        if ids != [self.bot, self.eot, self.latent]:
            raise CheckpointError(
                f"the tokenizer gives {PCCOT_TOKENS} the ids {ids}, but pccot_args.json records "
                f"{[self.bot, self.eot, self.latent]}: use the tokenizer saved in {str(self.directory)!r}"
            )
        if tokenizer.eos_token_id is None or len(tokenizer) > self.vocab:
            raise CheckpointError(
                f"the tokenizer ({len(tokenizer)} tokens, EOS {tokenizer.eos_token_id}) does not fit a vocabulary "
                f"of {self.vocab}"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return CODITokens(pad=int(pad), bot=self.bot, eot=self.eot, eos=int(tokenizer.eos_token_id), latent=self.latent)


def read_pccot(directory: str | Path) -> PCCoTCheckpoint:
    """Read a PCCoT checkpoint directory's settings, naming a missing file or field."""
    directory = Path(directory)
    missing = [name for name in PCCOT_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"PCCoT checkpoint {str(directory)!r} lacks {missing}; upstream's save_pretrained writes "
            f"{list(PCCOT_FILES)}"
        )
    adapter = _read_json(directory / "adapter_config.json")
    config = _read_json(directory / "config.json")
    args = _read_json(directory / "pccot_args.json")
    model_type = _field(config, "model_type", directory / "config.json")
    family = {"pccot-gpt2": "gpt2", "pccot-llama": "llama"}.get(model_type)
    if family is None:
        raise CheckpointError(
            f"{str(directory / 'config.json')!r} has model_type {model_type!r}; a PCCoT model is 'pccot-gpt2' or "
            "'pccot-llama'"
        )
    for key, plain in UNSUPPORTED_PEFT.items():
        if adapter.get(key, plain) not in (plain, None):
            raise CheckpointError(
                f"{str(directory / 'adapter_config.json')!r} sets {key}={adapter[key]!r}, which codi_lens does not run"
            )
    rows = _field(adapter, "trainable_token_indices", directory / "adapter_config.json") or {}
    embedding = "wte" if family == "gpt2" else "embed_tokens"
    if set(rows) - {embedding}:
        raise CheckpointError(
            f"adapter_config.json trains token rows of {sorted(rows)}; PCCoT trains only {embedding!r}"
        )
    args_file = directory / "pccot_args.json"
    return PCCoTCheckpoint(
        directory=directory,
        family=family,
        n_latents=int(_field(args, "num_latent_tokens", args_file)),
        n_sweeps=int(config.get("num_iterations", 6)),  # upstream's PCCoTGPT2Config default
        use_projection=bool(config.get("use_projection", False)),  # likewise
        answer_prompt=str(_field(args, "answer_prompt", args_file)),
        bot=int(_field(args, "bot_token_id", args_file)),
        eot=int(_field(args, "eot_token_id", args_file)),
        latent=int(_field(args, "latent_token_id", args_file)),
        lora_rank=int(_field(adapter, "r", directory / "adapter_config.json")),
        lora_alpha=float(_field(adapter, "lora_alpha", directory / "adapter_config.json")),
        target_modules=tuple(_field(adapter, "target_modules", directory / "adapter_config.json")),
        trainable_rows=tuple(int(i) for i in rows.get(embedding, [])),
        vocab=int(_field(config, "vocab_size", directory / "config.json")),
    )


def _normalise_base_key(key: str, family: str) -> str:
    """GPT-2's hub file names keys without ``transformer.``; the HF module path is the one used here."""
    if family == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return f"transformer.{key}"
    return key


def base_tensor_info(base_file: Path, family: str) -> dict[str, TensorInfo]:
    """The base file's weights by HF module path (causal-mask buffers left out)."""
    info = read_tensor_info(base_file)
    return {_normalise_base_key(k, family): v for k, v in info.items() if not BASE_BUFFERS.search(k)}


def _expected_base(arch: BaseArchitecture, info: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """The base's weights (plain, vocabulary V); a tied ``lm_head.weight`` may be absent."""
    plain = CheckpointLayout(arch.family, False, None, None, False, arch.n_layers, arch.base_vocab)
    every = expected_tensors(replace(arch, added_tokens=0), plain)
    expected = {k.removeprefix("codi."): v for k, v in every.items() if not k.startswith("prj.")}
    tied = arch.hf_config.get("tie_word_embeddings", True)
    if tied and "lm_head.weight" not in info:
        del expected["lm_head.weight"]
    return expected


def _lora_modules(arch: BaseArchitecture, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Every module LoRA wraps, by HF path, with its ``(out, in)`` widths."""
    layer = "transformer.h.{}" if arch.family == "gpt2" else "model.layers.{}"
    chosen = {name: dims for name, dims in projection_widths(arch).items() if name.split(".")[-1] in targets}
    return {f"{layer.format(i)}.{name}": dims for i in range(arch.n_layers) for name, dims in chosen.items()}


def _expected_adapter(
    checkpoint: PCCoTCheckpoint, arch: BaseArchitecture, present: set[str]
) -> dict[str, tuple[int, ...]]:
    """Every key the adapter must hold (and may: the grown matrices and the tied unembedding's rows)."""
    d, r = arch.d_model, checkpoint.lora_rank
    expected: dict[str, tuple[int, ...]] = {}
    for module, (out_dim, in_dim) in _lora_modules(arch, checkpoint.target_modules).items():
        expected[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (r, in_dim)
        expected[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (out_dim, r)
    rows = (len(checkpoint.trainable_rows), d)
    for module in (checkpoint.embedding_module, "lm_head"):
        delta, grown = (
            f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta",
            f"{PEFT_PREFIX}{module}.token_adapter.base_layer.weight",
        )
        if module != "lm_head" or delta in present:
            expected[delta] = rows
        if grown in present:
            expected[grown] = (checkpoint.vocab, d)
    if checkpoint.use_projection:
        for name in ("prj.0", "prj.2"):
            expected.update({f"{PEFT_PREFIX}{name}.weight": (d, d), f"{PEFT_PREFIX}{name}.bias": (d,)})
        expected.update({f"{PEFT_PREFIX}prj.3.weight": (d,), f"{PEFT_PREFIX}prj.3.bias": (d,)})
    return expected


def validate_pccot(checkpoint: PCCoTCheckpoint, arch: BaseArchitecture, base_file: Path) -> None:
    """Check the adapter, the base's weights and the settings against the base architecture; raise
    :class:`CheckpointError` naming every missing, unexpected or mis-shaped key, or the setting that is off."""
    if arch.family != checkpoint.family:
        raise CheckpointError(
            f"{checkpoint.directory} is a PCCoT {checkpoint.family} checkpoint but the base {arch.source!r} is "
            f"{arch.family}"
        )
    if checkpoint.vocab < arch.base_vocab:
        raise CheckpointError(f"config.json's vocab_size {checkpoint.vocab} is below the base's {arch.base_vocab}")
    for name, token in (("bot", checkpoint.bot), ("eot", checkpoint.eot), ("latent", checkpoint.latent)):
        if not 0 <= token < checkpoint.vocab:
            raise CheckpointError(
                f"pccot_args.json's {name}_token_id {token} is outside the vocabulary of {checkpoint.vocab}"
            )
    adapter = read_tensor_info(checkpoint.adapter_file)
    base = base_tensor_info(base_file, arch.family)
    problems = [
        f"{checkpoint.adapter_file}: {p}"
        for p in key_problems(adapter, _expected_adapter(checkpoint, arch, set(adapter)))
    ]
    problems += [f"{base_file}: {p}" for p in key_problems(base, _expected_base(arch, base))]
    if problems:
        raise CheckpointError(
            f"PCCoT checkpoint {str(checkpoint.directory)!r} does not match base {arch.source!r}: "
            + "; ".join(problems)
        )
    grown = f"{PEFT_PREFIX}{checkpoint.embedding_module}.token_adapter.base_layer.weight"
    unset = sorted(set(range(arch.base_vocab, checkpoint.vocab)) - set(checkpoint.trainable_rows))
    if grown not in adapter and unset:
        raise CheckpointError(
            f"rows {unset[:5]} of the grown vocabulary have no value: the adapter holds neither the grown embedding "
            f"({grown}) nor those rows among its trainable tokens"
        )


class PCCoTTensors(LazyTensors):
    """The adapter and the base's weights shown as one CODI-layout state dict without a prefix, each tensor
    read when looked up: LoRA modules as ``<module>.base_layer.*`` + ``<module>.lora_A.default.weight`` /
    ``lora_B``; the embedding (and the unembedding) with the trained rows written in (peft's replacement); the
    head as ``prj.1`` / ``prj.3`` / ``prj.ln``."""

    def __init__(self, checkpoint: PCCoTCheckpoint, arch: BaseArchitecture, base_file: Path):
        self.checkpoint, self.arch = checkpoint, arch
        self.adapter = CheckpointTensors(checkpoint.adapter_file)
        self.base = CheckpointTensors(base_file)
        self._base_names = {_normalise_base_key(k, arch.family): k for k in self.base if not BASE_BUFFERS.search(k)}
        self._keys = self._shown_keys()

    def _shown_keys(self) -> dict[str, None]:
        lora = {
            k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            for k in self.adapter
            if k.endswith(".lora_A.weight")
        }
        keys: dict[str, None] = {}
        for name in self._base_names:
            module, _, kind = name.rpartition(".")
            keys[f"{module}.base_layer.{kind}" if module in lora else name] = None
        for module in lora:
            keys[f"{module}.lora_A.default.weight"] = keys[f"{module}.lora_B.default.weight"] = None
        keys[f"{self.checkpoint.embedding_module}.weight"] = keys["lm_head.weight"] = None
        if self.checkpoint.use_projection:
            keys.update({f"{ours}.{kind}": None for ours in HEAD_KEYS for kind in ("weight", "bias")})
        return keys

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if key == f"{self.checkpoint.embedding_module}.weight":
            return self._embedding
        if key == "lm_head.weight":
            return self._unembedding()
        head = key.rpartition(".")[0]
        if head in HEAD_KEYS:
            return self.adapter[f"{PEFT_PREFIX}{HEAD_KEYS[head]}.{key.rpartition('.')[2]}"]
        if ".lora_A.default." in key or ".lora_B.default." in key:
            return self.adapter[PEFT_PREFIX + key.replace(".default.", ".")]
        return self.base[self._base_names[key.replace(".base_layer.", ".")]]

    def _with_rows(self, module: str, fallback: Tensor) -> Tensor:
        """``module``'s grown matrix (saved, or ``fallback`` grown to the vocabulary) with the trained rows
        written in, as peft's ``index_copy`` writes them, in the wider of the two dtypes: peft keeps the rows in
        float32 beside a bfloat16 matrix, and casting them to bfloat16 moved a random LLaMA-1B-shaped PCCoT's
        hidden states by 1.5e-2 at BOT (measured in this stop)."""
        grown = f"{PEFT_PREFIX}{module}.token_adapter.base_layer.weight"
        delta = f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta"
        rows = self.adapter[delta] if delta in self.adapter and self.checkpoint.trainable_rows else None
        source = self.adapter.get(grown, fallback)
        dtype = source.dtype if rows is None else torch.promote_types(source.dtype, rows.dtype)
        matrix = source.new_zeros((self.checkpoint.vocab, source.shape[1]), dtype=dtype)
        matrix[: source.shape[0]] = source
        if rows is not None:
            matrix.index_copy_(0, torch.tensor(self.checkpoint.trainable_rows), rows.to(dtype))
        return matrix

    @cached_property
    def _embedding(self) -> Tensor:
        module = self.checkpoint.embedding_module
        return self._with_rows(module, self.base[self._base_names[f"{module}.weight"]])

    def _unembedding(self) -> Tensor:
        """A tied unembedding is the embedding (peft's tied token adapter writes the same rows); an untied one
        is the base's ``lm_head`` with its own rows."""
        delta = f"{PEFT_PREFIX}lm_head.token_adapter.trainable_tokens_delta"
        if "lm_head.weight" not in self._base_names and delta not in self.adapter:
            return self._embedding
        own = "lm_head.weight" if "lm_head.weight" in self._base_names else f"{self.checkpoint.embedding_module}.weight"
        fallback = self.base[self._base_names[own]]
        return self._with_rows("lm_head", fallback)


def base_weights_file(base: str | Path) -> Path:
    """The base model's weights file (PCCoT saves only an adapter, so its base must be a directory with them)."""
    if not Path(base).is_dir():
        raise CheckpointError(
            f"a PCCoT checkpoint holds only an adapter: base {str(base)!r} must be a local directory holding the "
            "base model's weights (model.safetensors or pytorch_model.bin), as upstream's run_ccot.py loaded them"
        )
    return resolve_checkpoint_file(base)


def open_pccot(directory: str | Path, base: str | Path) -> tuple[PCCoTCheckpoint, BaseArchitecture, PCCoTTensors]:
    """Read and validate a PCCoT checkpoint against its base; the architecture has the grown vocabulary."""
    checkpoint = read_pccot(directory)
    arch = describe_base(base)
    base_file = base_weights_file(base)
    validate_pccot(checkpoint, arch, base_file)
    arch = replace(arch, added_tokens=checkpoint.vocab - arch.base_vocab)
    return checkpoint, arch, PCCoTTensors(checkpoint, arch, base_file)
