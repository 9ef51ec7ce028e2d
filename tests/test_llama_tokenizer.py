"""The Llama 3 tokenizer built offline from Meta's llama-models, against Meta's own tiktoken class."""

from __future__ import annotations

import shutil

import pytest
from conftest import require

from codi_lens import load_codi
from codi_lens.data import load_problems
from codi_lens.loading.checkpoint import CheckpointError
from codi_lens.loading.llama_tokenizer import (
    CACHE_NAME,
    LLAMA3_TOKENIZER_SHA256,
    convert_llama3_tokenizer,
    llama3_tokenizer,
    llama3_tokenizer_model,
)

meta_tokenizer = require("llama_models.llama3.tokenizer", "needs the extra codi-lens[llama]")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return llama3_tokenizer(cache), cache


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer.Tokenizer(llama3_tokenizer_model())


def test_ids_equal_metas_tiktoken_class_on_every_gsm8k_question_and_answer(built, meta):
    tokenizer, _ = built
    texts = [
        t for split in ("gsm8k:test", "gsm8k:train") for p in load_problems(split) for t in (p.question, p.solution)
    ]
    assert len(texts) == 2 * (1319 + 7473)
    ours = tokenizer(texts)["input_ids"]
    mismatched = [t for t, ids in zip(texts, ours) if ids != meta.encode(t, bos=True, eos=False)]
    assert not mismatched, mismatched[:3]
    plain = tokenizer(texts[:50], add_special_tokens=False)["input_ids"]
    assert plain == [meta.encode(t, bos=False, eos=False) for t in texts[:50]]
    assert all(tokenizer.decode(ids, skip_special_tokens=True) == t for ids, t in zip(ours[:200], texts[:200]))


def test_special_tokens_bos_and_the_stop_token(built, meta):
    tokenizer, _ = built
    assert len(tokenizer) == 128257  # 128000 BPE + 256 special + CODI's [PAD]
    for name, index in meta.special_tokens.items():
        assert tokenizer.convert_tokens_to_ids(name) == index
    assert tokenizer.bos_token_id == meta.bos_id == 128000
    assert tokenizer.eos_token_id == meta.eot_id == 128009  # <|eot_id|>: where Llama-3.2-Instruct CODI stops
    assert tokenizer.pad_token_id == 128256  # CODI's pad = V
    ids = tokenizer("Natalia sold clips.")["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert "<|eot_id|>" in tokenizer.decode([*ids, 128009]) and "<|eot_id|>" not in tokenizer.decode(
        [*ids, 128009], skip_special_tokens=True
    )


def test_built_once_then_loaded_from_the_cache(built, tmp_path):
    tokenizer, cache = built
    stamp = (cache / CACHE_NAME / "tokenizer.json").stat().st_mtime_ns
    again = llama3_tokenizer(cache)
    assert (cache / CACHE_NAME / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again("48 / 2 = 24")["input_ids"] == tokenizer("48 / 2 = 24")["input_ids"]
    assert LLAMA3_TOKENIZER_SHA256 in (cache / CACHE_NAME / "codi_lens_source.json").read_text()


def test_a_file_with_another_hash_is_refused_by_name(tmp_path):
    copy = tmp_path / "tokenizer.model"
    shutil.copy(llama3_tokenizer_model(), copy)
    with open(copy, "a") as f:
        f.write("IQ== 999999\n")
    with pytest.raises(CheckpointError, match="tokenizer.model: SHA-256"):
        convert_llama3_tokenizer(copy)


def test_load_codi_with_the_builtin_llama_base_needs_no_tokenizer(tiny_checkpoint, monkeypatch, tmp_path):
    """A tiny upstream-layout file named against the built-in base loads its tokenizer from the cache; the
    layers do not match the real 1B base, so the loader refuses the weights by name after the tokenizer
    was found (the full-size check is the slow test in test_real_scale.py)."""
    monkeypatch.setenv("CODI_LENS_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="has 2 transformer layers but the base"):
        load_codi(tiny_checkpoint("llama").checkpoint_dir, "llama-3.2-1b-instruct")
    assert (tmp_path / CACHE_NAME / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="tokenizer= a local tokenizer directory"):
        load_codi(tiny_checkpoint("gpt2").checkpoint_dir, "gpt2")


def test_coconut_gets_llama3_without_codis_pad_and_its_three_tokens_at_v(built, tmp_path):
    """CODI's tokenizer holds ``[PAD]`` at 128256; Coconut's base is Llama 3's own 128,256 tokens, to which its
    ``run.py`` adds ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>`` as 128256..128258."""
    from codi_lens.loading.architectures import describe_base
    from codi_lens.loading.load import COCONUT_TOKENS, with_coconut_tokens

    with_pad, cache = built
    plain = llama3_tokenizer(cache, codi_pad=False)
    assert (len(with_pad), len(plain)) == (128257, 128256) and plain.pad_token is None
    assert with_pad.convert_tokens_to_ids("[PAD]") == 128256
    question = "Janet's ducks lay 16 eggs per day."
    assert plain(question)["input_ids"] == with_pad(question)["input_ids"]
    arch = describe_base("llama-3.2-1b-instruct")
    coconut = with_coconut_tokens(plain, arch)
    assert coconut.convert_tokens_to_ids(list(COCONUT_TOKENS)) == [128256, 128257, 128258]
    with pytest.raises(CheckpointError, match="the tokenizer has 128257 tokens"):
        with_coconut_tokens(with_pad, arch)
