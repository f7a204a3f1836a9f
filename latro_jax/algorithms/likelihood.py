"""The likelihood-reward family beside LaTRO (SPEC 3.1): the model's own probability of the gold
answer after each sampled rationale is the reward, with no verifier. Each is LaTRO's rollout and
scoring (algorithms/latro.py: K rationales, rows [x | z | y], log pi(z|x) and log pi(y|x+z) per
row, from the sampler where it can) with its own rewards, advantages and per-row answer weights
in the one loss mean(-sg(A) log pi(z|x) - sg(w) log pi(y|x+z)); none has a KL term, so none
runs a reference pass.

- VeriFree (arXiv 2505.21493): R_k = pi(y|x+z_k) (`reward="prob"`; `"logprob"`: its log), 0
  for an unfinished z_k; A = RLOO(R); w = R (`answer_weight="reward"`, the released run), A
  (`"advantage"`) or 1 (`"one"`).
- JEPO (arXiv 2503.19618): `single` A = RLOO(l), w = 1 (LaTRO with beta 0, c_sft 1, no non-stop
  penalty); `multi` the multi-sample Jensen bound L = log mean_k e^{l_k}, A_k = L - log
  mean_{j != k} e^{l_j}, w = softmax(l), summed over a question's K rows (the loss is K x the
  row mean: A and w are scaled by K).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from latro_jax import objectives
from latro_jax.algorithms.latro import Latro, RationaleRollout

ANSWER_WEIGHTS = ("reward", "advantage", "one")
JEPO_MODES = ("single", "multi")


@dataclasses.dataclass(frozen=True)
class VerifreeConfig(RationaleRollout):
    """SPEC 3.1 defaults: K 8, L 3000 at T 1, reward prob | logprob, answer_weight
    reward | advantage | one."""

    num_samples: int = 8
    max_rationale_tokens: int = 3000
    reward: str = "prob"
    answer_weight: str = "reward"

    def __post_init__(self):
        super().__post_init__()
        for name, value, options in (("reward", self.reward, objectives.LIKELIHOOD_REWARDS),
                                     ("answer_weight", self.answer_weight, ANSWER_WEIGHTS)):
            if value not in options:
                raise ValueError(f"{name}={value!r}: choose one of {options}")


class LikelihoodReward(Latro):
    """LaTRO's rollout, scoring and loss with a subclass's `estimate`; no KL, so no reference."""

    needs_reference = False
    answer_weights = True
    shown = ("reward", "answer_logp", "finished", "sample_tokens_per_s")
    curves = ("reward", "answer_logp", "finished")


class Verifree(LikelihoodReward):
    name = "verifree"
    Config = VerifreeConfig

    def estimate(self, logps: dict[str, np.ndarray], finished: np.ndarray):
        rewards = objectives.verifree_rewards(logps["y_logp"], finished, self.cfg.reward)
        advantages = objectives.rloo_advantages(rewards)
        weight = {"reward": rewards, "advantage": advantages, "one": np.ones_like(rewards)}[self.cfg.answer_weight]
        return rewards, advantages, weight


@dataclasses.dataclass(frozen=True)
class JepoConfig(RationaleRollout):
    """JEPO (no released code; K and the control variate are open points, SPEC 3.4): K 8, L 500
    at T 1, mode single | multi."""

    num_samples: int = 8
    mode: str = "multi"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in JEPO_MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {JEPO_MODES}")


class Jepo(LikelihoodReward):
    name = "jepo"
    Config = JepoConfig

    def estimate(self, logps: dict[str, np.ndarray], finished: np.ndarray):
        """Rewards are the answer log-likelihoods of every row (finished or not)."""
        l = np.asarray(logps["y_logp"], np.float64)
        if self.cfg.mode == "single":
            return l, objectives.rloo_advantages(l), np.ones_like(l)
        advantages, weights = objectives.jepo_multi(l)
        K = l.shape[-1]  # 1/N sum over a question's rows = K x the mean over rows
        return l, K * advantages, K * weights
