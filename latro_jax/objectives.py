"""The algorithms' math as pure functions: rewards, advantages and losses (SPEC sections 1-2),
each with its formula. Token log-probabilities come from scoring.py, rows from rollout.py.
Host-side estimators (GRPO / MRT advantages, progress, regret) take and return NumPy arrays;
losses are jax.

Notation: x question, z rationale, y answer; N questions x K rationales in consecutive rows;
log pi(.) of a span is the SUM of its token log-probabilities.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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
               sft_coef: float | jax.Array) -> jax.Array:
    """mean over N*K of  -stop_grad(A) * log pi(z|x)  -  sft_coef * log pi(y|x+z).

    Its gradient is the REINFORCE-with-RLOO estimate of grad E_z[log pi(y|x+z)] - beta KL plus
    sft_coef times the gradient of the answer likelihood (SPEC 1.2). sft_coef may be a per-row
    answer weight, held like A (VeriFree's R_k, JEPO's w_k; SPEC 3.1)."""
    advantages, sft_coef = jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(sft_coef)
    return jnp.mean(-advantages * rationale_logp - sft_coef * answer_logp)


# ---------------------------------------------------------------- likelihood rewards (SPEC 3.1)
LIKELIHOOD_REWARDS = ("prob", "logprob")


def verifree_rewards(answer_logp: np.ndarray, finished: np.ndarray, reward: str = "prob") -> np.ndarray:
    """VeriFree's reward [N, K]: R_k = pi(y | x + z_k) = exp(l_k) (`prob`) or l_k (`logprob`), 0
    where z_k did not finish within its budget."""
    if reward not in LIKELIHOOD_REWARDS:
        raise ValueError(f"reward {reward!r}: choose one of {LIKELIHOOD_REWARDS}")
    answer_logp = np.asarray(answer_logp, np.float64)
    value = np.exp(answer_logp) if reward == "prob" else answer_logp
    return np.where(finished, value, 0.0)


def _logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.mean(np.exp(x - top), axis=axis))


def jepo_multi(answer_logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JEPO's multi-sample bound of a question's K answer log-likelihoods l [N, K]:
    L = log(1/K sum_j e^{l_j}); advantages A_k = L - log(1/(K-1) sum_{j != k} e^{l_j}) (the
    leave-one-out control variate); answer weights w = softmax(l) = dL/dl. The loss
    1/N sum_questions sum_k [-A_k log pi(z_k|x) - w_k l_k] is K times the mean over rows."""
    l = np.asarray(answer_logp, np.float64)
    K = l.shape[-1]
    if K < 2:
        raise ValueError(f"JEPO's multi-sample bound needs K >= 2 samples per question, got K = {K}")
    bound = _logmeanexp(l, -1)
    others = np.stack([_logmeanexp(np.delete(l, k, axis=-1), -1) for k in range(K)], axis=-1)
    weights = np.exp(l - np.max(l, -1, keepdims=True))
    return bound[..., None] - others, weights / weights.sum(-1, keepdims=True)


def mean_token_probs(token_logp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RLPR's probability reward per row [B]: the mean over the masked (gold) tokens of
    pi(y*_t | ...) = exp(log pi_t); 0 for a row with no masked token."""
    mask = np.asarray(mask, np.float64)
    probs = np.exp(np.asarray(token_logp, np.float64)) * mask
    return probs.sum(-1) / np.maximum(mask.sum(-1), 1.0)


def rlpr_rewards(probs: np.ndarray, prior: np.ndarray, formatted: np.ndarray, format_weight: float = 0.1
                 ) -> np.ndarray:
    """RLPR's debiased reward [N, G] (SPEC 3.1): R_k = (1 - w) max(r_k - r', 0) + w format_k,
    r_k the gold tokens' mean probability after completion k's reasoning (0 when it states no
    answer: format_k = 0), r' [N] the same with no reasoning under pi_0, w = format_weight."""
    debiased = np.maximum(np.asarray(probs, np.float64) - np.asarray(prior, np.float64)[:, None], 0.0)
    return np.where(np.asarray(formatted, bool), (1 - format_weight) * debiased + format_weight, 0.0)


def ema_update(ema: float, value: float, decay: float) -> float:
    """EMA <- decay EMA + (1 - decay) value (RLPR's std-filter threshold: decay 0.99)."""
    return decay * ema + (1 - decay) * value


def sft_loss(token_logp: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Completion-only negative log-likelihood per token: -sum(mask * logp) / sum(mask)."""
    return -jnp.sum(token_logp * completion_mask) / jnp.maximum(jnp.sum(completion_mask), 1)


# ---------------------------------------------------------------- outcome-reward GRPO (SPEC 2.5)
GROUP_EPS = 1e-4
ADVANTAGE_SCALINGS = ("group", "batch", "none")
AGGREGATIONS = ("token", "sequence", "dr_grpo")


def group_advantages(rewards: np.ndarray, scaling: str = "group", eps: float = GROUP_EPS) -> np.ndarray:
    """GRPO advantages of rewards [N, G]: A_i = (r_i - mean_G r) / (std + eps) with std the
    UNBIASED (ddof 1) std of the group (`group`) or of the whole batch (`batch`); `none`:
    r_i - mean_G r (Dr. GRPO). G >= 2. eps: 1e-4 (TRL), 1e-6 (verl: DAPO, RLPR)."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.shape[-1] < 2:
        raise ValueError(f"group advantages need G >= 2 samples per question, got {rewards.shape[-1]}")
    centred = rewards - rewards.mean(axis=-1, keepdims=True)
    if scaling == "none":
        return centred
    if scaling == "group":
        return centred / (rewards.std(axis=-1, ddof=1, keepdims=True) + eps)
    if scaling == "batch":
        return centred / (rewards.std(ddof=1) + eps)
    raise ValueError(f"advantage scaling {scaling!r}: choose one of {ADVANTAGE_SCALINGS}")


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """The k3 estimate of KL(pi || pi_ref) per token: exp(d) - d - 1, d = log pi_ref - log pi."""
    diff = ref_logp - logp
    return jnp.exp(diff) - diff - 1


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, eps_low: float, eps_high: float) -> jax.Array:
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), elementwise (PPO; DAPO's
    clip-higher when eps_high > eps_low)."""
    return -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * advantages)


def grpo_token_losses(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                      advantages: jax.Array, *, clip_eps: float, beta: float,
                      clip_eps_high: float | None = None) -> jax.Array:
    """Per-token loss [B, T]: l_t = -min(rho_t A, clip(rho_t, 1 - eps_lo, 1 + eps_hi) A) + beta k3_t,
    rho_t = exp(log pi - log pi_old), eps_lo = clip_eps, eps_hi = clip_eps_high (default clip_eps;
    DAPO 0.28), k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (the KL is in the
    loss, with its gradient). advantages are per row [B]."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    loss = clipped_surrogate(jnp.exp(logp - old_logp), advantages[:, None], clip_eps, eps_high)
    return loss + beta * k3(logp, ref_logp) if beta else loss


def sequence_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, *, normalised: bool = True) -> jax.Array:
    """The sequence ratio [B], its gradient through every token: GSPO's length-normalised
    s_i = exp((1/|o_i|) sum_t mask (log pi - log pi_old)), or RLOO's
    rho_i = exp(sum_t mask (log pi - log pi_old)) (normalised=False)."""
    total = jnp.sum((logp - old_logp) * mask, axis=-1)
    return jnp.exp(total / jnp.maximum(jnp.sum(mask, axis=-1), 1) if normalised else total)


def sequence_token_losses(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                          advantages: jax.Array, mask: jax.Array, *, clip_eps: float, clip_eps_high: float,
                          beta: float, normalised: bool = True) -> jax.Array:
    """GSPO and RLOO (SPEC 3.2): the row loss l_i = -min(s_i A_i, clip(s_i, 1 - eps_lo, 1 + eps_hi) A_i)
    of the sequence ratio s_i (sequence_ratio: length-normalised for GSPO, the plain sum for
    RLOO) on each of the row's tokens (so `sequence` aggregation gives mean_i l_i), plus beta
    k3_t. [B, T]."""
    ratio = sequence_ratio(logp, old_logp, mask, normalised=normalised)
    loss = jnp.broadcast_to(clipped_surrogate(ratio, advantages, clip_eps, clip_eps_high)[:, None], logp.shape)
    return loss + beta * k3(logp, ref_logp) if beta else loss


def kl_penalised_rewards(rewards: np.ndarray, sequence_kl: np.ndarray, beta: float) -> np.ndarray:
    """RLOO's rewards with the KL in them (SPEC 3.2): r_k = score_k - beta sum_t (log pi_old -
    log pi_ref), sequence_kl the sum per sample, [N, G] like rewards."""
    return np.asarray(rewards, np.float64) - beta * np.asarray(sequence_kl, np.float64)


def length_penalised_rewards(rewards: np.ndarray, lengths: np.ndarray, weight: float, budget: int) -> np.ndarray:
    """Outcome rewards less a linear length penalty (a token-efficiency baseline, not a paper's
    recipe): r - weight |z| / L, |z| the completion's tokens and L the budget, [N, G]."""
    return np.asarray(rewards, np.float64) - weight * np.asarray(lengths, np.float64) / budget


CISPO_CLIPS = ("upper", "both")


def cispo_token_losses(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                       advantages: jax.Array, *, rho_max: float, clip: str, clip_eps: float,
                       clip_eps_high: float, beta: float) -> jax.Array:
    """CISPO (SPEC 3.2): l_t = -sg(w_t) A log pi_t + beta k3_t with the importance weight
    w_t = min(rho_t, rho_max) (`upper`, TRL / ScaleRL) or clip(rho_t, 1 - eps_lo, 1 + eps_hi)
    (`both`, verl). Its value holds log pi (unlike GRPO's at rho = 1). [B, T]."""
    ratio = jnp.exp(logp - old_logp)
    weight = jnp.minimum(ratio, rho_max) if clip == "upper" else jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps_high)
    loss = -jax.lax.stop_gradient(weight * advantages[:, None]) * logp
    return loss + beta * k3(logp, ref_logp) if beta else loss


def overlong_penalty(lengths: np.ndarray, max_length: int, cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment (SPEC 3.2): -min(1, max(0, |o| - (L_max - L_c)) / L_c)."""
    over = np.maximum(0.0, np.asarray(lengths, np.float64) - (max_length - cache)) / cache
    return -np.minimum(1.0, over)


def aggregate_token_losses(losses: jax.Array, mask: jax.Array, aggregation: str, *,
                           completion_tokens: jax.Array, rows: jax.Array, max_length: jax.Array) -> jax.Array:
    """A micro-batch's share of the batch loss, by the GLOBAL denominators:
    token: sum(mask l) / completion tokens of the batch; sequence: sum over rows of the row's
    token mean / rows of the batch; dr_grpo: sum(mask l) / (rows x max_length)."""
    if aggregation == "token":
        return jnp.sum(losses * mask) / completion_tokens
    if aggregation == "sequence":
        per_row = jnp.sum(losses * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)
        return jnp.sum(per_row) / rows
    if aggregation == "dr_grpo":
        return jnp.sum(losses * mask) / (rows * max_length)
    raise ValueError(f"aggregation {aggregation!r}: choose one of {AGGREGATIONS}")


# ---------------------------------------------------------------- MRT (SPEC 2.3-2.7)
def progress(j_values: np.ndarray) -> np.ndarray:
    """Progress of each episode from J at the prefixes [J(empty), J(c_0), ..., J(c_{k-1})]:
    p_j = J(c_j) - J(c_{j-1}); they sum to J(c_{k-1}) - J(empty)."""
    return np.diff(np.asarray(j_values, np.float64))


def termination_advantages(rewards: np.ndarray, j_prefix: np.ndarray) -> np.ndarray:
    """MRT-RL `termination` (the authors' RL README): A_i = r_i - J(c), no std scaling.
    rewards [N, G], j_prefix [N]."""
    return np.asarray(rewards, np.float64) - np.asarray(j_prefix, np.float64)[:, None]


def mixed_advantages(rewards: np.ndarray, forced_outcomes: np.ndarray) -> np.ndarray:
    """MRT-RL `mixed` (the paper's figure): {r_1..r_G} and the m forced-answer outcomes at c
    normalised together as one GRPO group; the advantages of the G continuations [N, G]."""
    rewards = np.asarray(rewards, np.float64)
    joint = np.concatenate([rewards, np.asarray(forced_outcomes, np.float64)], axis=-1)
    return (rewards - joint.mean(axis=-1, keepdims=True)) / (joint.std(axis=-1, ddof=1, keepdims=True) + GROUP_EPS)


def bonus_rewards(rewards: np.ndarray, j_after: np.ndarray, j_prefix: np.ndarray, alpha: float) -> np.ndarray:
    """MRT-RL `group` + bonus: R_i = r_i + alpha (J_after,i - J(c)), [N, G] (then GRPO group
    normalisation, in which J(c) cancels)."""
    return np.asarray(rewards, np.float64) + alpha * (np.asarray(j_after, np.float64)
                                                      - np.asarray(j_prefix, np.float64)[:, None])


# ---------------------------------------------------------------- advantage estimators by name
@dataclasses.dataclass(frozen=True)
class GroupOutcomes:
    """What an advantage estimator reads for N questions x G samples: rewards [N, G]; J(c) of
    each question's prefix [N]; the m forced-answer outcomes at it [N, m]; J after each sample's
    thinking [N, G] (the ones an algorithm's reading needs; None otherwise)."""

    rewards: np.ndarray
    j_prefix: np.ndarray | None = None
    forced: np.ndarray | None = None
    j_after: np.ndarray | None = None


def _needs(outcomes: GroupOutcomes, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(outcomes, f) is None]
    if missing:
        raise ValueError(f"the {name!r} advantages read {', '.join(missing)}, which the rollout did not give")


def _rloo(o: GroupOutcomes, scaling: str, alpha: float, eps: float) -> np.ndarray:
    return rloo_advantages(o.rewards)


def _group(o: GroupOutcomes, scaling: str, alpha: float, eps: float) -> np.ndarray:
    if alpha > 0:
        _needs(o, "group", "j_prefix", "j_after")
        return group_advantages(bonus_rewards(o.rewards, o.j_after, o.j_prefix, alpha), scaling, eps)
    return group_advantages(o.rewards, scaling, eps)


def _termination(o: GroupOutcomes, scaling: str, alpha: float, eps: float) -> np.ndarray:
    _needs(o, "termination", "j_prefix")
    return termination_advantages(o.rewards, o.j_prefix)


def _mixed(o: GroupOutcomes, scaling: str, alpha: float, eps: float) -> np.ndarray:
    _needs(o, "mixed", "forced")
    return mixed_advantages(o.rewards, o.forced)


# name -> estimator(outcomes, scaling, alpha, eps) -> [N, G] advantages
ADVANTAGE_ESTIMATORS: dict[str, Callable[[GroupOutcomes, str, float, float], np.ndarray]] = {
    "rloo": _rloo,  # r_k - mean of the other K - 1 (LaTRO)
    "group": _group,  # GRPO: (R_i - mean) / std by `scaling`, R_i = r_i + alpha (J_after,i - J(c))
    "termination": _termination,  # MRT-RL: r_i - J(c)
    "mixed": _mixed,  # MRT-RL: rewards and forced outcomes normalised as one group
}


def advantages(name: str, outcomes: GroupOutcomes, *, scaling: str = "group", alpha: float = 0.0,
               eps: float = GROUP_EPS) -> np.ndarray:
    """The [N, G] advantages of the estimator registered as `name` (ADVANTAGE_ESTIMATORS); eps
    is the group std's epsilon where the estimator divides by it."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](outcomes, scaling, alpha, eps)


def normalised_regret(tokens: Sequence[float], accuracy: Sequence[float], cutoff: float,
                      empty: float = 0.0) -> float:
    """Normalised regret of one trace at cutoff C0 (SPEC 2.4, the analysis code): points
    (x_j, y_j) = (tokens used, forced-answer accuracy) after each prefix, the empty one included:
    (0, 0), then (0, J(empty)) -- the curve starts at J(empty) -- then the episodes' points; when
    every x < C0 the last y is held to C0, else y is interpolated at C0 and later points dropped;
    area = trapezoid / C0; regret = 1 - area (the oracle answers right at once). A trace right
    from the start has regret 0; one with no thinking 1 - J(empty)."""
    xs = [0.0, 0.0, *map(float, tokens)]
    ys = [0.0, float(empty), *map(float, accuracy)]
    if xs[-1] < cutoff:
        xs.append(float(cutoff))
        ys.append(ys[-1])
    else:
        k = next(i for i, x in enumerate(xs) if x >= cutoff)
        y = ys[k - 1] + (ys[k] - ys[k - 1]) * (cutoff - xs[k - 1]) / (xs[k] - xs[k - 1])
        xs, ys = xs[:k] + [float(cutoff)], ys[:k] + [y]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return 1.0 - area / cutoff


def mean_of_means(per_problem: Sequence[Sequence[float]]) -> float:
    """The mean over problems of the mean over that problem's traces (not pooled)."""
    return float(np.mean([np.mean(v) for v in per_problem]))
