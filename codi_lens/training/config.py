"""What determines a CODI training run: :class:`TrainConfig` (saved with every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass

ANSWER_PREFIX = "The answer is:"
#: Config fields that do not change what is computed (a resume may change them). The thread count
#: can change float rounding: a run resumed with another one matches to rounding, not bit for bit.
BOOKKEEPING_FIELDS = ("threads", "val_every", "val_size", "checkpoint_every", "device")


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved with every checkpoint)."""

    #: The training method: ``"codi"`` (self-distillation, the module ``codi`` + ``prj``) or ``"coconut"``
    #: (Coconut's curriculum, the module ``base_causallm`` alone; see :mod:`codi_lens.training.coconut`).
    method: str = "codi"
    #: Coconut: optimizer steps per curriculum stage (stage ``s`` writes the chain without its first ``s``
    #: steps, which ``s * thoughts_per_step`` latents replace); the last stage lasts until ``steps``.
    stage_steps: int = 0
    #: Coconut's ``c_thought``: latents per replaced step.
    thoughts_per_step: int = 1
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    n_latents: int = 6
    prj_dim: int = 256
    prj_layernorm: bool = True
    #: Start the projection's LayerNorm gain at the token embeddings' std, so a fed-back thought has
    #: the scale of a token embedding (a from-scratch model's embeddings are ~50x smaller than a
    #: unit-variance LayerNorm output). Only changes the initialisation.
    prj_gain_matches_embeddings: bool = False
    #: Amplitude of the Fourier code written into the number tokens' embeddings at initialisation (0:
    #: off; see ``fourier_number_embeddings``). Only changes the initialisation.
    number_fourier_scale: float = 0.0
    distill_weight: float = 20.0
    student_weight: float = 1.0
    teacher_weight: float = 1.0
    distill_div_std: bool = True
    #: Standardise the states by the teacher's std before the SmoothL1 (see ``distillation_loss``).
    distill_standardise: bool = False
    #: Weight of the *chain distillation* (0: off, upstream's objective): thought ``j``'s states (every
    #: layer after the embeddings) are pulled toward the teacher's states at the position that predicts
    #: intermediate result ``j`` of its chain. See ``chain_loss``.
    chain_distill_weight: float = 0.0
    #: Weight of the *chain logit distillation* (0: off): KL from the teacher's next-token distribution
    #: at the position that predicts intermediate result ``j`` to thought ``j``'s own (its last state
    #: through the unembedding), so that the thought's logit lens reads result ``j``. See
    #: ``chain_logit_loss``.
    chain_logit_weight: float = 0.0
    #: Give the chain losses a target for every thought: a thought past a problem's last result is
    #: paired with the teacher's position that predicts the answer number (the chain's value is carried
    #: to the last thought). Off: such thoughts are left free.
    chain_carry_answer: bool = False
    drop_last_cot_step: bool = True
    #: The teacher's chain: ``"equations"`` (GSM8k-Aug: the ``<<...>>`` spans only, upstream),
    #: ``"solution"`` (the solution's text before its ``####`` line, words between spans included) or
    #: ``"results"`` (that text with each span replaced by its result). See ``teacher_chain``.
    cot_text: str = "equations"
    use_teacher: bool = True
    #: Split each batch into this many micro-batches of similar length (gradient accumulation), so
    #: less compute goes into padding. Each micro-batch's losses are token/element means over that
    #: micro-batch and the distillation std is the micro-batch's, so with more than 1 the objective
    #: is close to, not identical with, the whole batch's. 1 keeps the original computation.
    micro_batches: int = 1
    val_every: int = 150
    val_size: int = 200
    checkpoint_every: int = 150
    threads: int = 2
    #: Where training runs ("cpu", "cuda", "cuda:1"); bookkeeping, so a run may resume elsewhere.
    device: str = "cpu"
    #: "float32", or "bfloat16": mixed precision (fp32 weights and optimizer, bf16 autocast).
    dtype: str = "float32"
