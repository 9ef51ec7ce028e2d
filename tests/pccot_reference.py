"""An independent HF + peft implementation of PCCoT inference (upstream ``modeling_gpt2.py``'s forward and
``generate.py``), one question at a time.

Upstream feeds ``question (with the tokenizer's special tokens) + <pcot.bot> + n x <pcot.latent>`` as token
ids; the last layer's hidden states (``hidden_states[-1]``, after the final norm) at BOT and at the first
``n - 1`` latent tokens, each through ``prj``, are the first latent inputs. Then ``num_iterations`` times it
runs the ``n`` latent inputs together after the question + BOT and sets latent ``i`` to ``prj`` of the
hidden state at latent ``i - 1`` (latent 1 keeps ``prj(h_BOT)``). The answer reads the keys and values of
the last iteration's inputs: ``<pcot.eot>`` and the answer prompt (``"The answer is:"``) are fed after
them, then greedy tokens over every row until EOS.

Every forward here runs over the whole sequence without a KV cache (the same attention, as the cache only
saves recomputation). The weights come from peft's own ``PeftModel.from_pretrained`` on the base directory's
HF model. It shares no code with codi_lens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pccot_factory import PCCOT_ADDED, build_pccot_module
from peft import PeftModel
from transformers import AutoTokenizer


class ReferencePCCoT:
    def __init__(self, model, tokenizer, n_latents: int, n_sweeps: int, answer_prompt: str):
        self.model = model
        self.module = model.base_model.model
        self.tokenizer = tokenizer
        self.n_latents, self.n_sweeps = n_latents, n_sweeps
        self.bot, self.eot, self.latent = tokenizer.convert_tokens_to_ids(list(PCCOT_ADDED))
        self.prompt_ids = tokenizer.encode(answer_prompt, add_special_tokens=False)
        self.eos = tokenizer.eos_token_id

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, base_dir) -> ReferencePCCoT:
        checkpoint_dir = Path(checkpoint_dir)
        config = json.loads((checkpoint_dir / "config.json").read_text())
        args = json.loads((checkpoint_dir / "pccot_args.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        module = build_pccot_module(base_dir, tokenizer, use_projection=config["use_projection"])
        model = PeftModel.from_pretrained(module, str(checkpoint_dir)).eval()
        return cls(model, tokenizer, args["num_latent_tokens"], config["num_iterations"], args["answer_prompt"])

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.module.get_input_embeddings()(torch.tensor([ids]))

    def _out(self, embeds: torch.Tensor):
        return self.model(inputs_embeds=embeds, output_hidden_states=True)

    @torch.no_grad()
    def run(self, question: str, max_new_tokens: int = 16) -> dict:
        """``sweep_hidden`` ``[n_sweeps + 1, n, d_model]`` (hidden states at the latent positions: sweep 0 over
        the latent tokens, then each iteration), ``fed`` ``[n_sweeps + 1, n, d_model]`` (each sweep's inputs),
        ``h_bot`` ``[d_model]``, the first answer token's logits, the answer tokens (EOS included when
        reached) and text."""
        prefix = self.tokenizer(question, add_special_tokens=True)["input_ids"] + [self.bot]
        width, n = len(prefix), self.n_latents
        sweep0 = self.embed(prefix + [self.latent] * n)
        hidden = self._out(sweep0).hidden_states[-1][0]
        h_bot = hidden[width - 1]
        fed = [sweep0[0, width:]]
        sweep_hidden = [hidden[width:]]
        latents = self.module.project(hidden[width - 1 : width - 1 + n])
        for _ in range(self.n_sweeps):
            fed.append(latents)
            hidden = self._out(torch.cat([self.embed(prefix), latents[None]], dim=1)).hidden_states[-1][0, width:]
            sweep_hidden.append(hidden)
            latents = torch.cat([latents[:1], self.module.project(hidden[:-1])], dim=0)
        tail = self.embed([self.eot] + self.prompt_ids)
        embeds = torch.cat([self.embed(prefix), fed[-1][None], tail], dim=1)
        first_logits = self._out(embeds).logits[0, -1]
        tokens = [int(first_logits.argmax())]
        while tokens[-1] != self.eos and len(tokens) < max_new_tokens:
            embeds = torch.cat([embeds, self.embed(tokens[-1:])], dim=1)
            tokens.append(int(self._out(embeds).logits[0, -1].argmax()))
        return {
            "sweep_hidden": torch.stack(sweep_hidden),
            "fed": torch.stack(fed),
            "h_bot": h_bot,
            "first_logits": first_logits,
            "answer_tokens": tokens,
            "answer_text": self.tokenizer.decode(tokens, skip_special_tokens=True),
        }

    def answer_gradients(self, question: str, answer_tokens: list[int], row: int) -> dict:
        """The logit of ``answer_tokens[row]`` where it is predicted (teacher-forced), and its gradient with
        respect to the question + BOT embeddings ``[width, d_model]`` (one tensor fed to every forward, so the
        gradient is total: through every sweep and the answer) and to the last sweep's inputs ``[n, d_model]``."""
        prefix_ids = self.tokenizer(question, add_special_tokens=True)["input_ids"] + [self.bot]
        width, n = len(prefix_ids), self.n_latents
        prefix = self.embed(prefix_ids).detach().requires_grad_(True)
        with torch.enable_grad():
            hidden = self._out(torch.cat([prefix, self.embed([self.latent] * n)], dim=1)).hidden_states[-1][0]
            latents = self.module.project(hidden[width - 1 : width - 1 + n])
            for _ in range(self.n_sweeps):
                fed = latents
                hidden = self._out(torch.cat([prefix, fed[None]], dim=1)).hidden_states[-1][0, width:]
                latents = torch.cat([latents[:1], self.module.project(hidden[:-1])], dim=0)
            tail = self.embed([self.eot] + self.prompt_ids + answer_tokens[:row])
            logits = self._out(torch.cat([prefix, fed[None], tail], dim=1)).logits[0, -1]
            metric = logits[answer_tokens[row]]
            prefix_grad, fed_grad = torch.autograd.grad(metric, [prefix, fed])
        return {"metric": metric.detach(), "prefix_grad": prefix_grad[0], "fed_grad": fed_grad}
