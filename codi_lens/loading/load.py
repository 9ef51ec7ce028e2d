"""Load a CODI or Coconut checkpoint (upstream layout) and its base architecture into a :class:`CODIModel`.

The method is read from the file (:func:`~codi_lens.loading.checkpoint.detect_layout`) and decides the
model's :class:`~codi_lens.core.latent_loop.LatentLoop`, its marker ids and, for Coconut, the three tokens
its tokenizer gains as upstream's ``run.py`` adds them.

The LoRA deltas are merged into the base weights (``W' = W + (alpha / r) * B @ A``, transposed for
GPT-2's Conv1D layers) and the merged weights are handed to TransformerLens' own weight converters,
so the hooked model follows TransformerLens' conventions exactly. No weight processing (LayerNorm
folding, centring) is applied.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from codi_lens.core.components import CODITokens
from codi_lens.core.latent_loop import LATENT_LOOPS, LatentLoop
from codi_lens.core.model import CODIModel
from codi_lens.loading.architectures import BaseArchitecture, describe_base, to_hooked_config
from codi_lens.loading.checkpoint import (
    CheckpointError,
    CheckpointLayout,
    CheckpointTensors,
    detect_layout,
    read_tensor_info,
    resolve_checkpoint_file,
    validate_checkpoint,
)
from codi_lens.loading.llama_tokenizer import llama3_tokenizer
from codi_lens.loading.pccot import is_pccot_checkpoint, open_pccot
from codi_lens.loading.registry import DEFAULT_MODEL, SHIPPED_MODELS

#: Built-in bases whose tokenizer codi_lens can build offline when no ``tokenizer=`` is given.
BUILT_TOKENIZERS = {"llama-3.2-1b-instruct": llama3_tokenizer}


#: What a block's conversion reads for the embeddings, final norm and unembedding: they are converted once,
#: in their own pass, so a per-block pass gets an empty stand-in instead of reading them again.
_NOT_READ = torch.empty(0, 0)


#: Modules holding the input embeddings (LLaMA's, GPT-2's token and position embeddings): converted in a pass
#: of their own, apart from the final norm and unembedding, so the two vocabulary-sized matrices are never
#: held at once.
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe")
#: What each pass outside the blocks shows: the embeddings, or everything else (final norm, unembedding).
OUTSIDE_PASSES = ("embeddings", "head")


@dataclass(frozen=True)
class _MergedWeights:
    """Attribute view over flat checkpoint tensors, shaped like an HF model, merging LoRA on access.

    ``view.model.layers[3].self_attn.q_proj.weight`` returns the merged weight of that module (LoRA merged
    in float32, then cast to ``dtype``, the model's; a weight without LoRA in its stored dtype, so copying it
    into the model's parameter is its one conversion), which is what TransformerLens' HF weight converters
    read. With ``block`` set, the view shows only that transformer block, as block 0 (``layers[0]`` or
    ``h[0]`` is block ``block``), and an empty stand-in for every weight outside the blocks; with ``outside``
    (one of :data:`OUTSIDE_PASSES`), only the embeddings or only the rest of what lies outside the blocks.
    Its fields start with ``_`` so that no HF attribute name a converter reads can meet one.
    """

    _tensors: Mapping[str, Tensor]
    _prefix: str
    _lora_scale: float
    _conv1d: bool
    _dtype: torch.dtype
    _block: int | None = None
    _in_block: bool = False
    _outside: str | None = None

    def block_view(self, block: int) -> _MergedWeights:
        """This view showing only transformer block ``block``, as block 0."""
        return replace(self, _block=block, _outside=None)

    def outside_view(self, outside: str) -> _MergedWeights:
        """This view showing, of the weights outside the blocks, only the embeddings or only the rest."""
        return replace(self, _block=None, _outside=outside)

    def _child(self, name: str, in_block: bool = False) -> _MergedWeights:
        return replace(self, _prefix=f"{self._prefix}{name}.", _in_block=in_block or self._in_block)

    def _hidden(self) -> bool:
        if self._in_block:
            return False
        if self._block is not None:
            return True
        if self._outside is None:
            return False
        embedding = any(part in EMBEDDING_MODULES for part in self._prefix.split("."))
        return embedding != (self._outside == "embeddings")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ("weight", "bias"):
            return self._parameter(name)
        return self._child(name)

    def __getitem__(self, index: int) -> _MergedWeights:
        return self._child(str(index if self._block is None else self._block), in_block=True)

    def _parameter(self, kind: str) -> Tensor:
        if self._hidden():
            return _NOT_READ
        plain = f"{self._prefix}{kind}"
        if plain in self._tensors:
            return self._tensors[plain]
        base = self._tensors[f"{self._prefix}base_layer.{kind}"]
        if kind == "bias":
            return base
        lora_a = self._tensors[f"{self._prefix}lora_A.default.weight"].float()
        lora_b = self._tensors[f"{self._prefix}lora_B.default.weight"].float()
        delta = self._lora_scale * (lora_b @ lora_a)  # [out, in]
        return (base.float() + (delta.T if self._conv1d else delta)).to(self._dtype)


def _resolve_tokenizer(tokenizer: Any, base: str | Path, method: str = "codi") -> PreTrainedTokenizerBase:
    """The tokenizer given, or the base's own; a built-in base's is built for the method (CODI's with its
    ``[PAD]``, Coconut's without, as its ``run.py`` pads with EOS)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is None and str(base).lower() in BUILT_TOKENIZERS:
        return BUILT_TOKENIZERS[str(base).lower()](codi_pad=method == "codi")
    source = tokenizer if tokenizer is not None else base
    if not Path(source).is_dir():
        raise CheckpointError(
            f"no tokenizer: base {str(base)!r} is a built-in architecture without files; pass "
            "tokenizer= a local tokenizer directory (codi_lens never downloads one)"
        )
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


#: The tokens Coconut's ``run.py`` adds to the base tokenizer, in its order (ids V, V + 1, V + 2).
COCONUT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def _codi_tokens(arch: BaseArchitecture, tokenizer: PreTrainedTokenizerBase, method: str = "codi") -> CODITokens:
    """The marker, pad and stop ids: CODI's rows V (pad), V + 1 (BOT), V + 2 (EOT); Coconut's
    ``<|start-latent|>`` (V) and ``<|end-latent|>`` (V + 1) as BOT and EOT, padded with EOS as upstream."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else arch.eos_id
    if eos is None:
        raise ValueError("neither the tokenizer nor the base config defines an EOS token")
    if method == "coconut":
        v = arch.base_vocab
        return CODITokens(pad=int(eos), bot=v, eot=v + 1, eos=int(eos))
    return CODITokens(pad=arch.pad_id, bot=arch.bot_id, eot=arch.eot_id, eos=int(eos))


def with_coconut_tokens(tokenizer: PreTrainedTokenizerBase, arch: BaseArchitecture) -> PreTrainedTokenizerBase:
    """A copy of the base tokenizer with Coconut's three tokens added as upstream adds them, checked to land
    on ids V, V + 1, V + 2 (a tokenizer of another size would give the markers other ids)."""
    if len(tokenizer) != arch.base_vocab:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the base {arch.source!r} has a vocabulary of "
            f"{arch.base_vocab}: Coconut's {COCONUT_TOKENS} would not get ids V, V + 1, V + 2"
        )
    tokenizer = copy.deepcopy(tokenizer)
    for token in COCONUT_TOKENS:
        tokenizer.add_tokens(token)
    ids = tokenizer.convert_tokens_to_ids(list(COCONUT_TOKENS))
    expected = list(range(arch.base_vocab, arch.base_vocab + 3))
    if ids != expected:
        raise CheckpointError(f"Coconut's tokens {COCONUT_TOKENS} got ids {ids}, not {expected}")
    return tokenizer


def _converted_parts(
    view: _MergedWeights, cfg: HookedTransformerConfig, converter: Callable
) -> Iterator[dict[str, Tensor]]:
    """TransformerLens' converter run one part at a time: the embeddings, then the final norm and unembedding
    (passes with no blocks, each keeping its own keys), then each transformer block (a one-block pass, its keys
    renamed to the block's), so only one part's converted weights exist at once."""
    # No name here outlives its part: the next part is converted only once the last is dropped.
    part_cfg = copy.copy(cfg)
    part_cfg.n_layers = 0
    for outside in OUTSIDE_PASSES:
        yield _own_keys(converter(view.outside_view(outside), part_cfg), embeddings=outside == "embeddings")
    part_cfg.n_layers = 1
    for block in range(cfg.n_layers):
        yield _block_keys(converter(view.block_view(block), part_cfg), block)


def _own_keys(state: dict[str, Tensor], embeddings: bool) -> dict[str, Tensor]:
    """Of a pass outside the blocks, the embeddings' keys, or every other key."""
    return {k: v for k, v in state.items() if k.startswith(("embed.", "pos_embed.")) == embeddings}


def _block_keys(state: dict[str, Tensor], block: int) -> dict[str, Tensor]:
    """A one-block pass's keys, renamed to block ``block``'s."""
    return {f"blocks.{block}.{k.removeprefix('blocks.0.')}": v for k, v in state.items() if k.startswith("blocks.0.")}


def _copy_into(model: CODIModel, parts: Iterator[dict[str, Tensor]], bar: tqdm) -> None:
    """Copy converted weights into the model's parameters part by part (each converted to the parameter's
    dtype in the copy), requiring every parameter to be written once with its exact shape; ``bar`` moves
    one step per part."""
    params = dict(model.named_parameters())
    written: set[str] = set()
    for state in parts:
        bar.update()
        _copy_part(params, state, written)
        del state  # dropped before the next part is converted
    missing = sorted(k for k in params if k not in written)
    if missing:
        raise RuntimeError(f"internal conversion error: missing {missing[:5]}")


@torch.no_grad()
def _copy_part(params: dict[str, torch.nn.Parameter], state: dict[str, Tensor], written: set[str]) -> None:
    unexpected = sorted(k for k in state if k not in params or k in written)
    if unexpected:
        raise RuntimeError(f"internal conversion error: unexpected or repeated {unexpected[:5]}")
    for name, value in state.items():
        if params[name].shape != value.shape:
            raise RuntimeError(f"internal conversion error: {name} {tuple(value.shape)} vs {tuple(params[name].shape)}")
        copy_weight(params[name], value)
        written.add(name)


#: Columns of a transposed source made contiguous per block when a weight is copied (see :func:`copy_weight`).
TRANSPOSE_BLOCK = 2048


def copy_weight(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)``; when ``value`` is a transposed matrix (``lm_head.weight.T``, TransformerLens'
    ``W_U``) and ``param`` is stored in its logical order, block by block: ``TRANSPOSE_BLOCK`` columns of
    ``value`` made contiguous in its own dtype, then copied (and converted) along rows. Torch's one strided copy
    with a dtype conversion took 1.88 s for LLaMA-1B's unembedding (bfloat16 to float32) against 0.33 s in
    blocks, with 8 MB held at a time (``/tmp`` benchmark of this stop, 2 threads)."""
    transposed = value.dim() == 2 and not value.is_contiguous() and value.t().is_contiguous()
    if not (transposed and param.is_contiguous()):
        param.copy_(value)
        return
    for start in range(0, value.shape[1], TRANSPOSE_BLOCK):
        block = value[:, start : start + TRANSPOSE_BLOCK]
        param[:, start : start + TRANSPOSE_BLOCK].copy_(block.contiguous())


def _projection_part(tensors: Mapping[str, Tensor], layout: CheckpointLayout) -> Iterator[dict[str, Tensor]]:
    """The projection head's weights, read when the part is asked for (nothing for a loop without one)."""
    if layout.prj_dim is None:
        return
    state = {
        "prj.fc_in.weight": tensors["prj.1.weight"],
        "prj.fc_in.bias": tensors["prj.1.bias"],
        "prj.fc_out.weight": tensors["prj.3.weight"],
        "prj.fc_out.bias": tensors["prj.3.bias"],
    }
    if layout.prj_layernorm:
        state.update({"prj.ln.weight": tensors["prj.ln.weight"], "prj.ln.bias": tensors["prj.ln.bias"]})
    yield state


def model_from_tensors(
    tensors: Mapping[str, Tensor],
    layout: CheckpointLayout,
    arch: BaseArchitecture,
    tokenizer: PreTrainedTokenizerBase,
    *,
    lora_alpha: float = 32,
    dtype: torch.dtype = torch.float32,
    checkpoint_file: Path | None = None,
    progress: bool = False,
    latent_loop: LatentLoop | None = None,
    tokens: CODITokens | None = None,
) -> CODIModel:
    """Build a CPU :class:`CODIModel` from an (already validated) upstream-layout state dict.

    ``latent_loop`` and ``tokens`` default to the layout's method's (a PCCoT checkpoint carries its own).

    Memory: the model's parameters, plus one part's converted weights at a time (a block, or the embeddings
    and unembedding) and whatever ``tensors`` holds (a :class:`CheckpointTensors` reads one tensor per
    lookup). ``progress``: a bar over building the modules and copying each part (a minute at the 1B shape)."""
    cfg = to_hooked_config(arch, device="cpu", dtype=dtype)
    n_parts = cfg.n_layers + 4 + (layout.prj_dim is not None)  # the modules, 2 outside, the blocks, b_U, prj
    with tqdm(total=n_parts, desc="loading", unit="part", disable=not progress) as bar:
        model = _filled_model(
            tensors, layout, arch, tokenizer, cfg, lora_alpha, checkpoint_file, bar, latent_loop, tokens
        )
    return model.eval()


def _filled_model(
    tensors: Mapping[str, Tensor],
    layout: CheckpointLayout,
    arch: BaseArchitecture,
    tokenizer: PreTrainedTokenizerBase,
    cfg: HookedTransformerConfig,
    lora_alpha: float,
    checkpoint_file: Path | None,
    bar: tqdm,
    latent_loop: LatentLoop | None,
    tokens: CODITokens | None,
) -> CODIModel:
    """The model's modules built (one step of ``bar``), then every part of the checkpoint copied in."""
    if layout.method == "coconut":
        tokenizer = with_coconut_tokens(tokenizer, arch)
    latent_loop = LATENT_LOOPS[layout.method] if latent_loop is None else latent_loop
    model = CODIModel(
        cfg,
        tokenizer,
        tokens=_codi_tokens(arch, tokenizer, layout.method) if tokens is None else tokens,
        prj_dim=layout.prj_dim,
        prj_layernorm=layout.prj_layernorm,
        n_thought_hooks=latent_loop.n_latents,
        checkpoint_file=checkpoint_file,
        latent_loop=latent_loop,
    )
    model.store_weights_for_linear(keep_values=False)  # the layout the weights are copied into
    scale = lora_alpha / layout.lora_rank if layout.uses_lora else 0.0
    view = _MergedWeights(tensors, layout.prefix, scale, arch.family == "gpt2", cfg.dtype)
    converter = convert_gpt2_weights if arch.family == "gpt2" else convert_llama_weights
    # Neither method's lm_head has a bias; TransformerLens' GPT-2 converter leaves b_U out.
    unembed_bias = {} if arch.family == "llama" else {"unembed.b_U": torch.zeros(cfg.d_vocab_out)}
    bar.update()  # the modules are built
    parts = itertools.chain(_converted_parts(view, cfg, converter), [unembed_bias], _projection_part(tensors, layout))
    _copy_into(model, parts, bar)
    return model


@dataclass(frozen=True)
class LoadSpec:
    """How a model was loaded: enough for another process (a Ray worker) to load the same model.

    Recorded by :func:`load_codi` as ``model.source`` when every argument is a name or a path
    (not when ``tokenizer`` is a tokenizer object). ``checkpoint_sha256`` lets the other process check
    that its copy of the file is the same one.
    """

    checkpoint: str
    base: str | None
    tokenizer: str | None
    lora_alpha: float
    device: str
    dtype: str
    checkpoint_sha256: str

    def load(self) -> CODIModel:
        model = load_codi(
            self.checkpoint,
            self.base,
            tokenizer=self.tokenizer,
            lora_alpha=self.lora_alpha,
            device=self.device,
            dtype=getattr(torch, self.dtype),
        )
        if model.checkpoint_sha256 != self.checkpoint_sha256:
            raise CheckpointError(
                f"{model.checkpoint_file} here has SHA-256 {model.checkpoint_sha256}, but the model was loaded "
                f"from a file with SHA-256 {self.checkpoint_sha256}: every machine needs the same checkpoint"
            )
        return model


def load_codi(
    checkpoint: str | Path = DEFAULT_MODEL,
    base: str | Path | None = None,
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    lora_alpha: float = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> CODIModel:
    """Load a CODI or Coconut checkpoint into a hooked :class:`CODIModel` running that method's loop.

    The method is read from the file's keys (CODI: ``codi.`` and ``prj.``; Coconut: ``base_causallm.``)
    and sets ``model.latent_loop``.

    Args:
        checkpoint: a directory holding ``model.safetensors`` or ``pytorch_model.bin`` in the upstream
            CODI layout, the file itself (Coconut saves ``checkpoint_<epoch>``, a ``torch.save`` pickle), or
            the name of a shipped model (``"toy-chain"``, ``"toy-arith"``).
        base: a local HF base-model directory (``config.json`` and tokenizer) or a built-in base name
            (``"llama-3.2-1b-instruct"``, ``"gpt2"``). Defaults to the shipped model's directory.
        tokenizer: a local tokenizer directory or tokenizer object. With the built-in base
            ``"llama-3.2-1b-instruct"`` it may be left out: the Llama 3 tokenizer is then built once from
            Meta's ``llama-models`` package (extra ``codi-lens[llama]``) into a cache directory, see
            :mod:`codi_lens.loading.llama_tokenizer`. With the built-in ``"gpt2"`` it is required.
        lora_alpha: LoRA alpha used in training (not stored in checkpoints; CODI used 32). The rank
            is read from the weights.
        device, dtype: where and in which precision the model runs (float32 or bfloat16).
        progress: show a bar while the weights are copied in, part by part.

    Raises:
        CheckpointError: the file does not match the base (names the offending keys).
    """
    requested, requested_base = checkpoint, base
    if is_pccot_checkpoint(checkpoint):
        model = _load_pccot(checkpoint, base, tokenizer, dtype=dtype, progress=progress)
    else:
        model = _load_state_dict(checkpoint, base, tokenizer, lora_alpha=lora_alpha, dtype=dtype, progress=progress)
    if str(device) != "cpu":
        model.cfg.device = str(device)
        model.to(device)
    if tokenizer is None or isinstance(tokenizer, str | Path):
        model.source = LoadSpec(
            checkpoint=_portable(requested),
            base=None if requested_base is None else _portable(requested_base),
            tokenizer=None if tokenizer is None else _portable(tokenizer),
            lora_alpha=float(lora_alpha),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            checkpoint_sha256=model.checkpoint_sha256,
        )
    return model.eval()


def _load_pccot(
    checkpoint: str | Path, base: str | Path | None, tokenizer: Any, *, dtype: torch.dtype, progress: bool
) -> CODIModel:
    """A PCCoT directory (adapter, configs, tokenizer) on its base's weights; LoRA's alpha comes from
    ``adapter_config.json``, the loop's settings from ``config.json`` and ``pccot_args.json``."""
    pccot, arch, tensors = open_pccot(checkpoint, _pccot_base(checkpoint, base))
    tok = (
        tokenizer
        if isinstance(tokenizer, PreTrainedTokenizerBase)
        else _resolve_tokenizer(tokenizer or checkpoint, checkpoint)
    )
    return model_from_tensors(
        tensors,
        pccot.layout(arch),
        arch,
        tok,
        lora_alpha=pccot.lora_alpha,
        dtype=dtype,
        checkpoint_file=pccot.adapter_file,
        progress=progress,
        latent_loop=pccot.latent_loop(),
        tokens=pccot.tokens(tok),
    )


def _pccot_base(checkpoint: str | Path, base: str | Path | None) -> str | Path:
    if base is None:
        raise CheckpointError(
            f"--base is required for PCCoT checkpoint {str(checkpoint)!r}: the directory of the base model whose "
            "weights it adapts (a PCCoT directory holds only the adapter)"
        )
    return base


def _load_state_dict(
    checkpoint: str | Path,
    base: str | Path | None,
    tokenizer: Any,
    *,
    lora_alpha: float,
    dtype: torch.dtype,
    progress: bool,
) -> CODIModel:
    """A CODI or Coconut state dict (one file) on the base architecture it was trained from."""
    checkpoint, base = _locate(checkpoint, base)
    weights_file, arch = resolve_checkpoint_file(checkpoint), describe_base(base)
    info = read_tensor_info(weights_file)
    method = detect_layout(info).method  # the keys say which tokenizer a built-in base needs
    tok = _resolve_tokenizer(tokenizer, base, method)  # a missing tokenizer is named before the keys are checked
    layout = validate_checkpoint(info, arch, path=str(weights_file))
    return model_from_tensors(
        CheckpointTensors(weights_file),
        layout,
        arch,
        tok,
        lora_alpha=lora_alpha,
        dtype=dtype,
        checkpoint_file=weights_file,
        progress=progress,
    )


def _locate(checkpoint: str | Path, base: str | Path | None) -> tuple[str | Path, str | Path]:
    """A shipped model's folder (its own base), or the checkpoint and the base the caller named."""
    if str(checkpoint) in SHIPPED_MODELS:
        checkpoint = SHIPPED_MODELS[str(checkpoint)].folder
        base = checkpoint if base is None else base
    if base is None:
        raise CheckpointError(
            f"--base is required for checkpoint {str(checkpoint)!r}: a base model directory or a built-in name"
        )
    return checkpoint, base


def _check(checkpoint: str | Path, base: str | Path) -> tuple[Path, BaseArchitecture, CheckpointLayout]:
    weights_file = resolve_checkpoint_file(checkpoint)
    arch = describe_base(base)
    return weights_file, arch, validate_checkpoint(read_tensor_info(weights_file), arch, path=str(weights_file))


def check_codi(checkpoint: str | Path = DEFAULT_MODEL, base: str | Path | None = None) -> BaseArchitecture:
    """What :func:`load_codi` would check, without reading a weight: the checkpoint file exists and every key
    and shape in its header fits the base (:class:`CheckpointError` names the offending ones). Returns the
    base's architecture (layers, heads, widths), so flags that name layers or sites can be checked before
    the model loads. A PCCoT directory is checked with its base's weights file (its header only)."""
    if is_pccot_checkpoint(checkpoint):
        return open_pccot(checkpoint, _pccot_base(checkpoint, base))[1]
    checkpoint, base = _locate(checkpoint, base)
    return _check(checkpoint, base)[1]


def _portable(source: str | Path) -> str:
    """A name as it is, a path made absolute (a worker's working directory may differ)."""
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


def load_pretrained(name: str = DEFAULT_MODEL, **kwargs: Any) -> CODIModel:
    """Load a model shipped with codi_lens by name (see :data:`~codi_lens.loading.registry.SHIPPED_MODELS`;
    :class:`~codi_lens.core.errors.ChoiceError` lists them for another name)."""
    SHIPPED_MODELS[name]  # a ChoiceError naming the shipped models for any other name
    return load_codi(name, **kwargs)
