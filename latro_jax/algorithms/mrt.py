"""MRT-RL and outcome-reward GRPO (SPEC 2.5-2.6): one code path.

Per question and update:
1. prefix c: a trace of x sampled from pi_old (the stage's starting weights, or the policy
   refreshed every `prefix_refresh` updates), cut after j episodes, j uniform in {0, ..., k-1}
   (j = 0: the empty prefix); `prefixes = "empty"` always takes c = empty (GRPO);
2. G continuations z_i ~ pi_theta(. | x + c) to their end (budget `full` L, or `remaining`
   L - |c|); r_i = the task's training reward of z_i (Task.reward: 1 only when z_i finished
   within its budget and the answer it states is right);
3. J(c) by the meta-prover (mc or likelihood); with `group` and alpha > 0 also
   J_after,i = J(c + thinking of z_i);
4. advantages: `termination` A_i = r_i - J(c); `mixed` {r_i} and the m forced outcomes at c as
   one GRPO group; `group` R_i = r_i + alpha (J_after,i - J(c)) then GRPO normalisation;
5. the GRPO token loss (clipped surrogate + beta k3 KL) on the continuation tokens.
alpha = 0, empty prefixes and `group` is outcome-reward GRPO: the `grpo` algorithm is this
class with exactly that configuration. `continuation = "episode"` samples only the next
episode and rewards it by alpha (J(c + z) - J(c)).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import jax
import numpy as np

from latro_jax import objectives, rollout, sampling, scoring
from latro_jax.algorithms.core import Context, Policies, ScoredBatch
from latro_jax.data import Example
from latro_jax.episodes import SegmentConfig, make_segmenter
from latro_jax.meta_prover import ForcingConfig, MetaProver
from latro_jax.models import Transformer
from latro_jax.rollout import truncate
from latro_jax.sampling import SamplingParams

ADVANTAGES = ("termination", "mixed", "group")
PREFIXES = ("traces", "empty")
BUDGETS = ("full", "remaining")
CONTINUATIONS = ("full", "episode")


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """Outcome-reward GRPO (SPEC 2.5; TRL as the paper's runs used it): G = num_samples
    completions of at most max_tokens per question, sampled at sampling.temperature (paper
    0.9); advantage: group | batch (std over the batch) | none (Dr. GRPO); the clipped
    surrogate (clip_eps) with beta * k3 KL to the reference in the loss; aggregation: token |
    sequence | dr_grpo; logprobs_at_temperature: log-probabilities of logits / T (the paper's
    TRL did not divide); share_prompts: the reference pass and the step run each question's
    prompt once for its G rows (scoring.prefix_sharing)."""

    num_samples: int = 4
    max_tokens: int = 512
    sampling: SamplingParams = SamplingParams(temperature=0.9)
    advantage: str = "group"
    clip_eps: float = 0.2
    beta: float = 0.04
    aggregation: str = "token"
    logprobs_at_temperature: bool = True
    share_prompts: bool = True

    def __post_init__(self):
        if self.advantage not in objectives.ADVANTAGE_SCALINGS:
            raise ValueError(f"advantage={self.advantage!r}: choose one of {objectives.ADVANTAGE_SCALINGS}")
        self.as_mrt()  # the remaining checks

    def as_mrt(self) -> "MrtConfig":
        return MrtConfig(num_samples=self.num_samples, max_tokens=self.max_tokens, sampling=self.sampling,
                         prefixes="empty", advantage="group", alpha=0.0, scaling=self.advantage,
                         clip_eps=self.clip_eps, beta=self.beta, aggregation=self.aggregation,
                         logprobs_at_temperature=self.logprobs_at_temperature, share_prompts=self.share_prompts)


@dataclasses.dataclass(frozen=True)
class MrtConfig:
    """MRT-RL (SPEC 2.6). The GRPO fields as in GrpoConfig (scaling: the std of `group`
    advantages); prefixes: traces | empty; prefix_refresh: 0 = pi_old is the stage's starting
    model, N = the policy copied every N updates; max_prefix_tokens: the longest prefix the prompt
    holds (0 = max_tokens; the paper's prompt length, 4,096 for R1); budget: full | remaining; advantage:
    termination (default) | mixed | group; alpha: the progress bonus weight, read by `group`
    (R_i = r_i + alpha (J_after,i - J(c)), J_after the meta-prover's estimate after z_i's
    thinking: the bonus acts) and `episode` (refused where it can have no effect);
    continuation: full | episode; segment: how traces split into episodes; forcing: the
    meta-prover (suffix, mc | likelihood, m); share_prompts: the reference pass and the step run
    each question's prompt (with its prefix) once for its G rows."""

    num_samples: int = 4
    max_tokens: int = 512
    sampling: SamplingParams = SamplingParams(temperature=0.9)
    prefixes: str = "traces"
    prefix_refresh: int = 0
    max_prefix_tokens: int = 0
    budget: str = "full"
    advantage: str = "termination"
    alpha: float = 0.0
    continuation: str = "full"
    scaling: str = "group"
    clip_eps: float = 0.2
    beta: float = 0.04
    aggregation: str = "token"
    logprobs_at_temperature: bool = True
    share_prompts: bool = True
    segment: SegmentConfig = SegmentConfig()
    forcing: ForcingConfig = ForcingConfig()

    def __post_init__(self):
        for name, value, options in (("prefixes", self.prefixes, PREFIXES), ("budget", self.budget, BUDGETS),
                                     ("advantage", self.advantage, ADVANTAGES),
                                     ("continuation", self.continuation, CONTINUATIONS),
                                     ("scaling", self.scaling, objectives.ADVANTAGE_SCALINGS),
                                     ("aggregation", self.aggregation, objectives.AGGREGATIONS)):
            if value not in options:
                raise ValueError(f"{name}={value!r}: choose one of {options}")
        if self.num_samples < 1 or self.max_tokens < 1 or self.prefix_refresh < 0 or self.max_prefix_tokens < 0:
            raise ValueError(f"num_samples={self.num_samples} and max_tokens={self.max_tokens} must be "
                             f">= 1, prefix_refresh={self.prefix_refresh} and max_prefix_tokens="
                             f"{self.max_prefix_tokens} >= 0")
        if self.advantage in ("group", "mixed") and self.num_samples < 2:
            raise ValueError(f"num_samples={self.num_samples}: {self.advantage} advantages need G >= 2")
        if self.alpha < 0 or self.beta < 0 or not 0 < self.clip_eps < 1:
            raise ValueError(f"alpha={self.alpha} and beta={self.beta} must be >= 0, clip_eps={self.clip_eps} "
                             "in (0, 1)")
        if self.advantage == "mixed" and self.forcing.estimator != "mc":
            raise ValueError("advantage='mixed' normalises the forced-answer outcomes with the rewards: it "
                             "needs forcing.estimator='mc'")
        if self.alpha > 0 and self.advantage in ("termination", "mixed"):
            raise ValueError(f"alpha={self.alpha} has no effect with advantage={self.advantage!r} (its "
                             "advantages do not read the progress bonus); set alpha=0, or advantage='group' "
                             "for R_i = r_i + alpha (J_after,i - J(c)).")
        if self.continuation == "episode" and (self.advantage != "group" or self.alpha <= 0):
            raise ValueError("continuation='episode' rewards an episode by alpha (J(c + z) - J(c)): it needs "
                             "advantage='group' and alpha > 0")
        if self.prefixes == "empty" and self.prefix_refresh:
            raise ValueError("prefix_refresh needs prefixes='traces' (empty prefixes never sample from pi_old)")

    @property
    def prefix_limit(self) -> int:
        """The most tokens a prefix holds (0 with empty prefixes)."""
        if self.prefixes == "empty":
            return 0
        return min(self.max_tokens, self.max_prefix_tokens) if self.max_prefix_tokens else self.max_tokens

    @property
    def uses_j(self) -> bool:
        return self.advantage in ("termination", "mixed") or self.alpha > 0

    @property
    def uses_j_after(self) -> bool:
        """J after each continuation's thinking (the `group` bonus; `episode`'s reward)."""
        return self.advantage == "group" and self.alpha > 0


@dataclasses.dataclass
class MrtRollout:
    """One update's samples: per row (N*G, question-major) the prompt x + c and the continuation
    z (stop included); per question the prefix c, its episode count j and J(c) (with mc: the
    m forced outcomes); per row the reward r and J_after."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    finished: np.ndarray
    prefixes: list[list[int]]
    prefix_episodes: np.ndarray
    rewards: np.ndarray
    j_prefix: np.ndarray | None
    forced_outcomes: np.ndarray | None
    j_after: np.ndarray | None
    sampled_tokens: int  # every token generated: prefix traces, continuations, forced answers


class Mrt:
    name = "mrt"
    Config = MrtConfig
    trains_on = "questions"
    shown = ("reward", "j_prefix", "advantage_abs", "completion_length", "sample_tokens_per_s")
    curves = ("reward", "j_prefix", "completion_length", "kl")

    def __init__(self, cfg: MrtConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.needs_reference = cfg.beta > 0
        self.old_policy_refresh = cfg.prefix_refresh if cfg.prefixes == "traces" else None
        self.prover = MetaProver(cfg.forcing, ctx.task, ctx.fmt, ctx.mesh) if cfg.uses_j else None
        self.segmenter = make_segmenter(cfg.segment, ctx.fmt)
        if cfg.continuation == "episode" and cfg.scaling != "none":
            warnings.warn(f"{self.name}: continuation='episode' rewards are alpha (J(c + z) - J(c)) and "
                          f"scaling={cfg.scaling!r} divides them by their std, so alpha={cfg.alpha} cancels: "
                          "any alpha > 0 trains alike. Set scaling='none' for alpha to scale the step.",
                          stacklevel=2)

    def rows(self, questions: int) -> int:
        return questions * self.cfg.num_samples

    def tokens_after_prompt(self, example: Example) -> int:
        """A prefix (at most L) and a continuation (L), or a prefix (plus, where J_after is
        computed, the continuation's thinking) with the forcing suffix and answer."""
        cfg = self.cfg
        prefix = cfg.prefix_limit
        forced = self.prover.forced_tokens() if self.prover else 0
        return max(prefix + cfg.max_tokens, prefix + cfg.max_tokens * cfg.uses_j_after + forced)

    # ------------------------------------------------------------ rollout
    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> MrtRollout:
        cfg, fmt, G = self.cfg, self.ctx.fmt, self.cfg.num_samples
        forced_before = self.prover.generated_tokens if self.prover else 0
        k_prefix, k_cut, k_cont, k_j, k_after = jax.random.split(key, 5)
        prompts = [fmt.prompt_ids(e.question) for e in examples]
        golds = [e.gold for e in examples]
        prefixes, counts = self.prefixes(policies, prompts, k_prefix, k_cut)
        budgets = [cfg.max_tokens if cfg.budget == "full" else max(cfg.max_tokens - len(c), 1) for c in prefixes]
        stops = self.segmenter.episode_ends() if cfg.continuation == "episode" else ()
        p = cfg.sampling
        out = sampling.generate(policies.model(), [x + c for x, c in zip(prompts, prefixes)], max(budgets),
                                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, num_samples=G,
                                stop_token_ids=fmt.stop_ids, stop_sequences=stops, key=k_cont,
                                pad_id=fmt.pad_id, mesh=self.ctx.mesh)
        continuations = [out.token_array[r, :min(out.lengths[r], budgets[r // G])].tolist()
                         for r in range(len(out.lengths))]
        finished = np.array([bool(out.finished[r]) and out.lengths[r] <= budgets[r // G]
                             for r in range(len(out.lengths))])
        j_prefix = forced = j_after = None
        if cfg.uses_j:
            result = self.prover.estimate(policies, prompts, prefixes, golds, k_j)
            j_prefix, forced = result.j, result.outcomes
        if cfg.continuation == "episode":
            rewards = np.zeros((len(examples), G))
        else:
            rewards = np.array([[self.ctx.task.reward(fmt.decode(continuations[n * G + g]), golds[n],
                                                      finished[n * G + g])
                                 for g in range(G)] for n in range(len(examples))], np.float64)
        if cfg.uses_j_after:  # J after each continuation's thinking (the whole thinking where it ended)
            cuts = [truncate(z, self.segmenter.thinking_end) for z in continuations]
            thinking = [z[:n] for z, (n, _) in zip(continuations, cuts)]
            after = self.prover.estimate(policies, [prompts[r // G] for r in range(len(thinking))],
                                         [prefixes[r // G] + z for r, z in enumerate(thinking)],
                                         [golds[r // G] for r in range(len(thinking))], k_after,
                                         final=[ended and cfg.continuation == "full" for _, ended in cuts])
            j_after = after.j.reshape(len(examples), G)
        sampled = int(out.lengths.sum()) + self.prefix_tokens + (self.prover.generated_tokens - forced_before
                                                                  if self.prover else 0)
        return MrtRollout([x + c for x, c in zip(prompts, prefixes) for _ in range(G)], continuations, finished,
                          prefixes, np.array(counts), rewards, j_prefix, forced, j_after, sampled)

    def prefixes(self, policies: Policies, prompts: list[list[int]], key: jax.Array, cut_key: jax.Array):
        """(prefix ids, episodes in each prefix) per question: a trace from pi_old cut after j
        episodes, j uniform in {0, ..., k-1} among the cuts that fit max_prefix_tokens
        (deterministic in the key and the question's position), or the empty prefix."""
        self.prefix_tokens = 0
        if self.cfg.prefixes == "empty":
            return [[] for _ in prompts], [0] * len(prompts)
        p, fmt = self.cfg.sampling, self.ctx.fmt
        traces = sampling.generate(policies.model(policies.old), prompts, self.cfg.max_tokens,
                                   temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                   stop_token_ids=fmt.stop_ids, key=key, pad_id=fmt.pad_id, mesh=self.ctx.mesh)
        self.prefix_tokens = int(traces.lengths.sum())
        prefixes, counts = [], []
        for n, trace in enumerate(traces.tokens):
            episodes = self.segmenter(trace[0])
            fits = sum(1 for j in range(episodes.count) if len(episodes.prefix(j)) <= self.cfg.prefix_limit)
            j = int(jax.random.randint(jax.random.fold_in(cut_key, n), (), 0, max(fits, 1)))
            prefixes.append(episodes.prefix(j))
            counts.append(j)
        return prefixes, counts

    # ------------------------------------------------------------ score
    def advantages(self, ro: MrtRollout) -> np.ndarray:
        """[N, G] advantages by the configured reading (SPEC 2.6)."""
        cfg = self.cfg
        if cfg.advantage == "termination":
            return objectives.termination_advantages(ro.rewards, ro.j_prefix)
        if cfg.advantage == "mixed":
            return objectives.mixed_advantages(ro.rewards, ro.forced_outcomes)
        rewards = ro.rewards
        if cfg.alpha > 0:
            rewards = objectives.bonus_rewards(ro.rewards, ro.j_after, ro.j_prefix, cfg.alpha)
        return objectives.group_advantages(rewards, cfg.scaling)

    def score(self, policies: Policies, ro: MrtRollout) -> ScoredBatch:
        cfg = self.cfg
        advantages = self.advantages(ro).reshape(-1).astype(np.float32)
        rows = rollout.completion_rows(ro.prompts, ro.continuations, pad_id=self.ctx.pad_id)
        arrays = dict(tokens=rows.tokens, valid=rows.valid, completion_mask=rows.answer_mask,
                      advantages=advantages)
        shared = policies.scorer.prefix_sharing(rows, cfg.num_samples) if cfg.share_prompts else None
        if self.needs_reference:
            arrays["ref_logp"] = policies.scorer.token_logprobs(policies.reference, arrays,
                                                                temperature=self.temperature, shared_prefix=shared)
        lengths = np.array([len(z) for z in ro.continuations])
        metrics = {"reward": float(ro.rewards.mean()), "finished": float(ro.finished.mean()),
                   "completion_length": float(lengths.mean()), "advantage_abs": float(np.abs(advantages).mean()),
                   "prefix_episodes": float(ro.prefix_episodes.mean()),
                   "prefix_length": float(np.mean([len(c) for c in ro.prefixes])),
                   "sampled_tokens": float(ro.sampled_tokens)}
        if ro.j_prefix is not None:
            metrics["j_prefix"] = float(ro.j_prefix.mean())
        if ro.j_after is not None:
            metrics["bonus"] = float((ro.j_after - ro.j_prefix[:, None]).mean())
        scalars = {"completion_tokens": float(rows.answer_mask.sum()), "rows": float(len(advantages)),
                   "max_length": float(cfg.max_tokens)}
        details = {"rewards": ro.rewards, "advantages": advantages.reshape(ro.rewards.shape)}
        return ScoredBatch(arrays=arrays, scalars=scalars, metrics=metrics, details=details,
                           static={"shared_prefix": shared})

    @property
    def temperature(self) -> float:
        t = self.cfg.sampling.temperature
        return t if self.cfg.logprobs_at_temperature and t > 0 else 1.0

    # ------------------------------------------------------------ loss
    def loss(self, model: Transformer, mb: dict, scalars: dict):
        """The GRPO token loss of a micro-batch (SPEC 2.5), divided by the global denominators
        of its aggregation. One optimizer step per rollout: pi_old = stop_grad(pi_theta), rho = 1
        (an `old_logp` array, when given, replaces it)."""
        cfg = self.cfg
        logp = scoring.token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=self.ctx.logprob_chunk,
                                      temperature=self.temperature, shared_prefix=scalars.get("shared_prefix"))
        old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
        losses = objectives.grpo_token_losses(logp, old, mb.get("ref_logp"), mb["advantages"],
                                              clip_eps=cfg.clip_eps, beta=cfg.beta)
        mask = mb["completion_mask"]
        loss = objectives.aggregate_token_losses(losses, mask, cfg.aggregation,
                                                 completion_tokens=scalars["completion_tokens"],
                                                 rows=scalars["rows"], max_length=scalars["max_length"])
        aux = {}
        if cfg.beta:
            diff = mb["ref_logp"] - logp
            aux["kl"] = jax.numpy.sum((jax.numpy.exp(diff) - diff - 1) * mask) / scalars["completion_tokens"]
        return loss, aux


class Grpo(Mrt):
    """Outcome-reward GRPO: MRT-RL with empty prefixes, `group` advantages and alpha = 0."""

    name = "grpo"
    Config = GrpoConfig
    shown = ("reward", "advantage_abs", "completion_length", "sample_tokens_per_s")
    curves = ("reward", "completion_length", "kl")

    def __init__(self, cfg: GrpoConfig, ctx: Context):
        super().__init__(cfg.as_mrt(), ctx)
