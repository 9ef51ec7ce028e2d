"""An independent HF implementation of Coconut inference (upstream ``coconut.py``'s ``generate``).

It follows upstream one question at a time: the input is ``question + "\\n"`` tokenized as the tokenizer
does, then ``<|start-latent|>``, ``n`` ``<|latent|>`` placeholders and ``<|end-latent|>``. Pass ``i`` runs
the LM over every position before the ``i``-th placeholder and writes the last layer's hidden state
(``hidden_states[-1]``, after the final norm) at the position before it into that placeholder's
embedding. A final pass over the whole input gives the first answer token; every further token is a
fresh forward over the whole sequence (upstream decodes without a KV cache), greedy over the whole
vocabulary, stopping at EOS (upstream keeps the first token whatever it is). It shares no code with
codi_lens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer
from upstream_factory import COCONUT_ADDED, build_coconut_module


class ReferenceCoconut:
    def __init__(self, module, tokenizer):
        self.module = module
        self.model = module.base_causallm
        self.embedding = module.embedding
        self.tokenizer = tokenizer
        self.start_id, self.end_id, self.latent_id = tokenizer.convert_tokens_to_ids(list(COCONUT_ADDED))
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_checkpoint(cls, checkpoint_file, base_dir) -> ReferenceCoconut:
        """Upstream's module built from ``base_dir``'s config, the checkpoint loaded with ``strict=True``; the
        base tokenizer with Coconut's three tokens added as ``run.py`` adds them."""
        state = torch.load(Path(checkpoint_file), weights_only=True)
        module = build_coconut_module(base_dir)
        module.load_state_dict(state, strict=True)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        for token in COCONUT_ADDED:
            tokenizer.add_tokens(token)
        return cls(module.eval(), tokenizer)

    def input_ids(self, question: str, n_latents: int) -> list[int]:
        question_ids = self.tokenizer.encode(question + "\n", add_special_tokens=True)
        return question_ids + [self.start_id] + [self.latent_id] * n_latents + [self.end_id]

    def _hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]

    @torch.no_grad()
    def run(self, question: str, n_latents: int = 6, max_new_tokens: int = 32) -> dict:
        """``latent_states`` ``[n + 1, d_model]`` (the hidden states written into the placeholders, then the
        state at the last placeholder, whose successor is ``<|end-latent|>``), the first answer token's
        logits, the answer tokens and text."""
        ids = self.input_ids(question, n_latents)
        embeds = self.embedding(torch.tensor([ids]))
        placeholders = [i for i, t in enumerate(ids) if t == self.latent_id]
        states = []
        for position in placeholders:
            hidden = self._hidden(embeds[:, :position])[0, -1]
            states.append(hidden)
            embeds = embeds.clone()
            embeds[0, position] = hidden
        out = self.model(inputs_embeds=embeds, output_hidden_states=True)
        states.append(out.hidden_states[-1][0, len(ids) - 2])  # at the last placeholder
        first_logits = out.logits[0, -1]
        tokens = [int(first_logits.argmax())]
        for _ in range(max_new_tokens - 1):
            embeds = torch.cat([embeds, self.embedding(torch.tensor([[tokens[-1]]]))], dim=1)
            token = int(self.model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == self.eos_id:
                break
            tokens.append(token)
        return {
            "latent_states": torch.stack(states),
            "first_logits": first_logits,
            "answer_tokens": tokens,
            "answer_text": self.tokenizer.decode(tokens, skip_special_tokens=True),
        }
