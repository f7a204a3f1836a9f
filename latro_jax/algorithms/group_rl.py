"""What the GRPO family (GRPO, MRT-RL, and the variants to come) shares, as data and one code
path: the sampling block (G completions of at most max_tokens per question), the policy-loss
block (clipped surrogate, beta k3 KL to the reference, aggregation, log-probs at the sampling
temperature), and the scored batch and loss built from them (SPEC 2.5).

    c.grpo.rollout = dict(num_samples=4, max_tokens=512, sampling=dict(temperature=0.9))
    c.grpo.loss = dict(clip_eps=0.2, beta=0.04, aggregation="token", logprobs_at_temperature=True)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latro_jax import objectives, rollout
from latro_jax.algorithms.core import Policies, ScoredBatch
from latro_jax.logprobs import token_logprobs
from latro_jax.models import Transformer
from latro_jax.sampling import SamplingParams
from latro_jax.train import RowLayout


@dataclasses.dataclass(frozen=True)
class GroupSampling:
    """num_samples (G) completions of at most max_tokens per question, drawn at `sampling`
    (the paper's GRPO / MRT runs: T 0.9)."""

    num_samples: int = 4
    max_tokens: int = 512
    sampling: SamplingParams = SamplingParams(temperature=0.9)

    def __post_init__(self):
        if self.num_samples < 1 or self.max_tokens < 1:
            raise ValueError(f"num_samples={self.num_samples} and max_tokens={self.max_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """The GRPO token loss (SPEC 2.5): the clipped surrogate (clip_eps) plus beta * k3 KL to the
    reference (0: no reference pass); aggregation token | sequence | dr_grpo; log-probabilities
    of logits / T when logprobs_at_temperature (the paper's TRL did not divide)."""

    clip_eps: float = 0.2
    beta: float = 0.04
    aggregation: str = "token"
    logprobs_at_temperature: bool = True

    def __post_init__(self):
        if self.aggregation not in objectives.AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: choose one of {objectives.AGGREGATIONS}")
        if self.beta < 0 or not 0 < self.clip_eps < 1:
            raise ValueError(f"beta={self.beta} must be >= 0 and clip_eps={self.clip_eps} in (0, 1)")

    def temperature(self, sampling: SamplingParams) -> float:
        """The T log-probabilities are taken at (1 unless logprobs_at_temperature and T > 0)."""
        t = sampling.temperature
        return t if self.logprobs_at_temperature and t > 0 else 1.0


def scored_completions(policies: Policies, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       advantages: np.ndarray, *, group: int, loss: PolicyLoss, temperature: float,
                       max_tokens: int, share_prompts: bool, pad_id: int, metrics: dict[str, float],
                       details: dict[str, np.ndarray] | None = None) -> ScoredBatch:
    """The batch policy_loss learns from: completion rows [prompt | completion] (`group`
    consecutive rows per prompt), their advantages, and the reference's token log-probs when
    beta > 0 (one pass, each prompt run once per group with share_prompts)."""
    rows = rollout.completion_rows(prompts, completions, pad_id=pad_id)
    arrays = dict(tokens=rows.tokens, valid=rows.valid, completion_mask=rows.answer_mask,
                  advantages=np.asarray(advantages, np.float32).reshape(-1))
    shared = policies.scorer.prefix_sharing(rows, group) if share_prompts else None
    if loss.beta:
        arrays["ref_logp"] = policies.scorer.token_logprobs(policies.reference, arrays, temperature=temperature,
                                                            shared_prefix=shared)
    scalars = {"completion_tokens": float(rows.answer_mask.sum()), "rows": float(len(rows.tokens)),
               "max_length": float(max_tokens)}
    return ScoredBatch(arrays=arrays, scalars=scalars, metrics=metrics, details=details or {},
                       layout=RowLayout(shared))


def policy_loss(model: Transformer, mb: dict, scalars: dict, layout: RowLayout, cfg: PolicyLoss, *,
                temperature: float, chunk_size: int):
    """The GRPO token loss of a micro-batch (SPEC 2.5), divided by the global denominators of
    its aggregation. One optimizer step per rollout: pi_old = stop_grad(pi_theta), rho = 1 (an
    `old_logp` array, when given, replaces it)."""
    logp = token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=chunk_size, temperature=temperature,
                          shared_prefix=layout.shared_prefix)
    old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
    losses = objectives.grpo_token_losses(logp, old, mb.get("ref_logp"), mb["advantages"],
                                          clip_eps=cfg.clip_eps, beta=cfg.beta)
    mask = mb["completion_mask"]
    value = objectives.aggregate_token_losses(losses, mask, cfg.aggregation,
                                              completion_tokens=scalars["completion_tokens"],
                                              rows=scalars["rows"], max_length=scalars["max_length"])
    aux = {}
    if cfg.beta:
        diff = mb["ref_logp"] - logp
        aux["kl"] = jnp.sum((jnp.exp(diff) - diff - 1) * mask) / scalars["completion_tokens"]
    return value, aux
