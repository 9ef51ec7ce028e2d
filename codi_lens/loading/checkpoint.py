"""Reading and strictly validating CODI and Coconut checkpoints in their upstream on-disk layouts.

Upstream CODI saves ``CODI.state_dict()`` as one ``pytorch_model.bin`` or ``model.safetensors``: the
base LM under ``codi.`` (``codi.base_model.model.`` plus ``base_layer`` / ``lora_A`` / ``lora_B``
parts when trained with LoRA via peft) and the projection head under ``prj.`` (``prj.1``, ``prj.3``
Linear layers and an optional ``prj.ln`` LayerNorm). Upstream loads it with ``strict=False``, which
silently ignores mismatches. codi_lens instead checks every key, shape and the vocabulary size
against the base architecture and raises :class:`CheckpointError` naming what is wrong.

Upstream Coconut (``run.py``) saves the state dict of its ``Coconut`` module with ``torch.save``: the whole
HF causal LM under ``base_causallm.`` (fully fine-tuned, no LoRA, no projection head), and, because
``Coconut.embedding`` is the LM's own input-embedding module, usually that table again as
``embedding.weight``. Its vocabulary is also V + 3 (``<|start-latent|>``, ``<|end-latent|>``,
``<|latent|>``).

SIM-CoT (InternLM/SIM-CoT) trains either loop with an auxiliary decoder that reads each latent back as a
step; its files are CODI's or Coconut's plus that decoder (CODI: a whole HF LM under ``decoder.``, with
``pj_in.`` / ``pj_out.`` where widths differ; Coconut: one under ``expainable_llm.``, upstream's spelling).
Inference never uses it, so the loader names it and leaves it unread.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from codi_lens.core.errors import CodiLensError, MissingFileError
from codi_lens.loading.architectures import N_CODI_TOKENS, BaseArchitecture, Family
from codi_lens.loading.registry import PRETRAINED

CHECKPOINT_FILENAMES = ("model.safetensors", "pytorch_model.bin")
LORA_PREFIX = "codi.base_model.model."
PLAIN_PREFIX = "codi."
COCONUT_PREFIX = "base_causallm."
#: Coconut's second name for its input embeddings (``Coconut.embedding``), present in what upstream saves.
COCONUT_EMBEDDING = "embedding.weight"
#: The methods whose checkpoints codi_lens reads, as a layout names them.
METHOD_NAMES = {"codi": "CODI", "coconut": "Coconut", "pccot": "PCCoT"}
#: Where SIM-CoT saves its training-only auxiliary decoder, by the loop it trained: key prefixes, the first
#: of which holds a whole HF causal LM.
SIM_COT_DECODER = {"codi": ("decoder.", "pj_in.", "pj_out."), "coconut": ("expainable_llm.",)}
#: How many offending keys an error message lists before summarising with counts.
MAX_LISTED = 5


class CheckpointError(CodiLensError, ValueError):
    """A checkpoint file that does not match what the base architecture requires."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CheckpointLayout:
    """What a checkpoint contains, read from its keys and shapes.

    Attributes:
        method: ``"codi"`` or ``"coconut"`` (which latent loop the file was trained for).
        family: ``"llama"`` or ``"gpt2"``.
        uses_lora: whether the base weights are peft LoRA layers (``base_layer`` + ``lora_A/B``).
        lora_rank: r, from ``lora_A`` (None without LoRA).
        prj_dim: hidden width of the projection head, from ``prj.1.weight`` (None: Coconut has no head).
        prj_layernorm: whether the head ends in ``prj.ln`` (absent when trained with ``prj_no_ln``).
        n_layers: number of transformer layers found.
        vocab: rows of the token embedding (V + 3 for a valid checkpoint).
        auxiliary_keys: how many tensors belong to SIM-CoT's auxiliary decoder (0: none; never read).
    """

    family: Family
    uses_lora: bool
    lora_rank: int | None
    prj_dim: int | None
    prj_layernorm: bool
    n_layers: int
    vocab: int
    method: str = "codi"
    auxiliary_keys: int = 0

    @property
    def trained_with(self) -> str:
        """The training method: SIM-CoT when the file holds its auxiliary decoder, else the loop's method."""
        return "SIM-CoT" if self.auxiliary_keys else METHOD_NAMES[self.method]

    @property
    def prefix(self) -> str:
        """Key prefix of the base LM's modules (CODI: ``codi.base_model.model.`` with LoRA, else ``codi.``;
        Coconut: ``base_causallm.``; PCCoT's adapter and base shown together, none)."""
        if self.method == "coconut":
            return COCONUT_PREFIX
        if self.method == "pccot":
            return ""
        return LORA_PREFIX if self.uses_lora else PLAIN_PREFIX

    @property
    def embed_key(self) -> str:
        return _embedding_key(self.prefix, self.family)


def resolve_checkpoint_file(checkpoint: str | Path) -> Path:
    """The weights file of ``checkpoint``: the file itself, the one CODI file inside a directory, or the
    file of a shipped model named like ``"toy-arith"``."""
    path = PRETRAINED.get(str(checkpoint), Path(checkpoint))
    if path.is_file():
        return path
    if not path.is_dir():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    found = [path / name for name in CHECKPOINT_FILENAMES if (path / name).is_file()]
    if not found:
        present = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} holds none of {CHECKPOINT_FILENAMES}; it contains {present}"
        )
    return found[0]


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    size = path.stat().st_size
    return CheckpointError(
        f"checkpoint file {str(path)!r} ({size:,} bytes) could not be read; it looks truncated "
        f"or corrupt: {type(exc).__name__}: {exc}"
    )


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """Load every tensor of a ``.safetensors`` or ``.bin`` file, memory-mapped where possible."""
    path = resolve_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError) as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat state dict of tensors")
    return state


class LazyTensors(Mapping[str, Tensor]):
    """Tensors by name, each read when looked up: a subclass sets ``_keys`` (the names, in order) and
    ``__getitem__``."""

    _keys: dict[str, None]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class CheckpointTensors(LazyTensors):
    """The tensors of a checkpoint file, each read when it is looked up.

    A ``.safetensors`` file is opened for each lookup and closed after it, so at most one tensor's pages of
    the file are mapped at a time and a loader that copies tensor by tensor holds one tensor, not the file.
    A ``.bin`` file (a pickle) is memory-mapped whole (``torch.load(mmap=True)``): the pages it reads stay
    resident until the mapping is dropped.
    """

    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint_file(path)
        if self.path.suffix == ".safetensors":
            self._keys = dict.fromkeys(read_tensor_info(self.path))
            self._loaded: dict[str, Tensor] | None = None
        else:
            self._loaded = load_tensors(self.path)
            self._keys = dict.fromkeys(self._loaded)

    def __getitem__(self, key: str) -> Tensor:
        if self._loaded is not None:
            return self._loaded[key]
        if key not in self._keys:
            raise KeyError(key)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(key)
        except SafetensorError as exc:
            raise _unreadable(self.path, exc) from exc


def read_tensor_info(path: str | Path) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor in the file, without reading safetensors data."""
    path = resolve_checkpoint_file(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                info = {}
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = f.get_slice(key)
                    info[key] = TensorInfo(tuple(sl.get_shape()), str(sl.get_dtype()))
        except SafetensorError as exc:
            raise _unreadable(path, exc) from exc
        _check_safetensors_complete(path, info)
        return info
    return {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in load_tensors(path).items()}


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_safetensors_complete(path: Path, info: dict[str, TensorInfo]) -> None:
    """A truncated safetensors file still has a readable header; compare its size with the header's."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    needed = 8 + header_len
    for t in info.values():
        n = 1
        for s in t.shape:
            n *= s
        needed += n * _ST_ITEMSIZE.get(t.dtype.upper(), 1)
    actual = path.stat().st_size
    if actual < needed:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is truncated: its header describes {needed:,} bytes "
            f"of tensors but the file has {actual:,}"
        )


def _family_of(keys: set[str]) -> Family | None:
    if any(".transformer.wte." in k or k.startswith("transformer.wte.") for k in keys):
        return "gpt2"
    if any(".embed_tokens." in k or k.startswith("model.embed_tokens.") for k in keys):
        return "llama"
    return None


def describe_contents(info: dict[str, TensorInfo]) -> str:
    """A one-line guess of what a state dict is, for error messages."""
    keys = set(info)
    family = _family_of(keys)
    fam = {"llama": "LLaMA", "gpt2": "GPT-2", None: "unknown-architecture"}[family]
    has_codi = any(k.startswith(PLAIN_PREFIX) for k in keys)
    has_prj = any(k.startswith("prj.") for k in keys)
    if not keys:
        return "an empty state dict"
    if any(k.startswith(COCONUT_PREFIX) for k in keys):
        decoder = _sim_cot_note(keys, "coconut")
        return f"a Coconut {fam} checkpoint (no projection head){decoder}, {len(keys)} tensors"
    if not has_codi and family is not None:
        return (
            f"a plain Hugging Face {fam} state dict without CODI or Coconut parts (no 'codi.' or "
            "'base_causallm.' prefix, no 'prj.' head)"
        )
    if not has_codi:
        return "neither a CODI nor a Coconut checkpoint (no 'codi.' or 'base_causallm.' keys)"
    lora = "with LoRA" if any(".lora_A." in k for k in keys) else "without LoRA"
    head = "with projection head" if has_prj else "WITHOUT a projection head ('prj.' keys missing)"
    return f"a CODI {fam} checkpoint {lora}, {head}{_sim_cot_note(keys, 'codi')}, {len(keys)} tensors"


def _sim_cot_keys(keys: set[str], method: str) -> list[str]:
    return sorted(k for k in keys if k.startswith(SIM_COT_DECODER[method]))


def _sim_cot_note(keys: set[str], method: str) -> str:
    n = len(_sim_cot_keys(keys, method))
    return f", with SIM-CoT's auxiliary decoder ({n} tensors, unused at inference)" if n else ""


def _check_sim_cot_decoder(info: dict[str, TensorInfo], method: str) -> int:
    """How many tensors SIM-CoT's auxiliary decoder holds, after checking they are one (its own token
    embedding present), so that stray keys under its prefixes are not waved through."""
    found = _sim_cot_keys(set(info), method)
    if not found:
        return 0
    lm = SIM_COT_DECODER[method][0]
    embeddings = [f"{lm}model.embed_tokens.weight", f"{lm}transformer.wte.weight"]
    if not any(k in info for k in embeddings):
        raise CheckpointError(
            f"{len(found)} key(s) under {'/'.join(SIM_COT_DECODER[method])} ({key_listing(found)}) look like SIM-CoT's "
            f"auxiliary decoder, but it has no token embedding ({' or '.join(embeddings)}); the file is "
            f"{describe_contents(info)}"
        )
    return len(found)


def _layer_count(keys: set[str], prefix: str, family: Family) -> int:
    layer_pat = re.compile(
        re.escape(prefix) + (r"transformer\.h\.(\d+)\." if family == "gpt2" else r"model\.layers\.(\d+)\.")
    )
    layers = {int(m.group(1)) for k in keys if (m := layer_pat.match(k))}
    return max(layers) + 1 if layers else 0


def _embedding_key(prefix: str, family: Family) -> str:
    return f"{prefix}{'transformer.wte' if family == 'gpt2' else 'model.embed_tokens'}.weight"


def _coconut_layout(info: dict[str, TensorInfo]) -> CheckpointLayout:
    keys = set(info)
    family = _family_of({k for k in keys if k.startswith(COCONUT_PREFIX)})
    embed = None if family is None else _embedding_key(COCONUT_PREFIX, family)
    if embed not in info:
        raise CheckpointError(
            f"a Coconut checkpoint without its token embedding; the file is {describe_contents(info)}"
        )
    return CheckpointLayout(
        family=family,
        uses_lora=False,
        lora_rank=None,
        prj_dim=None,
        prj_layernorm=False,
        n_layers=_layer_count(keys, COCONUT_PREFIX, family),
        vocab=info[embed].shape[0],
        method="coconut",
        auxiliary_keys=_check_sim_cot_decoder(info, "coconut"),
    )


def detect_layout(info: dict[str, TensorInfo]) -> CheckpointLayout:
    """Read the method (CODI or Coconut), family, LoRA rank, projection width and layer count from the keys
    and shapes."""
    keys = set(info)
    if any(k.startswith(COCONUT_PREFIX) for k in keys):
        return _coconut_layout(info)
    family = _family_of({k for k in keys if k.startswith(PLAIN_PREFIX)})
    if family is None or "prj.1.weight" not in keys:
        raise CheckpointError(f"neither a CODI nor a Coconut checkpoint: the file is {describe_contents(info)}")
    lora_a = sorted(k for k in keys if ".lora_A." in k)
    uses_lora = bool(lora_a)
    prefix = LORA_PREFIX if uses_lora else PLAIN_PREFIX
    embed = _embedding_key(prefix, family)
    if embed not in info:
        raise CheckpointError(f"embedding {embed!r} missing; the file is {describe_contents(info)}")
    return CheckpointLayout(
        family=family,
        uses_lora=uses_lora,
        lora_rank=info[lora_a[0]].shape[0] if uses_lora else None,
        prj_dim=info["prj.1.weight"].shape[0],
        prj_layernorm="prj.ln.weight" in keys,
        n_layers=_layer_count(keys, prefix, family),
        vocab=info[embed].shape[0],
        auxiliary_keys=_check_sim_cot_decoder(info, "codi"),
    )


def _lora_entries(
    module: str, out_dim: int, in_dim: int, layout: CheckpointLayout, *, conv1d: bool, bias: bool
) -> dict[str, tuple[int, ...]]:
    """Keys of one projection: plain weight, or peft ``base_layer`` + ``lora_A``/``lora_B``.

    ``conv1d`` (GPT-2) stores the base weight as (in, out); LoRA A/B are (r, in) / (out, r) either way.
    """
    weight_shape = (in_dim, out_dim) if conv1d else (out_dim, in_dim)
    if not layout.uses_lora:
        entries = {f"{module}.weight": weight_shape}
        if bias:
            entries[f"{module}.bias"] = (out_dim,)
        return entries
    r = layout.lora_rank
    entries = {
        f"{module}.base_layer.weight": weight_shape,
        f"{module}.lora_A.default.weight": (r, in_dim),
        f"{module}.lora_B.default.weight": (out_dim, r),
    }
    if bias:
        entries[f"{module}.base_layer.bias"] = (out_dim,)
    return entries


def projection_widths(arch: BaseArchitecture) -> dict[str, tuple[int, int]]:
    """Every projection of a transformer block, by its HF path inside the block (``self_attn.q_proj``,
    ``attn.c_attn``), with its ``(out, in)`` widths (the modules LoRA wraps)."""
    d, q_out, kv_out = arch.d_model, arch.n_heads * arch.d_head, arch.n_kv_heads * arch.d_head
    if arch.family == "gpt2":
        return {
            "attn.c_attn": (3 * d, d),
            "attn.c_proj": (d, d),
            "mlp.c_fc": (arch.d_mlp, d),
            "mlp.c_proj": (d, arch.d_mlp),
        }
    return {
        "self_attn.q_proj": (q_out, d),
        "self_attn.k_proj": (kv_out, d),
        "self_attn.v_proj": (kv_out, d),
        "self_attn.o_proj": (d, q_out),
        "mlp.gate_proj": (arch.d_mlp, d),
        "mlp.up_proj": (arch.d_mlp, d),
        "mlp.down_proj": (d, arch.d_mlp),
    }


def _llama_expected(arch: BaseArchitecture, layout: CheckpointLayout) -> dict[str, tuple[int, ...]]:
    p, d, v = layout.prefix, arch.d_model, arch.codi_vocab
    expected: dict[str, tuple[int, ...]] = {
        f"{p}model.embed_tokens.weight": (v, d),
        f"{p}model.norm.weight": (d,),
        f"{p}lm_head.weight": (v, d),
    }
    widths = projection_widths(arch)
    for i in range(arch.n_layers):
        layer = f"{p}model.layers.{i}"
        for module, (out_dim, in_dim) in widths.items():
            expected.update(_lora_entries(f"{layer}.{module}", out_dim, in_dim, layout, conv1d=False, bias=False))
        expected[f"{layer}.input_layernorm.weight"] = (d,)
        expected[f"{layer}.post_attention_layernorm.weight"] = (d,)
    return expected


def _gpt2_expected(arch: BaseArchitecture, layout: CheckpointLayout) -> dict[str, tuple[int, ...]]:
    p, d, v = layout.prefix, arch.d_model, arch.codi_vocab
    n_pos = arch.hf_config.get("n_positions", 1024)
    expected: dict[str, tuple[int, ...]] = {
        f"{p}transformer.wte.weight": (v, d),
        f"{p}transformer.wpe.weight": (n_pos, d),
        f"{p}transformer.ln_f.weight": (d,),
        f"{p}transformer.ln_f.bias": (d,),
        f"{p}lm_head.weight": (v, d),
    }
    widths = projection_widths(arch)
    for i in range(arch.n_layers):
        layer = f"{p}transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            expected[f"{layer}.{ln}.weight"] = (d,)
            expected[f"{layer}.{ln}.bias"] = (d,)
        for module, (out_dim, in_dim) in widths.items():
            expected.update(_lora_entries(f"{layer}.{module}", out_dim, in_dim, layout, conv1d=True, bias=True))
    return expected


def expected_tensors(
    arch: BaseArchitecture, layout: CheckpointLayout, present: set[str] = frozenset()
) -> dict[str, tuple[int, ...]]:
    """Every key (and its shape) a checkpoint of this base and layout must hold, and no others (a Coconut
    file's ``embedding.weight`` is expected when ``present`` holds it: upstream saves it, a converted file
    may drop it)."""
    expected = (_gpt2_expected if arch.family == "gpt2" else _llama_expected)(arch, layout)
    d = arch.d_model
    if layout.method == "coconut":
        if COCONUT_EMBEDDING in present:
            expected[COCONUT_EMBEDDING] = (arch.codi_vocab, d)
        return expected
    expected.update(
        {
            "prj.1.weight": (layout.prj_dim, d),
            "prj.1.bias": (layout.prj_dim,),
            "prj.3.weight": (d, layout.prj_dim),
            "prj.3.bias": (d,),
        }
    )
    if layout.prj_layernorm:
        expected.update({"prj.ln.weight": (d,), "prj.ln.bias": (d,)})
    return expected


def key_listing(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    more = f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"{shown}{more}"


def key_problems(
    info: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]], *, ignored: set[str] = frozenset()
) -> list[str]:
    """What is wrong with a file's keys against ``expected`` (key -> shape), one phrase per kind: missing,
    unexpected (``ignored`` aside) and mis-shaped keys, each listed (the first few, with counts)."""
    missing = sorted(set(expected) - set(info))
    unexpected = sorted(set(info) - set(expected) - ignored)
    wrong_shape = sorted(k for k in set(expected) & set(info) if tuple(info[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {key_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {key_listing(unexpected)}")
    if wrong_shape:
        detail = [f"{k} has {info[k].shape}, expected {expected[k]}" for k in wrong_shape]
        problems.append(f"{len(wrong_shape)} key(s) with the wrong shape: {key_listing(detail)}")
    return problems


def _structural_mismatch(info: dict[str, TensorInfo], arch: BaseArchitecture, layout: CheckpointLayout) -> str | None:
    """A whole-file explanation (wrong family, depth or vocabulary) that beats a list of keys."""
    fam = {"llama": "LLaMA", "gpt2": "GPT-2"}
    method = METHOD_NAMES[layout.method]
    if layout.family != arch.family:
        return (
            f"the checkpoint is a {fam[layout.family]} {method} checkpoint but the base "
            f"{arch.source!r} is a {fam[arch.family]} model"
        )
    if layout.n_layers != arch.n_layers:
        return (
            f"the checkpoint has {layout.n_layers} transformer layers but the base {arch.source!r} has {arch.n_layers}"
        )
    if layout.vocab != arch.codi_vocab:
        hint = f" (the vocabulary was not grown by the 3 {method} tokens)" if layout.vocab == arch.base_vocab else ""
        return (
            f"embedding {layout.embed_key!r} has {layout.vocab} rows but a {method} checkpoint for base "
            f"{arch.source!r} needs V + {N_CODI_TOKENS} = {arch.codi_vocab}{hint}"
        )
    return None


def validate_checkpoint(
    info: dict[str, TensorInfo], arch: BaseArchitecture, *, path: str = "checkpoint"
) -> CheckpointLayout:
    """Check a checkpoint against the base architecture; return its layout or raise CheckpointError.

    Every expected key must be present, none may be unexpected, every shape must match. The error
    names the offending keys (the first few, with counts) and what the file seems to be.
    """
    layout = detect_layout(info)
    structural = _structural_mismatch(info, arch, layout)
    if structural:
        raise CheckpointError(f"{path}: {structural}; the file is {describe_contents(info)}")
    auxiliary = set(_sim_cot_keys(set(info), layout.method))
    problems = key_problems(info, expected_tensors(arch, layout, set(info)), ignored=auxiliary)
    if problems:
        raise CheckpointError(
            f"{path} does not match base {arch.source!r}: "
            + "; ".join(problems)
            + f". The file is {describe_contents(info)}."
        )
    return layout
