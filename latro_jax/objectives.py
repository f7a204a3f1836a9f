"""The algorithms' math as pure functions: rewards, advantages and losses (SPEC sections 1-2),
each with its formula. Token log-probabilities come from scoring.py, rows from rollout.py.

Notation: x question, z rationale, y answer; N questions x K rationales in consecutive rows;
log pi(.) of a span is the SUM of its token log-probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# ---------------------------------------------------------------- LaTRO
def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """Leave-one-out baseline over the K samples of each question (no std scaling):
    A_k = r_k - 1/(K-1) * sum_{j != k} r_j, for rewards [N, K]."""
    K = rewards.shape[-1]
    if K < 2:
        raise ValueError(f"RLOO needs K >= 2 samples per question, got K = {K}")
    return rewards - (rewards.sum(axis=-1, keepdims=True) - rewards) / (K - 1)


def latro_rewards(answer_logp: jax.Array, rationale_logp: jax.Array,
                  ref_rationale_logp: jax.Array, finished: jax.Array, *, beta: float,
                  nonstop_penalty: float) -> jax.Array:
    """r = R' - beta * (log pi_theta(z|x) - log pi_0(z|x)), all [N, K].

    R' = log pi_theta(y | x + z) for finished rationales; for unfinished ones (no stop within L)
    R' = nonstop_penalty * mean(answer_logp over the whole batch) (answer_logp <= 0, so this is
    a penalty). Pass global arrays: the mean is over every sample of the global batch.
    """
    penalised = nonstop_penalty * jnp.mean(answer_logp)
    reward = jnp.where(finished, answer_logp, penalised)
    return reward - beta * (rationale_logp - ref_rationale_logp)


def latro_loss(rationale_logp: jax.Array, answer_logp: jax.Array, advantages: jax.Array, *,
               sft_coef: float) -> jax.Array:
    """mean over N*K of  -stop_grad(A) * log pi(z|x)  -  sft_coef * log pi(y|x+z).

    Its gradient is the REINFORCE-with-RLOO estimate of grad E_z[log pi(y|x+z)] - beta KL plus
    sft_coef times the gradient of the answer likelihood (SPEC 1.2)."""
    advantages = jax.lax.stop_gradient(advantages)
    return jnp.mean(-advantages * rationale_logp - sft_coef * answer_logp)


def sft_loss(token_logp: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Completion-only negative log-likelihood per token: -sum(mask * logp) / sum(mask)."""
    return -jnp.sum(token_logp * completion_mask) / jnp.maximum(jnp.sum(completion_mask), 1)
