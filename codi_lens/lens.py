"""Logit lens and tuned lens on continuous thoughts: which tokens each (layer, thought) state decodes to.

Layer convention (every table here): ``layer`` 0 is the residual stream entering block 0
(``blocks.0.hook_resid_pre``: at thought k, the fed continuous thought itself, plus GPT-2's position
embedding), ``layer`` l >= 1 is the output of block l - 1 (``blocks.{l-1}.hook_resid_post``).
``thought`` 0 is BOT, k is the position fed thought k (the state there produces ``h_k``).

**The final norm is always applied**: the logit lens of a residual ``x`` is ``unembed(ln_final(x))``,
so at the last layer it is exactly the model's own logits at that position (``h_k @ W_U + b_U``;
``CODIResult.latent_states`` are already post-norm). The tuned lens puts a learned affine translator
``A_l x + b_l`` in front of the same read-out for every layer below the last (the last is the
identity); initialised to ``A = I, b = 0`` it is the logit lens.

The tuned lens is written here rather than taken from the ``tuned-lens`` package: that package wraps
Hugging Face models and trains on token positions of a text corpus, while CODI's thoughts are
positions of a hooked loop that only codi_lens can run; the translator itself is a few lines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from codi_lens.core.errors import CodiLensError, MissingFileError
from codi_lens.core.model import CODIModel
from codi_lens.core.names import act_name
from codi_lens.data.problems import Problem
from codi_lens.run.store import batches_heard
from codi_lens.stats import bootstrap_ci

TUNED_LENS_WEIGHTS, TUNED_LENS_CONFIG = "tuned_lens.safetensors", "tuned_lens.json"
#: ``target`` of a readout row: an intermediate result of the chain, or the final answer.
TARGETS = ("intermediate", "answer")


class LensError(CodiLensError, ValueError):
    """A tuned-lens file that does not fit the model (names the file and the key)."""


def lens_hook_names(model: CODIModel) -> list[str]:
    """The residual hooks of layers ``0..n_layers`` (see the module docstring)."""
    return [act_name("resid_pre", 0)] + [act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]


@dataclass
class ThoughtStates:
    """What one pass over problems records for reading the thoughts.

    Attributes:
        residuals: ``[problem, n_layers + 1, n_latents + 1, d_model]``: the residual stream at BOT and
            every thought, per layer (see the module docstring).
        thought_embeds: ``[problem, n_latents, d_model]``: the vectors fed at thoughts 1..n.
        prediction: the number each problem's answer gives (None without one).
        correct: whether it equals the gold answer.
    """

    residuals: Float[Tensor, "problem layer latent d_model"]
    thought_embeds: Float[Tensor, "problem n_latents d_model"]
    prediction: list[float | None]
    correct: np.ndarray


def thought_states(
    model: CODIModel,
    problems: Sequence[Problem],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    progress: bool = True,
) -> ThoughtStates:
    """Run the CODI loop on ``problems`` and keep the residuals at BOT and every thought (stored on the
    CPU in float32), the fed thoughts and whether each answer is right."""
    names = lens_hook_names(model)
    residuals, embeds, predictions = [], [], []
    for batch in batches_heard(problems, batch_size, model=model, desc="thought states", progress=progress):
        result, cache = model.run_codi_with_cache(
            [p.question for p in batch], names_filter=names, n_latents=n_latents, max_new_tokens=max_new_tokens
        )
        where = [result.positions.bot, *result.positions.thoughts]
        residuals.append(torch.stack([cache[name][:, where] for name in names], dim=1).float().cpu())
        embeds.append(result.thought_embeds.float().cpu())
        predictions.extend(result.prediction)
    correct = np.array([pred is not None and float(pred) == float(p.gold) for pred, p in zip(predictions, problems)])
    return ThoughtStates(torch.cat(residuals), torch.cat(embeds), predictions, correct)


def logit_lens(model: CODIModel, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
    """``unembed(ln_final(resid))``: what the model would predict from ``resid`` (final norm applied)."""
    shape = resid.shape
    flat = resid.reshape(-1, 1, shape[-1]).to(device=model.cfg.device, dtype=model.cfg.dtype)
    with torch.no_grad():
        logits = model.unembed(model.ln_final(flat))
    return logits.reshape(*shape[:-1], logits.shape[-1])


class TunedLens(nn.Module):
    """One affine translator per layer below the last, read out through the model's final norm and
    unembedding. ``weight[l]`` is ``[d_model, d_model]`` acting as ``x @ weight[l] + bias[l]``."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.n_layers, self.d_model = n_layers, d_model
        self.weight = nn.Parameter(torch.eye(d_model).repeat(n_layers, 1, 1))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def translate(self, resid: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch d_model"]:
        """The translated residual of ``layer`` (the last layer passes through unchanged)."""
        if not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer {layer} is outside 0..{self.n_layers}")
        if layer == self.n_layers:
            return resid
        return resid @ self.weight[layer].to(resid) + self.bias[layer].to(resid)

    def logits(
        self, model: CODIModel, resid: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_vocab"]:
        """Tuned-lens logits of a residual from ``layer``."""
        return logit_lens(model, self.translate(resid.float(), layer))

    def save(self, directory: str | Path, **metadata) -> Path:
        """Write ``tuned_lens.safetensors`` and ``tuned_lens.json`` (shape plus ``metadata``) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()},
            str(directory / TUNED_LENS_WEIGHTS),
        )
        config = {"n_layers": self.n_layers, "d_model": self.d_model, **metadata}
        (directory / TUNED_LENS_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: CODIModel | None = None) -> TunedLens:
        """Load a saved lens; with ``model``, check that it fits (layers and width)."""
        directory = Path(directory)
        config_file, weights_file = directory / TUNED_LENS_CONFIG, directory / TUNED_LENS_WEIGHTS
        for path in (config_file, weights_file):
            if not path.exists():
                raise MissingFileError(f"no tuned lens at {directory}: {path.name} is missing")
        config = json.loads(config_file.read_text())
        for key in ("n_layers", "d_model"):
            if key not in config:
                raise LensError(f"{config_file}: no {key!r}")
        lens = cls(int(config["n_layers"]), int(config["d_model"]))
        if model is not None and (lens.n_layers, lens.d_model) != (model.cfg.n_layers, model.cfg.d_model):
            raise LensError(
                f"{config_file}: a lens for {lens.n_layers} layers of width {lens.d_model}, the model has "
                f"{model.cfg.n_layers} of width {model.cfg.d_model}"
            )
        tensors = load_file(str(weights_file))
        for key, param in (("weight", lens.weight), ("bias", lens.bias)):
            if key not in tensors:
                raise LensError(f"{weights_file}: missing key {key!r}")
            if tensors[key].shape != param.shape:
                raise LensError(
                    f"{weights_file}: {key!r} has shape {list(tensors[key].shape)}, expected {list(param.shape)}"
                )
            param.data.copy_(tensors[key])
        return lens


def train_tuned_lens(
    model: CODIModel,
    residuals: Float[Tensor, "problem layer latent d_model"],
    *,
    steps: int = 500,
    lr: float = 1e-3,
    batch_rows: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Fit a :class:`TunedLens` on thought positions: for every layer below the last, minimise
    ``KL(final || lens)`` between the model's own distribution at that position (the last layer's
    logit lens) and the translated read-out, with Adam on random mini-batches of positions.

    ``residuals`` come from :func:`thought_states` on problems that are not the ones you evaluate on.
    """
    n_layers = residuals.shape[1] - 1
    lens = TunedLens(n_layers, residuals.shape[-1]).to(model.cfg.device)
    rows = residuals.permute(0, 2, 1, 3).reshape(-1, n_layers + 1, residuals.shape[-1])  # [position, layer, d]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    bar = tqdm(total=steps * n_layers, desc="tuned lens", unit="layer step", disable=not progress)
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (min(batch_rows, len(rows)),), generator=generator)].to(model.cfg.device)
        with torch.no_grad():
            target = F.log_softmax(logit_lens(model, batch[:, -1]).float(), dim=-1)
        optimizer.zero_grad()
        for layer in range(n_layers):  # one backward per layer: the layers' translators share nothing, and only
            # one layer's [rows, d_vocab] logits and their gradient are held at a time (gradients add up as one
            # backward of the mean would give them)
            translated = lens.translate(batch[:, layer], layer)
            logits = model.unembed(model.ln_final(translated[:, None].to(model.cfg.dtype)))[:, 0].float()
            loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
            (loss / n_layers).backward()
            bar.update(1)  # a step at Llama 3's vocabulary is many seconds: the bar moves per layer
        optimizer.step()
    bar.close()
    model.zero_grad(set_to_none=True)
    return lens.cpu()


def lens_logits(
    model: CODIModel, residuals: Float[Tensor, "problem layer latent d_model"], lens: TunedLens | None = None
) -> Float[Tensor, "problem layer latent d_vocab"]:
    """Read-out of every (layer, thought): the logit lens, or ``lens`` when given."""
    per_layer = [
        (logit_lens(model, residuals[:, layer]) if lens is None else lens.logits(model, residuals[:, layer], layer))
        for layer in range(residuals.shape[1])
    ]
    return torch.stack(per_layer, dim=1).float().cpu()


def top_decodes(
    model: CODIModel,
    residuals: Float[Tensor, "problem layer latent d_model"],
    problem_ids: Sequence[str],
    lens: TunedLens | None = None,
    *,
    k: int = 5,
    lens_name: str | None = None,
) -> pd.DataFrame:
    """The top-``k`` tokens of the read-out at every (layer, thought): one row per (problem, layer,
    thought, rank) with ``token`` (decoded), ``token_id`` and ``prob`` (softmax over the full vocabulary).
    The read-out is computed a few problems at a time (:func:`problem_chunks`), so memory does not grow with
    the number of problems."""
    parts = [
        lens_logits(model, residuals[chunk], lens).softmax(-1).topk(k, dim=-1)
        for chunk in problem_chunks(model, residuals)
    ]
    values, indices = torch.cat([t.values for t in parts]), torch.cat([t.indices for t in parts])
    n, n_layers, n_thoughts, _ = indices.shape
    index = np.indices((n, n_layers, n_thoughts, k)).reshape(4, -1)
    ids = indices.reshape(-1).tolist()
    tokens = model.tokenizer.convert_ids_to_tokens(ids)  # None for ids past the tokenizer (BOT, EOT, pad)
    return pd.DataFrame(
        {
            "problem_id": np.asarray(problem_ids)[index[0]],
            "lens": lens_name or ("logit" if lens is None else "tuned"),
            "layer": index[1],
            "thought": index[2],
            "rank": index[3],
            "token_id": ids,
            "token": [t if t is not None else f"<{i}>" for t, i in zip(tokens, ids)],
            "prob": values.reshape(-1).numpy(),
        }
    )


def number_token(model: CODIModel, value: float) -> int | None:
    """The single token id that spells ``value`` (integers as ``"12"``), or None if it takes several."""
    text = str(int(value)) if float(value).is_integer() else str(value)
    for candidate in (text, " " + text):
        ids = model.tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return None


def readout_targets(problems: Sequence[Problem], *, seed: int = 0) -> pd.DataFrame:
    """The values to look for in each problem's thoughts, and the control.

    One row per (problem, value): ``target`` (``"intermediate"`` with its 1-based ``step``, or
    ``"answer"`` with ``step`` 0), ``value``, and ``control``. Control rows carry the values of
    another problem with the same number of steps (a seeded derangement within each group), to be
    looked for in this problem's states: how often a value shows up by chance. ``reader`` is the
    index of the problem whose states are read.
    """
    rng = np.random.default_rng(seed)
    by_steps: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        by_steps.setdefault(p.n_steps, []).append(i)
    other = {}
    for members in by_steps.values():
        if len(members) > 1:
            shift = rng.permutation(len(members))
            order = [members[j] for j in shift]
            other.update({order[j]: order[(j + 1) % len(order)] for j in range(len(order))})
    rows = []
    for reader, p in enumerate(problems):
        for control, source in ((False, reader), (True, other.get(reader))):
            if source is None:
                continue
            q = problems[source]
            values = [("intermediate", j, v) for j, v in enumerate(q.intermediates, start=1)]
            values.append(("answer", 0, q.gold))
            for target, step, value in values:
                rows.append(
                    {
                        "reader": reader,
                        "problem_id": p.id,
                        "n_steps": p.n_steps,
                        "target": target,
                        "step": step,
                        "value": float(value),
                        "control": control,
                    }
                )
    return pd.DataFrame(rows)


def value_ranks(
    logits: Float[Tensor, "problem layer latent d_vocab"], readers: Int[Tensor, " row"], tokens: Int[Tensor, " row"]
) -> Int[Tensor, "row layer latent"]:
    """Rank of ``tokens[r]`` (0 = top-1) in the read-out of problem ``readers[r]`` at every (layer, thought)
    (one row at a time: no copy of the read-out per value)."""
    ranks = torch.empty((len(readers), *logits.shape[1:3]), dtype=torch.long)
    for r, (reader, token) in enumerate(zip(readers.tolist(), tokens.tolist())):
        chosen = logits[reader]  # [layer, latent, vocab]
        ranks[r] = (chosen > chosen[..., token : token + 1]).sum(-1)
    return ranks


#: Read-out values computed at once (float32: 256 MiB), whatever the vocabulary; see :func:`problem_chunks`.
READOUT_BUDGET = 2**26


def problem_chunks(model: CODIModel, residuals: Float[Tensor, "problem layer latent d_model"]) -> list[slice]:
    """Slices of problems whose read-out (``[chunk, layer, latent, d_vocab]``) holds at most
    :data:`READOUT_BUDGET` values (one problem at least): at Llama 3's 128,256-token vocabulary with 17
    layers and 7 positions, four problems at a time."""
    per_problem = residuals.shape[1] * residuals.shape[2] * model.cfg.d_vocab
    step = max(1, READOUT_BUDGET // per_problem)
    return [slice(start, start + step) for start in range(0, residuals.shape[0], step)]


def lens_ranks(
    model: CODIModel,
    residuals: Float[Tensor, "problem layer latent d_model"],
    lens: TunedLens | None,
    readers: Int[Tensor, " row"],
    tokens: Int[Tensor, " row"],
) -> Int[Tensor, "row layer latent"]:
    """:func:`value_ranks` of the read-out of ``residuals``, computed a chunk of problems at a time."""
    ranks = torch.empty((len(readers), *residuals.shape[1:3]), dtype=torch.long)
    for chunk in problem_chunks(model, residuals):
        rows = ((readers >= chunk.start) & (readers < chunk.stop)).nonzero().flatten()
        if len(rows):
            logits = lens_logits(model, residuals[chunk], lens)
            ranks[rows] = value_ranks(logits, readers[rows] - chunk.start, tokens[rows])
    return ranks


def readout_frame(
    model: CODIModel,
    residuals: Float[Tensor, "problem layer latent d_model"],
    targets: pd.DataFrame,
    lenses: Mapping[str, TunedLens | None],
) -> pd.DataFrame:
    """Where each value of ``targets`` (from :func:`readout_targets`, any subset of its rows; ``reader``
    indexes ``residuals``) sits under each lens: one row per (target row, lens, layer, thought) with the
    value token's ``rank`` (0 = top-1). ``lenses`` maps a name to a :class:`TunedLens` or None (the
    logit lens). Values that are not one token are dropped; count them with :func:`single_token_values`."""
    targets = single_token_values(model, targets)
    readers = torch.tensor(targets["reader"].to_numpy(dtype=np.int64))
    tokens = torch.tensor(targets["token"].to_numpy(dtype=np.int64))
    used, local = torch.unique(readers, return_inverse=True)
    n_layers, n_thoughts = residuals.shape[1], residuals.shape[2]
    grid = np.array([(layer, thought) for layer in range(n_layers) for thought in range(n_thoughts)])
    frames = []
    for name, lens in lenses.items():
        ranks = lens_ranks(model, residuals[used], lens, local, tokens).reshape(len(targets), -1)
        frame = targets.loc[targets.index.repeat(len(grid))].reset_index(drop=True)
        frame["layer"], frame["thought"] = np.tile(grid[:, 0], len(targets)), np.tile(grid[:, 1], len(targets))
        frame["lens"] = name
        frame["rank"] = ranks.reshape(-1).numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).drop(columns="reader")


def single_token_values(model: CODIModel, targets: pd.DataFrame) -> pd.DataFrame:
    """``targets`` with the ``token`` spelling each value, keeping the values that are one token."""
    tokens = [number_token(model, v) for v in targets["value"]]
    kept = targets.assign(token=tokens)
    return kept[kept["token"].notna()].reset_index(drop=True)


def readout_rates(
    frame: pd.DataFrame, *, k: int = 1, by: Sequence[str] = ("lens", "control", "target", "step", "layer", "thought")
) -> pd.DataFrame:
    """Share of values within the top ``k`` per group of ``by``, with a 95% bootstrap CI over problems
    (one value per problem and group): columns ``n, rate, low, high``."""
    hits = frame.assign(hit=(frame["rank"] < k).astype(float))
    out = []
    for key, group in hits.groupby(list(by), sort=True):
        per_problem = group.groupby("problem_id")["hit"].mean()
        rate, low, high = bootstrap_ci(per_problem.to_numpy(), n_resamples=1000)
        out.append({**dict(zip(by, key)), "n": len(group), "rate": rate, "low": low, "high": high})
    return pd.DataFrame(out)


def readout_anywhere(
    frame: pd.DataFrame, *, k: int = 1, by: Sequence[str] = ("lens", "control", "target", "step")
) -> pd.DataFrame:
    """Share of values that are within the top ``k`` at some (layer, thought), per group, with a 95%
    bootstrap CI over problems (the control rows say how often that happens by chance). ``by`` may name any
    column of ``frame`` that is constant per problem and value (``n_steps``, say)."""
    keys = list(dict.fromkeys(["problem_id", "lens", "control", "target", "step", *by]))
    best = frame.groupby(keys, as_index=False)["rank"].min()
    return readout_rates(best.assign(layer=0, thought=0), k=k, by=by)


def top_tokens(
    model: CODIModel, latent_states: Float[Tensor, "batch steps d_model"], k: int = 5
) -> Int[Tensor, "batch steps k"]:
    """Top-k token ids of the logit lens at every latent step (index 0 = BOT, k = thought k)."""
    with torch.no_grad():
        logits = model.unembed(latent_states.to(model.cfg.dtype))
    return logits.topk(k, dim=-1).indices


def intermediate_readout(
    model: CODIModel,
    latent_states: Float[Tensor, "batch steps d_model"],
    intermediates: Sequence[Sequence[float]],
    k: int = 5,
) -> pd.DataFrame:
    """Where each intermediate value shows up in the logit lens of the thoughts.

    One row per (example, intermediate value): its position in the chain (``step``, 1-based), its
    token, and ``top1_at`` / ``topk_at``: the latent steps (0 = BOT, k = thought k) where the value's
    token is the top-1 / in the top-k. Values that are not a single token get ``token = None``.
    """
    top = top_tokens(model, latent_states, k).cpu()
    rows = []
    for example, values in enumerate(intermediates):
        for step, value in enumerate(values, start=1):
            token = number_token(model, value)
            hits_top1 = [] if token is None else [s for s in range(top.shape[1]) if top[example, s, 0] == token]
            hits_topk = [] if token is None else [s for s in range(top.shape[1]) if token in top[example, s]]
            rows.append(
                {
                    "example": example,
                    "step": step,
                    "n_steps": len(values),
                    "value": value,
                    "token": token,
                    "top1_at": hits_top1,
                    "topk_at": hits_topk,
                    "top1_any": bool(hits_top1),
                    "topk_any": bool(hits_topk),
                }
            )
    return pd.DataFrame(rows)


def latent_value_readout(
    model: CODIModel, problems: Sequence[Problem], *, n_latents: int = 6, batch_size: int = 64, progress: bool = True
) -> pd.DataFrame:
    """:func:`intermediate_readout` of every problem's latent states (the latent loop only; answers are not
    needed), one row per (problem ``id``, intermediate value).

    Rows with ``control=True`` read out the intermediates of *another* problem (the next one in the whole
    list, the last reading the first) from the same latent states: the chance level the real readout must
    beat. With a single problem there is no other problem, and no control row.
    """
    latent_states = []
    for batch in batches_heard(problems, batch_size, model=model, desc="logit lens", progress=progress):
        latent_states.append(model.run_latents([p.question for p in batch], n_latents=n_latents).latent_states)
    states = torch.cat(latent_states)
    values = [p.intermediates for p in problems]
    frames = []
    for control, targets in ((False, values), (True, values[1:] + values[:1])):
        if control and len(problems) < 2:
            continue
        frame = intermediate_readout(model, states, targets)
        frame["id"] = [problems[i].id for i in frame["example"]]
        frame["control"] = control
        frames.append(frame.drop(columns="example"))
    return pd.concat(frames, ignore_index=True)


def top_k_share_by_step(readout: pd.DataFrame, n_steps_latent: int) -> pd.DataFrame:
    """From :func:`latent_value_readout`: the share of intermediate values (rows: ``value {step}``, by chain
    position) that are top-k at each latent step (columns ``0`` = BOT .. ``n``)."""
    rows = {}
    for step, group in readout.groupby("step"):
        counts = [sum(s in hits for hits in group["topk_at"]) for s in range(n_steps_latent)]
        rows[f"value {step}"] = [c / len(group) for c in counts]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[str(s) for s in range(n_steps_latent)])
