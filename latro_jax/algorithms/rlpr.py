"""RLPR (arXiv 2506.18254, OpenBMB/RLPR; SPEC 3.1) on GRPO's path (algorithms/mrt.py).

Per question: G full completions o (GRPO's rollout); each is cut before its answer marker (the
formatter's answer phrases, "The answer is"), the reasoning z = o[:cut] is followed by
y* = "The answer is {gold}." and r_k = the mean over the tokens of {gold} (the marker, the
period and the end token are context) of pi_theta(y*_t | x, z, y*_<t); a completion that states
no answer (no marker before its end) has format 0 and reward 0. r' = the same with no reasoning,
[x | y*], under pi_0 (the stage's initial weights), one row per question each update (not
cached: a resume is exact). R = (1 - w) max(r - r', 0) + w format (w = format_weight, 0.1);
GRPO's group advantages (eps 1e-6); the std filter drops a group whose std of R is below
ratio x an EMA of the updates' mean group std (StdFilter); the clipped surrogate (0.2, 0.27) on
every token of o, `token` aggregation, beta 0, 4 updates per rollout.

Not here: the code's entropy bonus (0.001), the refill of dropped groups (a batch learns from the
groups it kept), the repetition penalty option.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from latro_jax import objectives, rollout, sampling, scoring
from latro_jax.algorithms.core import Context, Policies
from latro_jax.algorithms.group_rl import GroupSampling, PolicyLoss
from latro_jax.algorithms.mrt import Grpo, GrpoConfig, MrtRollout
from latro_jax.data import Example
from latro_jax.models import ModelConfig
from latro_jax.sampling import SamplingParams
from latro_jax.stops import truncate
from latro_jax.update_plan import Lengths, Scoring, UpdatePlan


@dataclasses.dataclass(frozen=True)
class StdFilter:
    """Drop a group when the std of its rewards is below ratio x EMA (ratio 0: off). EMA: the
    mean over updates warmup_start..warmup_end (counted from 1) of each update's mean group std,
    then after every later update EMA <- decay EMA + (1 - decay) (that update's mean group std,
    all groups sampled); the filter acts from update warmup_end + 1."""

    ratio: float = 0.5
    decay: float = 0.99
    warmup_start: int = 6
    warmup_end: int = 10

    def __post_init__(self):
        if self.ratio < 0 or not 0 < self.decay < 1 or not 1 <= self.warmup_start <= self.warmup_end:
            raise ValueError(f"std_filter: ratio={self.ratio} must be >= 0, decay={self.decay} in (0, 1) and "
                             f"1 <= warmup_start={self.warmup_start} <= warmup_end={self.warmup_end}")


@dataclasses.dataclass
class StdEma:
    """The std filter's running state, each value held as float32 (what a checkpoint stores, so
    a resumed run filters exactly as an uninterrupted one)."""

    cfg: StdFilter
    updates: int = 0
    ema: float = -1.0  # < 0: not set yet
    warm_sum: float = 0.0
    warm_count: int = 0

    def step(self, sigma: np.ndarray) -> np.ndarray:
        """[N] the groups this update keeps, given their reward stds [N]; then advance."""
        c = self.cfg
        self.updates += 1
        acting = c.ratio > 0 and self.ema >= 0  # the EMA is set at the end of update warmup_end
        kept = sigma >= c.ratio * self.ema if acting else np.ones(len(sigma), bool)
        mean = float(np.mean(sigma))
        if c.warmup_start <= self.updates <= c.warmup_end:
            self.warm_sum, self.warm_count = _f32(self.warm_sum + mean), self.warm_count + 1
            if self.updates == c.warmup_end:
                self.ema = _f32(self.warm_sum / self.warm_count)
        elif self.updates > c.warmup_end:
            self.ema = _f32(objectives.ema_update(self.ema, mean, c.decay))
        return kept

    def array(self) -> np.ndarray:
        return np.array([self.updates, self.ema, self.warm_sum, self.warm_count], np.float32)

    def load(self, values: np.ndarray) -> None:
        updates, self.ema, self.warm_sum, warm_count = (float(v) for v in values)
        self.updates, self.warm_count = int(updates), int(warm_count)


def _f32(value: float) -> float:
    return float(np.float32(value))


@dataclasses.dataclass(frozen=True)
class RlprConfig(GrpoConfig):
    """GRPO's keys with RLPR's defaults (SPEC 3.1), and format_weight w (R = (1 - w) max(r - r',
    0) + w format) and std_filter (StdFilter)."""

    rollout: GroupSampling = GroupSampling(num_samples=8, max_tokens=3072, sampling=SamplingParams(temperature=1.0))
    loss: PolicyLoss = PolicyLoss(clip_eps=0.2, clip_eps_high=0.27, beta=0.0, aggregation="token",
                                  updates_per_rollout=4)
    advantage_eps: float = 1e-6
    format_weight: float = 0.1
    std_filter: StdFilter = StdFilter()

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.format_weight <= 1:
            raise ValueError(f"format_weight={self.format_weight} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class GoldAnswer:
    """y* as token ids, and the span (start, end) of the gold answer's own tokens in them."""

    ids: list[int]
    span: tuple[int, int]


@dataclasses.dataclass
class RlprRollout(MrtRollout):
    """GRPO's rollout and, per question, y* after a reasoning and after none."""

    answers: list[tuple[GoldAnswer, GoldAnswer]] = dataclasses.field(default_factory=list)


class Rlpr(Grpo):
    """GRPO whose rewards are the gold answer's debiased mean token probability (RLPR)."""

    name = "rlpr"
    Config = RlprConfig
    shown = ("reward", "accuracy", "kept_groups", "completion_length", "sample_tokens_per_s")
    curves = ("reward", "accuracy", "gold_prob", "completion_length")

    def __init__(self, cfg: RlprConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.rlpr = cfg
        self.needs_reference = True  # r' under pi_0
        self.filter = StdEma(cfg.std_filter)

    def tokens_after_prompt(self, example: Example) -> int:
        """A completion (L), or a reasoning cut from one followed by y*."""
        fmt = self.ctx.fmt
        return self.cfg.rollout.max_tokens + max(len(fmt.answer_ids(example.answer)),
                                                 len(fmt.completion_ids(example.answer)))

    def plan(self, questions: int, lengths: Lengths, model_config: ModelConfig) -> UpdatePlan:
        """GRPO's, with the gold rows' policy pass [x | z | y*] and the prior rows' reference
        pass [x | y*] (one per question, padded as the scorer pads)."""
        plan = super().plan(questions, lengths, model_config)
        G, ctx = self.cfg.rollout.num_samples, self.ctx
        prompt = sampling.bucket(lengths.prompt, sampling.MIN_PROMPT_BUCKET)
        body = lambda n: rollout.row_widths(lengths.prompt, n, body_multiple=rollout.ROLLOUT_BODY_MULTIPLE)[1]
        rows = self.rows(questions)
        shared = (scoring.sharing_group(model_config, prompt, G, rows, microbatches=ctx.microbatches, mesh=ctx.mesh)
                  if self.cfg.share_prompts else None)
        gold = (Scoring("gold", rows, body(self.cfg.rollout.max_tokens + lengths.answer), temperature=self.temperature,
                        shared_prefix=shared),
                Scoring("prior", scoring.padded_rows(questions, ctx.microbatches, ctx.mesh), body(lengths.answer),
                        temperature=self.temperature))
        return dataclasses.replace(plan, scoring=(*plan.scoring, *gold))

    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> RlprRollout:
        fmt = self.ctx.fmt
        gold = lambda ids, e: GoldAnswer(ids, fmt.gold_span(ids, e.gold))  # once per question
        answers = [(gold(fmt.answer_ids(e.answer), e), gold(fmt.completion_ids(e.answer), e)) for e in examples]
        return RlprRollout(**vars(super().rollout(policies, examples, key)), answers=answers)

    def gold_rows(self, prompts: Sequence[Sequence[int]], reasonings: Sequence[Sequence[int]],
                  questions: Sequence[int], ro: RlprRollout) -> tuple[rollout.Rows, np.ndarray]:
        """Rows [x | z | y*] (y* after a reasoning, its whole-completion spelling after none) and
        their gold mask, the tokens of the gold answer."""
        answers = [ro.answers[n][0 if z else 1] for z, n in zip(reasonings, questions)]
        body = max(len(z) + len(y.ids) for z, y in zip(reasonings, answers))
        longest = max(map(len, prompts))
        width, length = rollout.row_widths(longest, body, body_multiple=rollout.ROLLOUT_BODY_MULTIPLE)
        rows = rollout.assemble_rows(prompts, reasonings, [y.ids for y in answers], prompt_width=width,
                                     length=length, pad_id=self.ctx.fmt.pad_id)
        gold = np.zeros_like(rows.answer_mask)
        for r, y in enumerate(answers):
            gold[r, np.flatnonzero(rows.answer_mask[r])[slice(*y.span)]] = 1.0
        return rows, gold

    def outcomes(self, policies: Policies, ro: RlprRollout) -> objectives.GroupOutcomes:
        """R [N, G]: the debiased gold probabilities (objectives.rlpr_rewards)."""
        fmt, G, N, scorer = self.ctx.fmt, self.cfg.rollout.num_samples, len(ro.answers), policies.scorer
        cuts = [truncate(o, fmt.stops)[0] for o in ro.continuations]
        formatted = np.array([cut < truncate(o, fmt.stops.ends_only())[0] for o, cut in zip(ro.continuations, cuts)])
        rows, gold = self.gold_rows(ro.prompts, [o[:cut] for o, cut in zip(ro.continuations, cuts)],
                                    [r // G for r in range(N * G)], ro)
        logp = scorer.token_logprobs(policies.params, {"tokens": rows.tokens, "valid": rows.valid},
                                     temperature=self.temperature,
                                     shared_prefix=scorer.prefix_sharing(rows, G) if self.cfg.share_prompts else None)
        probs = objectives.mean_token_probs(logp, gold).reshape(N, G)
        prompts = ro.prompts[::G]
        prior_rows, prior_gold = self.gold_rows(prompts, [[] for _ in prompts], range(N), ro)
        prior_logp = scorer.token_logprobs(policies.reference, scorer.padded({"tokens": prior_rows.tokens,
                                                                             "valid": prior_rows.valid}),
                                           temperature=self.temperature)[:N]
        prior = objectives.mean_token_probs(prior_logp, prior_gold)
        rewards = objectives.rlpr_rewards(probs, prior, formatted.reshape(N, G), self.rlpr.format_weight)
        ro.metrics.update(accuracy=float(ro.outcomes.rewards.mean()), gold_prob=float(probs.mean()),
                          prior_prob=float(prior.mean()), formatted=float(formatted.mean()))
        return dataclasses.replace(ro.outcomes, rewards=rewards)

    def kept_groups(self, ro: RlprRollout, outcomes: objectives.GroupOutcomes) -> np.ndarray:
        """The std filter's groups (and its EMA advanced by this update's groups)."""
        kept = self.filter.step(outcomes.rewards.std(axis=1, ddof=1))
        ro.metrics["std_ema"] = self.filter.ema
        return kept

    def state(self) -> dict[str, np.ndarray]:
        return {"std_filter": self.filter.array()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.filter.load(state["std_filter"])
