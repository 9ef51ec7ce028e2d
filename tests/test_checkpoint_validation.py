"""Strict checkpoint validation: every bad case raises CheckpointError naming what is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codi_lens import CheckpointError, load_codi
from codi_lens.loading.architectures import describe_base
from codi_lens.loading.inspect import format_summary, summarize_checkpoint
from experiments.inspect_checkpoint import main as inspect_main


def _state(ckpt) -> dict[str, torch.Tensor]:
    if ckpt.fmt == "safetensors":
        return load_file(str(ckpt.file))
    return torch.load(ckpt.file, weights_only=True)


def _save(state: dict[str, torch.Tensor], directory: Path, fmt: str = "safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama", "safetensors")


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    return tiny_checkpoint("gpt2", "bin")


def test_missing_key_is_named(llama, tmp_path):
    state = _state(llama)
    gone = "codi.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"
    del state[gone]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): '" + re.escape(gone)):
        load_codi(_save(state, tmp_path / "c"), llama.base_dir)


def test_unexpected_keys_are_named_with_counts(llama, tmp_path):
    state = _state(llama)
    for i in range(7):
        state[f"extra.{i}"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"7 unexpected key\(s\): 'extra.0'.*\(\+2 more\)"):
        load_codi(_save(state, tmp_path / "c"), llama.base_dir)


def test_wrong_shape_is_named(llama, tmp_path):
    state = _state(llama)
    key = "prj.3.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    with pytest.raises(CheckpointError, match=re.escape(key) + r" has \(64, 97\), expected \(64, 96\)"):
        load_codi(_save(state, tmp_path / "c"), llama.base_dir)


def test_gpt2_checkpoint_with_llama_base(gpt2, llama):
    with pytest.raises(CheckpointError, match="GPT-2 CODI checkpoint but the base .* is a LLaMA model"):
        load_codi(gpt2.checkpoint_dir, llama.base_dir)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(tiny_checkpoint, tmp_path, fmt):
    ckpt = tiny_checkpoint("llama", fmt)
    data = ckpt.file.read_bytes()
    target = tmp_path / "c"
    target.mkdir()
    (target / ckpt.file.name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_codi(target, ckpt.base_dir)


def test_plain_hf_model_without_codi_parts(llama, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama.base_dir))
    _save(hf.state_dict(), tmp_path / "c")
    with pytest.raises(CheckpointError, match="plain Hugging Face LLaMA state dict without CODI or Coconut parts"):
        load_codi(tmp_path / "c", llama.base_dir)


def test_vocabulary_not_grown(llama, tmp_path):
    state = _state(llama)
    for key in list(state):
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[key] = state[key][:-3]
    with pytest.raises(CheckpointError, match="was not grown by the 3 CODI tokens"):
        load_codi(_save(state, tmp_path / "c"), llama.base_dir)


def test_layer_count_mismatch(llama, tmp_path):
    state = {k: v for k, v in _state(llama).items() if ".layers.1." not in k}
    with pytest.raises(CheckpointError, match="has 1 transformer layers but the base .* has 2"):
        load_codi(_save(state, tmp_path / "c"), llama.base_dir)


def test_checkpoint_without_projection_head(llama, tmp_path):
    state = {k: v for k, v in _state(llama).items() if not k.startswith("prj.")}
    with pytest.raises(CheckpointError, match=r"WITHOUT a projection head"):
        load_codi(_save(state, tmp_path / "c"), llama.base_dir)


def test_directory_without_weights(llama, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="holds none of .*notes.txt"):
        load_codi(tmp_path, llama.base_dir)


def test_builtin_gpt2_base_needs_a_local_tokenizer(gpt2):
    with pytest.raises(CheckpointError, match="pass tokenizer="):
        load_codi(gpt2.checkpoint_dir, "gpt2")


def test_file_path_and_directory_load_the_same(llama):
    a = load_codi(llama.file, llama.base_dir)
    b = load_codi(llama.checkpoint_dir, llama.base_dir)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bot_eot_rows_come_from_the_checkpoint(llama):
    model = load_codi(llama.checkpoint_dir, llama.base_dir)
    state = _state(llama)
    embed = state["codi.base_model.model.model.embed_tokens.weight"].float()
    v = describe_base(llama.base_dir).base_vocab
    assert (model.codi_tokens.pad, model.codi_tokens.bot, model.codi_tokens.eot) == (v, v + 1, v + 2)
    assert torch.equal(model.W_E[v + 1], embed[v + 1]) and torch.equal(model.W_E[v + 2], embed[v + 2])
    assert embed[v + 1].abs().sum() > 0


def test_inspect_checkpoint_summary(gpt2, capsys):
    summary = summarize_checkpoint(gpt2.checkpoint_dir)
    state = _state(gpt2)
    assert summary["family"] == "gpt2" and summary["n_layers"] == 2
    assert summary["lora"] and summary["lora_rank"] == 8
    assert summary["prj_dims"] == [64, 96, 64] and summary["prj_layernorm"]
    assert summary["n_keys"] == len(state)
    assert summary["vocab"] == state["codi.base_model.model.transformer.wte.weight"].shape[0]
    assert sum(summary["dtypes"].values()) == len(state)
    assert "rank 8" in format_summary(summary)
    inspect_main([str(gpt2.checkpoint_dir), "--json"])
    assert json.loads(capsys.readouterr().out)["n_keys"] == len(state)


@pytest.mark.parametrize("family, fmt", [("llama", "safetensors"), ("gpt2", "bin")])
def test_tensors_read_on_lookup_equal_the_file(tiny_checkpoint, family, fmt):
    """``CheckpointTensors`` (what the loader reads from, one tensor per lookup) holds the file's keys
    and, for each, the file's tensor bit for bit; an absent key is a KeyError."""
    from codi_lens.loading.checkpoint import CheckpointTensors

    ckpt = tiny_checkpoint(family, fmt)
    expected, lazy = _state(ckpt), CheckpointTensors(ckpt.checkpoint_dir)
    assert sorted(lazy) == sorted(expected) and len(lazy) == len(expected)
    for key, value in expected.items():
        assert key in lazy and lazy[key].dtype == value.dtype and torch.equal(lazy[key], value)
    assert "codi.no_such_key" not in lazy
    with pytest.raises(KeyError, match="codi.no_such_key"):
        lazy["codi.no_such_key"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loading_holds_one_part_at_a_time(tiny_checkpoint, family, monkeypatch):
    """Loading reads the embeddings, then the final norm and unembedding, then each block, then the projection:
    when it first reads a part's tensor, no tensor it read for an earlier part is still referenced, so the two
    vocabulary-sized matrices are never held at once, nor two blocks (at the 1B shape each is 0.5 GB in bf16)."""
    import re
    import weakref

    from codi_lens.loading import load as load_module
    from codi_lens.loading.checkpoint import CheckpointTensors

    def part_of(key: str) -> str:
        block = re.search(r"\.(?:layers|h)\.(\d+)\.", key)
        if block:
            return f"block {block.group(1)}"
        if re.search(r"\.(embed_tokens|wte|wpe)\.", key):
            return "embeddings"
        return "projection" if key.startswith("prj.") else "head"

    reads: list[tuple[str, weakref.ref]] = []
    held_at_switch: dict[str, set[str]] = {}

    class Recording(CheckpointTensors):
        def __getitem__(self, key: str) -> torch.Tensor:
            tensor = super().__getitem__(key)
            part = part_of(key)
            if reads and reads[-1][0] != part:
                held_at_switch[part] = {p for p, ref in reads if p != part and ref() is not None}
            reads.append((part, weakref.ref(tensor)))
            return tensor

    monkeypatch.setattr(load_module, "CheckpointTensors", Recording)
    ckpt = tiny_checkpoint(family, "safetensors")
    load_codi(ckpt.checkpoint_dir, ckpt.base_dir)
    assert reads[0][0] == "embeddings" and set(held_at_switch) == {"head", "block 0", "block 1", "projection"}
    assert held_at_switch == {part: set() for part in held_at_switch}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_part_by_part_equals_converting_the_whole_state_at_once(llama, dtype):
    """The loader converts the embeddings and each block separately; the result equals TransformerLens'
    converter run once over the whole merged state (LoRA merged by hand here: W + alpha/r * B @ A in float32),
    every parameter bit for bit, in float32 and bfloat16."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    model = load_codi(llama.checkpoint_dir, llama.base_dir, dtype=dtype)
    state, prefix = _state(llama), "codi.base_model.model."
    merged = {}
    for key, value in state.items():
        if ".lora_" in key or not key.startswith(prefix):
            continue
        name = key.removeprefix(prefix).replace(".base_layer", "")
        if ".base_layer." in key and key.endswith("weight"):
            module = key.removesuffix("base_layer.weight")
            lora_a, lora_b = state[f"{module}lora_A.default.weight"].float(), state[f"{module}lora_B.default.weight"]
            rank = lora_a.shape[0]
            value = value.float() + (32 / rank) * (lora_b.float() @ lora_a)
        merged[name] = value.float()

    class Node:  # attribute access over the merged names, as an HF model's modules
        def __init__(self, path: str = ""):
            self.path = path

        def __getattr__(self, name):
            full = f"{self.path}{name}"
            return merged[full] if full in merged else Node(f"{full}.")

        def __getitem__(self, index):
            return Node(f"{self.path}{index}.")

    whole = convert_llama_weights(Node(), model.cfg)
    params = dict(model.named_parameters())
    for name, value in whole.items():
        assert torch.equal(params[name], value.to(dtype)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_transposed_weight_is_copied_in_blocks_to_the_same_values(dtype):
    from codi_lens.loading.load import TRANSPOSE_BLOCK, copy_weight

    source = torch.randn(2 * TRANSPOSE_BLOCK + 37, 24).to(dtype)  # [d_vocab, d_model], like lm_head.weight
    blocked, plain = torch.empty(24, source.shape[0]), torch.empty(24, source.shape[0])
    copy_weight(blocked, source.T)
    plain.copy_(source.T)
    assert torch.equal(blocked, plain) and torch.equal(blocked, source.T.float())
    laid_out = torch.empty(source.shape[0], 24).t()  # a parameter stored in another order: one plain copy
    copy_weight(laid_out, source.T)
    assert torch.equal(laid_out, plain)
