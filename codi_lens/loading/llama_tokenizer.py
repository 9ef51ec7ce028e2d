"""The Llama 3 tokenizer without the gated Hugging Face repository.

Meta's package ``llama-models`` (installed by the extra ``codi-lens[llama]``) ships the Llama 3
``tokenizer.model`` (tiktoken BPE ranks, one ``base64-token rank`` line each). This module checks the
file's SHA-256, converts it with ``transformers``' ``TikTokenConverter`` (Meta's split pattern), appends
the 256 special tokens in id order (``<|begin_of_text|>`` = 128000 ... ``<|reserved_special_token_245|>``
= 128255) and CODI's ``[PAD]`` (128256), adds a post-processor that puts ``<|begin_of_text|>`` before
every text (what Meta's ``Tokenizer.encode(bos=True)`` does), sets ``<|eot_id|>`` (128009) as the EOS,
the stop token of Llama-3.2-Instruct CODI, and saves the result once into a cache directory.

Only the ``tokenizer.model`` file is read; nothing from ``llama_models`` is imported. The files written
are a derivative of Meta's Llama materials under the Llama 3.2 Community License (see
``checkpoints.md``): they are built on the user's machine and never shipped with codi_lens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from codi_lens.core.hashing import file_sha256
from codi_lens.loading.checkpoint import CheckpointError

LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
#: Meta's pre-tokenisation pattern for Llama 3 (``llama_models.llama3.tokenizer.Tokenizer.pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_BASE_TOKENS = 128000
N_SPECIAL_TOKENS = 256
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "[PAD]"
#: Subdirectory of the cache holding the built tokenizer (named by the source file's hash).
CACHE_NAME = f"llama3-tokenizer-{LLAMA3_TOKENIZER_SHA256[:12]}"
INSTALL_HINT = "install the extra: pip install 'codi-lens[llama]' (Meta's llama-models package ships the file)"


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3 special tokens in id order (id = 128000 + index)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(N_SPECIAL_TOKENS - len(named))]


def llama3_tokenizer_model() -> Path:
    """Where the installed ``llama-models`` keeps ``llama3/tokenizer.model`` (the package is located,
    not imported). Raises :class:`CheckpointError` saying how to install it."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"no Llama 3 tokenizer: the package llama-models is not installed; {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.exists():
        raise CheckpointError(f"no Llama 3 tokenizer: {path} is missing from llama-models; {INSTALL_HINT}")
    return path


def default_cache_dir() -> Path:
    """``$CODI_LENS_CACHE`` if set, else ``$XDG_CACHE_HOME/codi_lens`` (``~/.cache/codi_lens``)."""
    if os.environ.get("CODI_LENS_CACHE"):
        return Path(os.environ["CODI_LENS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "codi_lens"


def convert_llama3_tokenizer(model_file: str | Path, *, codi_pad: bool = True) -> PreTrainedTokenizerFast:
    """Convert a Llama 3 ``tokenizer.model`` to a fast tokenizer (checks the file's SHA-256 first). ``codi_pad``:
    with CODI's ``[PAD]`` as id 128256; without it the tokenizer is Llama 3's own 128,256 tokens (Coconut's
    base, to which it adds its own three)."""
    model_file = Path(model_file)
    digest = file_sha256(model_file)
    if digest != LLAMA3_TOKENIZER_SHA256:
        raise CheckpointError(
            f"{model_file}: SHA-256 {digest} is not the Llama 3 tokenizer.model ({LLAMA3_TOKENIZER_SHA256})"
        )
    specials = llama3_special_tokens()
    backend = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=specials)
    tokenizer = backend.converted()
    if tokenizer.get_vocab_size() != N_BASE_TOKENS + N_SPECIAL_TOKENS:
        raise CheckpointError(f"{model_file}: converted to {tokenizer.get_vocab_size()} tokens, expected 128256")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, N_BASE_TOKENS)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )
    if codi_pad:
        fast.add_special_tokens({"pad_token": PAD})  # CODI's [PAD] = 128256, the first row it appends
    return fast


def llama3_tokenizer(cache_dir: str | Path | None = None, *, codi_pad: bool = True) -> PreTrainedTokenizerFast:
    """The Llama 3 tokenizer, built into ``cache_dir`` (default :func:`default_cache_dir`) on first use
    from the installed ``llama-models``, then loaded from there (offline, no network); with CODI's ``[PAD]``
    unless ``codi_pad=False`` (each kind in its own folder)."""
    target = Path(cache_dir or default_cache_dir()) / (CACHE_NAME if codi_pad else f"{CACHE_NAME}-without-pad")
    marker = target / "codi_lens_source.json"
    if not marker.exists():
        source = llama3_tokenizer_model()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            convert_llama3_tokenizer(source, codi_pad=codi_pad).save_pretrained(str(staging))
            record = {
                "source": str(source),
                "sha256": LLAMA3_TOKENIZER_SHA256,
                "licence": "Llama 3.2 Community License",
            }
            (staging / marker.name).write_text(json.dumps(record, indent=2))
            if target.exists():  # an incomplete earlier build (no marker)
                shutil.rmtree(target)
            staging.replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)
