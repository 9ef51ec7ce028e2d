"""An independent HF + peft implementation of CODI inference: the oracle codi_lens is tested against.

It follows upstream ``test.py`` one question at a time: the peft model with LoRA *unmerged*,
``inputs_embeds`` and a ``DynamicCache``, ``hidden_states[-1]`` as the latent, greedy decoding with
only the EOT id excluded. It shares no code with codi_lens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DynamicCache
from upstream_factory import build_codi_module


class ReferenceCODI:
    def __init__(self, module, tokenizer):
        self.module = module
        self.model = module.codi  # the (peft-wrapped) HF causal LM
        self.prj = module.prj
        self.tokenizer = tokenizer
        self.vocab = self.model.get_input_embeddings().weight.shape[0]  # V + 3
        self.bot_id, self.eot_id = self.vocab - 2, self.vocab - 1
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir,
        base_dir,
        *,
        lora_r,
        lora_alpha=32,
        use_lora=True,
        prj_dim,
        prj_ln=True,
        dtype=torch.float32,
        tokenizer=None,
    ) -> ReferenceCODI:
        """Upstream's module built from ``base_dir``'s config, the checkpoint loaded with ``strict=True``;
        the tokenizer is ``base_dir``'s unless one is given. A shipped toy model is its own base dir
        (``use_lora=False``)."""
        checkpoint_dir = Path(checkpoint_dir)
        st = checkpoint_dir / "model.safetensors"
        state = (
            load_file(str(st)) if st.exists() else torch.load(checkpoint_dir / "pytorch_model.bin", weights_only=True)
        )
        embeddings = next(v for k, v in state.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
        module = build_codi_module(
            base_dir,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            use_lora=use_lora,
            prj_dim=prj_dim,
            prj_ln=prj_ln,
            device="cpu",
            base_dtype=embeddings.dtype,  # as saved: bf16 upstream, float32 for the shipped toy models
        )
        module.load_state_dict(state, strict=True)
        del state
        module = module.to(dtype).eval()
        return cls(module, tokenizer or AutoTokenizer.from_pretrained(str(base_dir)))

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor([ids]))

    def _step(self, embeds: torch.Tensor, cache: DynamicCache):
        return self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, output_hidden_states=True)

    @torch.no_grad()
    def _latents(self, question: str, n_latents: int, replace: dict | None = None):
        """Question + BOT, then n fed-back thoughts; ``replace[k]`` (``[d_model]``) is fed at thought k
        (1-based) instead of the projection. Returns (cache, h_0..h_n, z_1..z_n, logits rows)."""
        ids = self.tokenizer(question.strip().replace("  ", " "))["input_ids"] + [self.bot_id]
        cache = DynamicCache()
        out = self._step(self._embed(ids), cache)
        states, thoughts, logits = [out.hidden_states[-1][0, -1]], [], [out.logits[0, -1]]
        for k in range(1, n_latents + 1):
            z = self.prj(states[-1]) if k not in (replace or {}) else replace[k].to(states[-1].dtype)
            thoughts.append(z)
            out = self._step(z[None, None], cache)
            states.append(out.hidden_states[-1][0, -1])
            logits.append(out.logits[0, -1])
        return cache, states, thoughts, logits

    @torch.no_grad()
    def logit_lens_at_latents(self, question: str, n_latents: int = 6) -> torch.Tensor:
        """``[n_layers + 1, n_latents + 1, vocab]``: HF's ``hidden_states`` at BOT and every thought of its own
        loop, read through the final norm and ``lm_head``. ``hidden_states[0]`` is the embedding output (with
        GPT-2's position embedding), ``[l]`` block l - 1's output; the last already has the final norm."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        norm = base.transformer.ln_f if hasattr(base, "transformer") else base.model.norm
        ids = self.tokenizer(question.strip().replace("  ", " "))["input_ids"] + [self.bot_id]
        cache = DynamicCache()
        out = self._step(self._embed(ids), cache)
        steps = [torch.stack([h[0, -1] for h in out.hidden_states])]
        for _ in range(n_latents):
            out = self._step(self.prj(out.hidden_states[-1][0, -1])[None, None], cache)
            steps.append(torch.stack([h[0, -1] for h in out.hidden_states]))
        states = torch.stack(steps, dim=1)  # [n_layers + 1, n_latents + 1, d_model]
        normed = torch.cat([norm(states[:-1]), states[-1:]])
        return self.model.get_output_embeddings()(normed)

    @torch.no_grad()
    def latents_given_thoughts(self, question: str, thoughts: torch.Tensor) -> torch.Tensor:
        """``h_0 .. h_n`` when ``thoughts`` (``[n, d_model]``, e.g. another implementation's) are fed instead
        of the reference's own projections: each step's computation compared on the same inputs."""
        ids = self.tokenizer(question.strip().replace("  ", " "))["input_ids"] + [self.bot_id]
        cache = DynamicCache()
        states = [self._step(self._embed(ids), cache).hidden_states[-1][0, -1]]
        for z in thoughts.to(states[0].dtype):
            states.append(self._step(z[None, None], cache).hidden_states[-1][0, -1])
        return torch.stack(states)

    @torch.no_grad()
    def run(self, question: str, n_latents: int = 6, max_new_tokens: int = 64, replace: dict | None = None) -> dict:
        cache, states, thoughts, logits = self._latents(question, n_latents, replace)
        next_embed, answer = self._embed([self.eot_id]), []
        for _ in range(max_new_tokens):
            out = self._step(next_embed, cache)
            logits.append(out.logits[0, -1])
            token = int(out.logits[0, -1, : self.vocab - 1].argmax())
            answer.append(token)
            if token == self.eos_id:
                break
            next_embed = self._embed([token])
        return {
            "latent_states": torch.stack(states),
            "thought_embeds": torch.stack(thoughts),
            "step_logits": torch.stack(logits),
            "answer_tokens": answer,
            "answer_text": self.tokenizer.decode(answer, skip_special_tokens=True),
        }

    @torch.no_grad()
    def run_batch(self, questions: list[str], n_latents: int = 6, max_new_tokens: int = 64) -> dict:
        """Several questions at once, as a batched HF loop would run them: left padding, an attention mask that
        grows with the cache and position ids counted from each row's first real token (so a row's numbers do
        not depend on its padding). Greedy; a row that reached EOS keeps being fed EOS until every row has.
        Returns ``latent_states`` ``[batch, n_latents + 1, d_model]`` and each row's ``answer_tokens``."""
        rows = [self.tokenizer(q.strip().replace("  ", " "))["input_ids"] + [self.bot_id] for q in questions]
        width = max(len(r) for r in rows)
        pad = self.eos_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        embed = self.model.get_input_embeddings()
        cache = DynamicCache()

        def step(embeds, mask):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]
            return self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                output_hidden_states=True,
            )

        out = step(embed(ids), mask)
        states = [out.hidden_states[-1][:, -1]]
        grow = torch.ones(len(rows), 1, dtype=mask.dtype)
        for _ in range(n_latents):
            mask = torch.cat([mask, grow], 1)
            out = step(self.prj(states[-1])[:, None], mask)
            states.append(out.hidden_states[-1][:, -1])
        next_ids, answers, done = torch.full((len(rows), 1), self.eot_id), [[] for _ in rows], [False] * len(rows)
        for _ in range(max_new_tokens):
            mask = torch.cat([mask, grow], 1)
            out = step(embed(next_ids), mask)
            tokens = out.logits[:, -1, : self.vocab - 1].argmax(-1)
            for i, token in enumerate(tokens.tolist()):
                if not done[i]:
                    answers[i].append(token)
                    done[i] = token == self.eos_id
            if all(done):
                break
            next_ids = torch.where(torch.tensor(done), self.eos_id, tokens)[:, None]
        return {"latent_states": torch.stack(states, 1), "answer_tokens": answers}

    @torch.no_grad()
    def teacher_forced_logits(self, question: str, answer, n_latents: int = 6, replace: dict | None = None):
        """Row j predicts answer token j (row 0 is the output at EOT). ``answer``: text or token ids;
        ``replace``: thoughts fed instead of the model's own (see ``_latents``)."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] if isinstance(answer, str) else list(answer)
        cache, *_ = self._latents(question, n_latents, replace)
        out = self._step(self._embed([self.eot_id] + ids[:-1]), cache)
        return out.logits[0]

    @torch.no_grad()
    def generate_plain(self, question: str, max_new_tokens: int = 32) -> list[int]:
        """Greedy decoding right after the question (no BOT, no thoughts), excluding only EOT."""
        ids = self.tokenizer(question.strip().replace("  ", " "))["input_ids"]
        cache = DynamicCache()
        out = self._step(self._embed(ids), cache)
        answer = []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1, : self.vocab - 1].argmax())
            answer.append(token)
            if token == self.eos_id:
                break
            out = self._step(self._embed([token]), cache)
        return answer
