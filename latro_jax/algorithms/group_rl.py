"""What the GRPO family (GRPO, MRT-RL, DAPO, GSPO, CISPO, RLOO) shares, as data and one code
path: the sampling block (G completions of at most max_tokens per question), the policy-loss
block (the objective -- clipped surrogate, GSPO's or RLOO's sequence ratio or CISPO's clipped
weight -- with its clip range, beta k3 KL to the reference, aggregation, log-probs at the
sampling temperature, and mu mini-batch updates per rollout), and the scored batch and loss
built from them (SPEC 2.5, 3.2).

    c.grpo.rollout = dict(num_samples=4, max_tokens=512, sampling=dict(temperature=0.9))
    c.grpo.loss = dict(objective="clip", clip_eps=0.2, clip_eps_high=0.0, beta=0.04,
                       aggregation="token", logprobs_at_temperature=True, updates_per_rollout=1)
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


OBJECTIVES = ("clip", "gspo", "cispo", "rloo")
SEQUENCE_RATIOS = {"gspo": True, "rloo": False}  # objective -> its sequence ratio is length-normalised


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """The GRPO family's policy loss (SPEC 2.5, 3.2). objective: `clip` (the token-level clipped
    surrogate of GRPO and DAPO), `gspo` (the clipped sequence ratio, length-normalised), `rloo`
    (the clipped sequence ratio, the plain sum of the token log-ratios), `cispo` (-sg(clipped
    rho) A log pi: cispo_clip `upper` min(rho, cispo_max), or `both`, the clip range); the clip
    range is (1 - clip_eps, 1 + clip_eps_high), clip_eps_high 0 = clip_eps (DAPO's clip-higher:
    0.2, 0.28); beta * k3 KL to the reference (0: no reference pass);
    aggregation token | sequence | dr_grpo; log-probabilities of logits / T when
    logprobs_at_temperature (the paper's TRL did not divide); updates_per_rollout mu: the
    rollout's groups split into mu mini-batches, one optimizer step each, their ratios against
    pi_old = the policy that sampled (a scoring pass), so clipping acts from the second on."""

    objective: str = "clip"
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0
    cispo_max: float = 5.0
    cispo_clip: str = "upper"
    beta: float = 0.04
    aggregation: str = "token"
    logprobs_at_temperature: bool = True
    updates_per_rollout: int = 1

    def __post_init__(self):
        for name, value, options in (("objective", self.objective, OBJECTIVES),
                                     ("aggregation", self.aggregation, objectives.AGGREGATIONS),
                                     ("cispo_clip", self.cispo_clip, objectives.CISPO_CLIPS)):
            if value not in options:
                raise ValueError(f"{name}={value!r}: choose one of {options}")
        if self.beta < 0 or not 0 < self.clip_eps < 1 or self.clip_eps_high < 0:
            raise ValueError(f"beta={self.beta} and clip_eps_high={self.clip_eps_high} must be >= 0 and "
                             f"clip_eps={self.clip_eps} in (0, 1)")
        if self.cispo_max <= 1 or self.updates_per_rollout < 1:
            raise ValueError(f"cispo_max={self.cispo_max} must be > 1 and updates_per_rollout="
                             f"{self.updates_per_rollout} >= 1")

    @property
    def eps_high(self) -> float:
        return self.clip_eps_high or self.clip_eps

    def temperature(self, sampling: SamplingParams) -> float:
        """The T log-probabilities are taken at (1 unless logprobs_at_temperature and T > 0)."""
        t = sampling.temperature
        return t if self.logprobs_at_temperature and t > 0 else 1.0

    def token_losses(self, logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                     advantages: jax.Array, mask: jax.Array) -> jax.Array:
        """The objective's per-token losses [B, T] (objectives.py has each formula)."""
        common = dict(beta=self.beta, clip_eps=self.clip_eps)
        if self.objective in SEQUENCE_RATIOS:
            return objectives.sequence_token_losses(logp, old_logp, ref_logp, advantages, mask,
                                                    clip_eps_high=self.eps_high,
                                                    normalised=SEQUENCE_RATIOS[self.objective], **common)
        if self.objective == "cispo":
            return objectives.cispo_token_losses(logp, old_logp, ref_logp, advantages, rho_max=self.cispo_max,
                                                 clip=self.cispo_clip, clip_eps_high=self.eps_high, **common)
        return objectives.grpo_token_losses(logp, old_logp, ref_logp, advantages, clip_eps_high=self.eps_high,
                                            **common)

    def clipped(self, logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T] where the objective's clip acts on the ratio: the token ratio (the sequence
        ratio for gspo and rloo, on each of its tokens) outside (1 - clip_eps, 1 + clip_eps_high),
        or above cispo_max for cispo's `upper` clip."""
        if self.objective in SEQUENCE_RATIOS:
            ratio = objectives.sequence_ratio(logp, old_logp, mask, normalised=SEQUENCE_RATIOS[self.objective])
            ratio = jnp.broadcast_to(ratio[:, None], logp.shape)
        else:
            ratio = jnp.exp(logp - old_logp)
        if self.objective == "cispo" and self.cispo_clip == "upper":
            return ratio > self.cispo_max
        return (ratio < 1 - self.clip_eps) | (ratio > 1 + self.eps_high)


@dataclasses.dataclass
class CompletionRows:
    """Completion rows [prompt | completion] (`group` consecutive rows per prompt) and their
    token log-prob passes: `ref_logp` (the reference) and `old_logp` (pi_old, the policy that
    sampled) where the loss or the rewards read them; `shared`, the prompt columns the passes
    and the step run once per group."""

    arrays: dict[str, np.ndarray]
    shared: tuple[int, int] | None

    def sequence_kl(self) -> np.ndarray:
        """[rows] sum_t mask (log pi_old - log pi_ref): the sampled sequence's KL estimate."""
        a = self.arrays
        return np.sum((a["old_logp"] - a["ref_logp"]) * a["completion_mask"], axis=-1, dtype=np.float64)


def completion_rows(policies: Policies, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                    group: int, loss: PolicyLoss, temperature: float, share_prompts: bool, pad_id: int,
                    kept_groups: np.ndarray | None = None, reward_kl: bool = False) -> CompletionRows:
    """The rows and the passes they need: the reference's log-probs when beta > 0 or the KL is
    in the reward, pi_old's when updates_per_rollout mu > 1 or the KL is in the reward (each
    prompt run once per group with share_prompts). Groups not in `kept_groups` [N] (DAPO's
    dropped ones) keep their rows, so shapes stay fixed, but no completion token: they add
    nothing to the loss or its denominators."""
    rows = rollout.completion_rows(prompts, completions, pad_id=pad_id)
    mask = rows.answer_mask
    if kept_groups is not None:
        mask = mask * np.repeat(np.asarray(kept_groups, mask.dtype), group)[:, None]
    arrays = dict(tokens=rows.tokens, valid=rows.valid, completion_mask=mask)
    shared = policies.scorer.prefix_sharing(rows, group) if share_prompts else None
    passes = {"ref_logp": (policies.reference, loss.beta > 0 or reward_kl),
              "old_logp": (policies.params, loss.updates_per_rollout > 1 or reward_kl)}
    for name, (params, needed) in passes.items():
        if needed:
            arrays[name] = policies.scorer.token_logprobs(params, arrays, temperature=temperature,
                                                          shared_prefix=shared)
    return CompletionRows(arrays, shared)


def scored_completions(rows: CompletionRows, advantages: np.ndarray, *, loss: PolicyLoss, max_tokens: int,
                       metrics: dict[str, float], details: dict[str, np.ndarray] | None = None) -> ScoredBatch:
    """The batch policy_loss learns from: the rows with their advantages (one per row), the
    passes the loss reads (ref_logp when beta > 0, old_logp when mu > 1), and with mu > 1 the
    rows split into mu mini-batches of whole groups, each with its own denominators."""
    arrays = {k: v for k, v in rows.arrays.items()
              if k in ("tokens", "valid", "completion_mask") or (k == "ref_logp" and loss.beta > 0)
              or (k == "old_logp" and loss.updates_per_rollout > 1)}
    arrays["advantages"] = np.asarray(advantages, np.float32).reshape(-1)
    mu = loss.updates_per_rollout
    parts = np.split(arrays["completion_mask"], mu)
    # the rows that count: every row, less dropped groups' (at least 1, so an all-dropped
    # mini-batch is a zero loss, not 0 / 0)
    scalars = [{"completion_tokens": max(float(m.sum()), 1.0), "rows": max(float((m.sum(-1) > 0).sum()), 1.0),
                "max_length": float(max_tokens)} for m in parts]
    return ScoredBatch(arrays=arrays, scalars=scalars[0] if mu == 1 else scalars, metrics=metrics,
                       details=details or {}, layout=RowLayout(rows.shared))


def policy_loss(model: Transformer, mb: dict, scalars: dict, layout: RowLayout, cfg: PolicyLoss, *,
                temperature: float, chunk_size: int):
    """The family's loss of a micro-batch (SPEC 2.5, 3.2), divided by the global denominators of
    its aggregation, with the share of completion tokens whose ratio lies outside the clip range
    (`clipped`) and the mean |rho - 1| (`ratio_dev`). One optimizer step per rollout: pi_old =
    stop_grad(pi_theta), rho = 1; with mini-batches the `old_logp` array replaces it."""
    logp = token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=chunk_size, temperature=temperature,
                          shared_prefix=layout.shared_prefix)
    old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
    mask = mb["completion_mask"]
    losses = cfg.token_losses(logp, old, mb.get("ref_logp"), mb["advantages"], mask)
    value = objectives.aggregate_token_losses(losses, mask, cfg.aggregation,
                                              completion_tokens=scalars["completion_tokens"],
                                              rows=scalars["rows"], max_length=scalars["max_length"])
    fixed = jax.lax.stop_gradient(logp)
    tokens = scalars["completion_tokens"]
    aux = {"clipped": jnp.sum(cfg.clipped(fixed, old, mask) * mask) / tokens,
           "ratio_dev": jnp.sum(jnp.abs(jnp.exp(fixed - old) - 1) * mask) / tokens}
    if cfg.beta:
        aux["kl"] = jnp.sum(objectives.k3(logp, mb["ref_logp"]) * mask) / tokens
    return value, aux
