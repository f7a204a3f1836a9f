"""The GRPO variants of SPEC 3.2 on GRPO's one code path (algorithms/mrt.py): each is GRPO with
its own defaults for the policy-loss block (group_rl.PolicyLoss) and, for DAPO, its reward
shaping and group dropping.

- DAPO (arXiv 2503.14476): reward +-1 plus the soft overlong punishment
  -min(1, max(0, |o| - (L_max - L_c)) / L_c) (L_max = rollout.max_tokens, L_c = overlong_cache;
  0 = off); groups whose outcomes are all equal are dropped and, with refill_rounds, more
  questions are sampled (refill_factor batches a round) until the batch holds batch_size kept
  groups (dynamic sampling; when the rounds run out, dropped groups fill the batch with no
  completion token, so shapes stay fixed);
  clip-higher (0.2, 0.28), `token` aggregation, beta 0, advantage eps 1e-6.
- GSPO (arXiv 2507.18071): the clipped sequence ratio, length-normalised (0.0003, 0.0004),
  `sequence` aggregation, beta 0, 4 updates per rollout (the clip acts only off-policy).
- CISPO (arXiv 2506.13585): -sg(min(rho, 5)) A log pi (or the two-sided clip), `token`, beta 0.
- RLOO (arXiv 2402.14740, TRL's trainer): the KL in the reward, r_k = score_k - 0.05 sum_t
  (log pi_old - log pi_ref), leave-one-out advantages, the clipped plain-sum sequence ratio
  (0.2), the mean over rows, K = 2.
Dr. GRPO is grpo with scaling="none", loss.aggregation="dr_grpo"; TRL's `bnpo` is grpo's
`token` aggregation on one micro-batch (SPEC 3.2: no new math).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from latro_jax import objectives
from latro_jax.algorithms.core import Context, Policies
from latro_jax.algorithms.group_rl import GroupSampling, PolicyLoss
from latro_jax.algorithms.mrt import Grpo, GrpoConfig, MrtRollout, gather_groups
from latro_jax.data import Example
from latro_jax.models import ModelConfig
from latro_jax.update_plan import Lengths, UpdatePlan


@dataclasses.dataclass(frozen=True)
class DapoConfig(GrpoConfig):
    """GRPO's keys with DAPO's defaults, and overlong_cache L_c (0: no overlong shaping),
    drop_uniform_groups (dynamic sampling's filter: drop groups whose outcomes are all equal) and
    its refill: at most refill_rounds more rounds of sampling, each of refill_factor batches of
    questions from the data iterator, until batch_size groups are kept (0: a batch learns from
    the groups it kept; the paper: 10 rounds of 3)."""

    loss: PolicyLoss = PolicyLoss(clip_eps=0.2, clip_eps_high=0.28, beta=0.0, aggregation="token")
    advantage_eps: float = 1e-6
    overlong_cache: int = 0
    drop_uniform_groups: bool = True
    refill_rounds: int = 0
    refill_factor: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.refill_rounds < 0 or self.refill_factor < 1:
            raise ValueError(f"refill_rounds={self.refill_rounds} must be >= 0 and refill_factor="
                             f"{self.refill_factor} >= 1")
        if self.refill_rounds and not self.drop_uniform_groups:
            raise ValueError(f"refill_rounds={self.refill_rounds} refills dropped groups: it needs "
                             "drop_uniform_groups=True")
        if not 0 <= self.overlong_cache <= self.rollout.max_tokens:
            raise ValueError(f"overlong_cache={self.overlong_cache} must be in [0, rollout.max_tokens="
                             f"{self.rollout.max_tokens}]")


class Dapo(Grpo):
    """GRPO with DAPO's rewards (+-1, overlong shaping) and dropped all-equal groups."""

    name = "dapo"
    Config = DapoConfig
    shown = ("reward", "kept_groups", "refill_rounds", "clipped", "completion_length", "sample_tokens_per_s")

    def __init__(self, cfg: DapoConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.dapo = cfg
        self.draws_more = cfg.refill_rounds > 0

    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array,
                more: Callable[[], Sequence[Example]] | None = None) -> MrtRollout:
        """GRPO's rollout, refilled: while fewer than len(examples) groups are kept and rounds
        are left, refill_factor more batches of questions (`more`) are sampled; the batch is the
        first len(examples) kept groups in sampling order, completed by the first round's
        dropped groups when the rounds ran out."""
        ro = super().rollout(policies, examples, key)
        if more is None:
            return ro
        N, rounds = len(examples), [ro]
        kept = [self.kept_groups(ro, ro.outcomes)]
        while sum(int(k.sum()) for k in kept) < N and len(rounds) <= self.dapo.refill_rounds:
            questions = [e for _ in range(self.dapo.refill_factor) for e in more()]
            rounds.append(super().rollout(policies, questions, jax.random.fold_in(key, len(rounds))))
            kept.append(self.kept_groups(rounds[-1], rounds[-1].outcomes))
        picks = [(i, int(q)) for i, k in enumerate(kept) for q in np.flatnonzero(k)][:N]
        picks += [(0, int(q)) for q in np.flatnonzero(~kept[0])][:N - len(picks)]
        out = gather_groups(rounds, picks, self.cfg.rollout.num_samples)
        out.metrics.update(refill_rounds=float(len(rounds) - 1),
                           sampled_questions=float(sum(len(r.prefixes) for r in rounds)))
        return out

    def plan(self, questions: int, lengths: Lengths, model_config: ModelConfig) -> UpdatePlan:
        """GRPO's, with every refill round taken (refill_factor batches of questions each)."""
        plan = super().plan(questions, lengths, model_config)
        if not self.dapo.refill_rounds:
            return plan
        first = next(g for g in plan.generations if g.name == "completions")
        refill = dataclasses.replace(first, name="refill", prompts=first.prompts * self.dapo.refill_factor,
                                     calls=self.dapo.refill_rounds)
        return dataclasses.replace(plan, generations=(*plan.generations, refill))

    def outcomes(self, policies: Policies, ro: MrtRollout) -> objectives.GroupOutcomes:
        acc = ro.outcomes.rewards
        shaped = 2 * acc - 1
        if self.dapo.overlong_cache:
            lengths = np.array([len(z) for z in ro.continuations]).reshape(acc.shape)
            shaped = shaped + objectives.overlong_penalty(lengths, self.dapo.rollout.max_tokens,
                                                          self.dapo.overlong_cache)
        return dataclasses.replace(ro.outcomes, rewards=shaped)

    def kept_groups(self, ro: MrtRollout, outcomes: objectives.GroupOutcomes) -> np.ndarray:
        acc = ro.outcomes.rewards  # the outcomes, not the shaped rewards, decide (SPEC 3.2)
        if not self.dapo.drop_uniform_groups:
            return super().kept_groups(ro, outcomes)
        return ~np.all(acc == acc[:, :1], axis=1)


@dataclasses.dataclass(frozen=True)
class GspoConfig(GrpoConfig):
    """GRPO's keys with GSPO's defaults (SPEC 3.2)."""

    loss: PolicyLoss = PolicyLoss(objective="gspo", clip_eps=3e-4, clip_eps_high=4e-4, beta=0.0,
                                  aggregation="sequence", updates_per_rollout=4)


class Gspo(Grpo):
    name = "gspo"
    Config = GspoConfig
    shown = ("reward", "clipped", "completion_length", "sample_tokens_per_s")


@dataclasses.dataclass(frozen=True)
class CispoConfig(GrpoConfig):
    """GRPO's keys with CISPO's defaults (SPEC 3.2; loss.cispo_clip upper | both)."""

    loss: PolicyLoss = PolicyLoss(objective="cispo", cispo_max=5.0, beta=0.0, aggregation="token")


class Cispo(Grpo):
    name = "cispo"
    Config = CispoConfig
    shown = ("reward", "clipped", "completion_length", "sample_tokens_per_s")


@dataclasses.dataclass(frozen=True)
class RlooConfig(GrpoConfig):
    """GRPO's keys with RLOO's defaults (SPEC 3.2, TRL): K 2, leave-one-out advantages of the
    rewards less 0.05 x the sampled sequence's KL to the reference, the clipped plain-sum
    sequence ratio (0.2), the mean over rows, no KL in the loss."""

    rollout: GroupSampling = GroupSampling(num_samples=2)
    loss: PolicyLoss = PolicyLoss(objective="rloo", clip_eps=0.2, beta=0.0, aggregation="sequence")
    advantage: str = "rloo"
    reward_kl: float = 0.05


class Rloo(Grpo):
    name = "rloo"
    Config = RlooConfig
    shown = ("reward", "sequence_kl", "clipped", "completion_length", "sample_tokens_per_s")
