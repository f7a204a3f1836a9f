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
from latro_jax.algorithms.group_rl import GroupSampling, PolicyLoss, completion_rows, policy_loss, scored_completions
from latro_jax.algorithms.sft import completion_width
from latro_jax.data import Example
from latro_jax.episodes import SegmentConfig, make_segmenter
from latro_jax.meta_prover import ForcingConfig, MetaProver
from latro_jax.models import ModelConfig, Transformer
from latro_jax.stops import Stops, truncate
from latro_jax.train import RowLayout
from latro_jax.update_plan import Generation, Lengths, Scoring, UpdatePlan, row_specs

PREFIXES = ("traces", "empty")
BUDGETS = ("full", "remaining")
CONTINUATIONS = ("full", "episode")


@dataclasses.dataclass(frozen=True)
class Reading:
    """What an advantage reading needs besides the rewards: `signals`, the values the rollout
    computes for it (j_prefix: J(c) per question; forced: the m forced outcomes at c, mc only;
    j_after: J after each continuation's thinking), and whether it reads alpha, the progress
    bonus weight (which then adds j_prefix and j_after)."""

    signals: tuple[str, ...]
    reads_alpha: bool


# SPEC 2.6's readings of MRT-RL, each an estimator of objectives.ADVANTAGE_ESTIMATORS by its name
READINGS = {"termination": Reading(("j_prefix",), reads_alpha=False),
            "rloo": Reading((), reads_alpha=False),
            "mixed": Reading(("j_prefix", "forced"), reads_alpha=False),
            "group": Reading((), reads_alpha=True)}
OUTCOME_READINGS = tuple(name for name, r in READINGS.items() if not r.signals)  # read no J: GRPO's choices


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """Outcome-reward GRPO (SPEC 2.5; TRL as the paper's runs used it): `rollout` G completions
    per question (group_rl.GroupSampling), `loss` the policy loss (group_rl.PolicyLoss);
    advantage: group (GRPO) | rloo (r_k - the mean of the other G - 1, no scaling); scaling of
    the group advantages: group | batch (std over the batch) | none (Dr. GRPO), with
    advantage_eps added to the std (TRL 1e-4, verl 1e-6); reward_kl beta_r: the rewards the
    advantages read are r - beta_r sum_t (log pi_old - log pi_ref) (RLOO; 0 = off, no passes);
    length_penalty lambda: they read r - lambda |z| / L (|z| the completion's tokens, L its budget
    rollout.max_tokens; 0 = off); share_prompts: the scoring passes and the step run each question's prompt once for its G
    rows (scoring.prefix_sharing)."""

    rollout: GroupSampling = GroupSampling()
    loss: PolicyLoss = PolicyLoss()
    advantage: str = "group"
    scaling: str = "group"
    advantage_eps: float = objectives.GROUP_EPS
    reward_kl: float = 0.0
    length_penalty: float = 0.0
    share_prompts: bool = True

    def __post_init__(self):
        if self.advantage not in OUTCOME_READINGS:
            raise ValueError(f"advantage={self.advantage!r}: choose one of {OUTCOME_READINGS} (the readings "
                             "of J need MRT's prefixes: algorithm 'mrt')")
        self.as_mrt()  # the checks

    def as_mrt(self) -> "MrtConfig":
        return MrtConfig(rollout=self.rollout, loss=self.loss, advantage=self.advantage, scaling=self.scaling,
                         advantage_eps=self.advantage_eps, reward_kl=self.reward_kl,
                         length_penalty=self.length_penalty, share_prompts=self.share_prompts, prefixes="empty")


@dataclasses.dataclass(frozen=True)
class MrtConfig:
    """MRT-RL (SPEC 2.6): GRPO's keys (GrpoConfig, length_penalty included) and prefixes: traces | empty; prefix_refresh:
    0 = pi_old is the stage's starting model, N = the policy copied every N updates;
    max_prefix_tokens: the longest prefix the prompt holds (0 = rollout.max_tokens; the paper's
    prompt length, 4,096 for R1); budget: full | remaining; advantage: a reading of READINGS,
    termination (default) | mixed | group | rloo; alpha: the progress bonus weight, read by `group`
    (R_i = r_i + alpha (J_after,i - J(c)), J_after the meta-prover's estimate after z_i's
    thinking) and `episode` (refused where the reading does not read it); continuation: full |
    episode; segment: how traces split into episodes; forcing: the meta-prover (suffix,
    mc | likelihood, m)."""

    rollout: GroupSampling = GroupSampling()
    loss: PolicyLoss = PolicyLoss()
    scaling: str = "group"
    advantage_eps: float = objectives.GROUP_EPS
    reward_kl: float = 0.0
    length_penalty: float = 0.0
    share_prompts: bool = True
    prefixes: str = "traces"
    prefix_refresh: int = 0
    max_prefix_tokens: int = 0
    budget: str = "full"
    advantage: str = "termination"
    alpha: float = 0.0
    continuation: str = "full"
    segment: SegmentConfig = SegmentConfig()
    forcing: ForcingConfig = ForcingConfig()

    def __post_init__(self):
        for name, value, options in (("prefixes", self.prefixes, PREFIXES), ("budget", self.budget, BUDGETS),
                                     ("advantage", self.advantage, tuple(READINGS)),
                                     ("continuation", self.continuation, CONTINUATIONS),
                                     ("scaling", self.scaling, objectives.ADVANTAGE_SCALINGS)):
            if value not in options:
                raise ValueError(f"{name}={value!r}: choose one of {options}")
        if self.advantage_eps <= 0 or self.reward_kl < 0 or self.length_penalty < 0:
            raise ValueError(f"advantage_eps={self.advantage_eps} must be > 0 and reward_kl={self.reward_kl}, "
                             f"length_penalty={self.length_penalty} >= 0")
        if self.prefix_refresh < 0 or self.max_prefix_tokens < 0 or self.alpha < 0:
            raise ValueError(f"prefix_refresh={self.prefix_refresh}, max_prefix_tokens={self.max_prefix_tokens} "
                             f"and alpha={self.alpha} must be >= 0")
        if self.advantage in ("group", "mixed", "rloo") and self.rollout.num_samples < 2:
            raise ValueError(f"rollout.num_samples={self.rollout.num_samples}: {self.advantage} advantages "
                             "need G >= 2")
        if "forced" in self.signals and self.forcing.estimator != "mc":
            raise ValueError(f"advantage={self.advantage!r} normalises the forced-answer outcomes with the "
                             "rewards: it needs forcing.estimator='mc'")
        if self.alpha > 0 and not READINGS[self.advantage].reads_alpha:
            raise ValueError(f"alpha={self.alpha} has no effect with advantage={self.advantage!r} (its "
                             "advantages do not read the progress bonus); set alpha=0, or advantage='group' "
                             "for R_i = r_i + alpha (J_after,i - J(c)).")
        if self.continuation == "episode" and "j_after" not in self.signals:
            raise ValueError("continuation='episode' rewards an episode by alpha (J(c + z) - J(c)): it needs "
                             "advantage='group' and alpha > 0")
        if self.prefixes == "empty" and self.prefix_refresh:
            raise ValueError("prefix_refresh needs prefixes='traces' (empty prefixes never sample from pi_old)")

    @property
    def signals(self) -> frozenset[str]:
        """What the rollout computes for this reading (READINGS), the bonus's J values included."""
        reading = READINGS[self.advantage]
        bonus = ("j_prefix", "j_after") if reading.reads_alpha and self.alpha > 0 else ()
        return frozenset(reading.signals + bonus)

    @property
    def prefix_limit(self) -> int:
        """The most tokens a prefix holds (0 with empty prefixes)."""
        if self.prefixes == "empty":
            return 0
        L = self.rollout.max_tokens
        return min(L, self.max_prefix_tokens) if self.max_prefix_tokens else L


@dataclasses.dataclass
class MrtRollout:
    """One update's samples: per row (N*G, question-major) the prompt x + c and the continuation
    z (stop included); per question the prefix c, its episode count j, and the signals of the
    reading (objectives.GroupOutcomes: rewards r [N, G], J(c), the m forced outcomes at c with mc,
    J_after [N, G]); metrics: what the rollout or the score's hooks measured, logged with the
    update's."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    finished: np.ndarray
    prefixes: list[list[int]]
    prefix_episodes: np.ndarray
    outcomes: objectives.GroupOutcomes
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def gather_groups(rollouts: Sequence[MrtRollout], picks: Sequence[tuple[int, int]], group: int) -> MrtRollout:
    """One rollout of the groups `picks` names, (rollout, question) pairs in order: their rows,
    prefixes and outcomes (DAPO's refill, from several rounds of sampling)."""
    rows = [(i, q * group + g) for i, q in picks for g in range(group)]
    first = rollouts[0].outcomes
    outcomes = {f.name: np.stack([getattr(rollouts[i].outcomes, f.name)[q] for i, q in picks])
                for f in dataclasses.fields(first) if getattr(first, f.name) is not None}
    return MrtRollout([rollouts[i].prompts[r] for i, r in rows], [rollouts[i].continuations[r] for i, r in rows],
                      np.array([rollouts[i].finished[r] for i, r in rows]),
                      [rollouts[i].prefixes[q] for i, q in picks],
                      np.array([rollouts[i].prefix_episodes[q] for i, q in picks]),
                      objectives.GroupOutcomes(**outcomes), dict(rollouts[0].metrics))


class Mrt:
    name = "mrt"
    Config = MrtConfig
    trains_on = "questions"
    shown = ("reward", "j_prefix", "advantage_abs", "completion_length", "sample_tokens_per_s")
    curves = ("reward", "j_prefix", "completion_length", "kl")

    def __init__(self, cfg: MrtConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.needs_reference = cfg.loss.beta > 0 or cfg.reward_kl > 0
        self.old_policy_refresh = cfg.prefix_refresh if cfg.prefixes == "traces" else None
        self.prover = MetaProver(cfg.forcing, ctx.task, ctx.fmt) if cfg.signals else None
        self.segmenter = make_segmenter(cfg.segment, ctx.fmt)
        self.temperature = cfg.loss.temperature(cfg.rollout.sampling)
        if cfg.continuation == "episode" and cfg.scaling != "none":
            warnings.warn(f"{self.name}: continuation='episode' rewards are alpha (J(c + z) - J(c)) and "
                          f"scaling={cfg.scaling!r} divides them by their std, so alpha={cfg.alpha} cancels: "
                          "any alpha > 0 trains alike. Set scaling='none' for alpha to scale the step.",
                          stacklevel=2)

    def rows(self, questions: int) -> int:
        return questions * self.cfg.rollout.num_samples

    def tokens_after_prompt(self, example: Example) -> int:
        """A prefix (at most L) and a continuation (L), or a prefix (plus, where J_after is
        computed, the continuation's thinking) with the forcing suffix and answer."""
        cfg, L = self.cfg, self.cfg.rollout.max_tokens
        forced = self.prover.forced_tokens() if self.prover else 0
        return max(cfg.prefix_limit + L, cfg.prefix_limit + L * ("j_after" in cfg.signals) + forced)

    def plan(self, questions: int, lengths: Lengths, model_config: ModelConfig) -> UpdatePlan:
        """pi_old's traces (with prefixes), G continuations of L after each prompt + prefix, the
        meta-prover's forced answers where the reading reads J, the reference / pi_old passes,
        then updates_per_rollout steps on the rows [x + c | z]."""
        cfg, ctx, G, L = self.cfg, self.ctx, self.cfg.rollout.num_samples, self.cfg.rollout.max_tokens
        columns = lambda n: sampling.prompt_columns(n, ctx.prompt_width)  # the sampler's
        prompt = sampling.bucket(lengths.prompt + cfg.prefix_limit, sampling.MIN_PROMPT_BUCKET)  # the rows'
        gens = [Generation("prefixes", questions, columns(lengths.prompt), 1, L, cfg.rollout.sampling)
                ] if cfg.prefixes == "traces" else []
        gens.append(Generation("completions", questions, columns(lengths.prompt + cfg.prefix_limit), G, L,
                               cfg.rollout.sampling))
        if {"j_prefix", "forced"} & cfg.signals:
            gens.append(self.prover.plan("forced", questions, lengths.prompt + cfg.prefix_limit))
        if "j_after" in cfg.signals:
            gens.append(self.prover.plan("forced_after", questions * G, lengths.prompt + cfg.prefix_limit + L))
        rows, mu = self.rows(questions), cfg.loss.updates_per_rollout
        width = completion_width(prompt, L)
        shared = (scoring.sharing_group(model_config, prompt, G, rows, microbatches=ctx.microbatches, mesh=ctx.mesh)
                  if cfg.share_prompts else None)
        passes = {"ref_logp": cfg.loss.beta > 0 or cfg.reward_kl > 0, "old_logp": mu > 1 or cfg.reward_kl > 0}
        in_batch = {"ref_logp": cfg.loss.beta > 0, "old_logp": mu > 1}
        return UpdatePlan(
            generations=tuple(gens),
            scoring=tuple(Scoring(name, rows, width, temperature=self.temperature, shared_prefix=shared)
                          for name, needed in passes.items() if needed),
            batch=row_specs(rows // mu, width, ("completion_mask", *(k for k, v in in_batch.items() if v)),
                            ("advantages",)),
            scalars=("completion_tokens", "rows", "max_length"), layout=RowLayout(shared), steps=mu)

    # ------------------------------------------------------------ rollout
    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> MrtRollout:
        cfg, fmt, G, L = self.cfg, self.ctx.fmt, self.cfg.rollout.num_samples, self.cfg.rollout.max_tokens
        k_prefix, k_cut, k_cont, k_j, k_after = jax.random.split(key, 5)
        prompts = [fmt.prompt_ids(e.question) for e in examples]
        golds = [e.gold for e in examples]
        prefixes, counts = self.prefixes(policies, prompts, k_prefix, k_cut)
        episode_ends = self.segmenter.episode_ends() if cfg.continuation == "episode" else ()
        out = policies.sampler.complete(
            policies.model(), [x + c for x, c in zip(prompts, prefixes)], max_new_tokens=L,
            budgets=[L if cfg.budget == "full" else max(L - len(c), 1) for c in prefixes],
            sampling_params=cfg.rollout.sampling, num_samples=G, stops=Stops(fmt.stops.ids, episode_ends), key=k_cont)
        if cfg.continuation == "episode":
            rewards = np.zeros((len(examples), G))
        else:
            rewards = rollout.grade(self.ctx.task, out.texts(fmt), golds, out.by_prompt(out.finished))
        signals = {}
        if {"j_prefix", "forced"} & cfg.signals:
            result = self.prover.estimate(policies.sampler, policies.scorer, policies.params, prompts, prefixes,
                                          golds, k_j)
            signals.update(j_prefix=result.j, forced=result.outcomes)  # forced: None with likelihood
        if "j_after" in cfg.signals:  # J after each continuation's thinking (the whole thinking where it ended)
            cuts = [truncate(z, self.segmenter.thinking_end) for z in out.ids]
            after = self.prover.estimate(policies.sampler, policies.scorer, policies.params,
                                         [prompts[r // G] for r in range(len(cuts))],
                                         [prefixes[r // G] + z[:n] for r, (z, (n, _)) in enumerate(zip(out.ids, cuts))],
                                         [golds[r // G] for r in range(len(cuts))], k_after,
                                         final=[ended and cfg.continuation == "full" for _, ended in cuts])
            signals["j_after"] = out.by_prompt(after.j)
        return MrtRollout([x + c for x, c in zip(prompts, prefixes) for _ in range(G)], out.ids, out.finished,
                          prefixes, np.array(counts), objectives.GroupOutcomes(rewards, **signals))

    def prefixes(self, policies: Policies, prompts: list[list[int]], key: jax.Array, cut_key: jax.Array):
        """(prefix ids, episodes in each prefix) per question: a trace from pi_old cut after j
        episodes, j uniform in {0, ..., k-1} among the cuts that fit max_prefix_tokens
        (deterministic in the key and the question's position), or the empty prefix."""
        if self.cfg.prefixes == "empty":
            return [[] for _ in prompts], [0] * len(prompts)
        traces = policies.sampler.complete(policies.model(policies.old), prompts,
                                           max_new_tokens=self.cfg.rollout.max_tokens,
                                           sampling_params=self.cfg.rollout.sampling,
                                           stops=self.ctx.fmt.stops.ends_only(), key=key)
        prefixes, counts = [], []
        for n, trace in enumerate(traces.ids):
            episodes = self.segmenter(trace)
            fits = sum(1 for j in range(episodes.count) if len(episodes.prefix(j)) <= self.cfg.prefix_limit)
            j = int(jax.random.randint(jax.random.fold_in(cut_key, n), (), 0, max(fits, 1)))
            prefixes.append(episodes.prefix(j))
            counts.append(j)
        return prefixes, counts

    # ------------------------------------------------------------ score
    def score(self, policies: Policies, ro: MrtRollout) -> ScoredBatch:
        cfg, o = self.cfg, self.outcomes(policies, ro)
        kept = self.kept_groups(ro, o)
        if not kept.any():  # nothing to learn from (DAPO: every group answered alike)
            return ScoredBatch({}, {}, {**ro.metrics, "reward": float(o.rewards.mean()), "kept_groups": 0.0},
                               skip=True)
        rows = completion_rows(policies, ro.prompts, ro.continuations, group=cfg.rollout.num_samples, loss=cfg.loss,
                               temperature=self.temperature, share_prompts=cfg.share_prompts,
                               pad_id=self.ctx.fmt.pad_id, kept_groups=kept, reward_kl=cfg.reward_kl > 0)
        metrics = {}
        if cfg.reward_kl:
            kl = rows.sequence_kl().reshape(o.rewards.shape)
            o = dataclasses.replace(o, rewards=objectives.kl_penalised_rewards(o.rewards, kl, cfg.reward_kl))
            metrics["sequence_kl"] = float(kl.mean())
        if cfg.length_penalty:
            lengths = np.array([len(z) for z in ro.continuations]).reshape(o.rewards.shape)
            o = dataclasses.replace(o, rewards=objectives.length_penalised_rewards(
                o.rewards, lengths, cfg.length_penalty, cfg.rollout.max_tokens))
        advantages = objectives.advantages(cfg.advantage, o, scaling=cfg.scaling, alpha=cfg.alpha,
                                           eps=cfg.advantage_eps) * kept[:, None]
        metrics.update({"reward": float(o.rewards.mean()), "finished": float(ro.finished.mean()),
                        "completion_length": float(np.mean([len(z) for z in ro.continuations])),
                        "advantage_abs": float(np.abs(advantages.astype(np.float32)).mean()),
                        "prefix_episodes": float(ro.prefix_episodes.mean()),
                        "prefix_length": float(np.mean([len(c) for c in ro.prefixes])),
                        "kept_groups": float(kept.mean())})
        if o.j_prefix is not None:
            metrics["j_prefix"] = float(o.j_prefix.mean())
        if o.j_after is not None:
            metrics["bonus"] = float((o.j_after - o.j_prefix[:, None]).mean())
        metrics.update(ro.metrics)
        return scored_completions(rows, advantages, loss=cfg.loss, max_tokens=cfg.rollout.max_tokens, metrics=metrics,
                                  details={"rewards": o.rewards, "advantages": advantages.astype(np.float32)})

    def outcomes(self, policies: Policies, ro: MrtRollout) -> objectives.GroupOutcomes:
        """What the advantages read (a variant shapes or replaces the rewards here)."""
        return ro.outcomes

    def kept_groups(self, ro: MrtRollout, outcomes: objectives.GroupOutcomes) -> np.ndarray:
        """[N] which questions' groups the loss learns from (a variant drops some here), given
        the outcomes the advantages read."""
        return np.ones(len(ro.prefixes), bool)

    def loss(self, model: Transformer, mb: dict, scalars: dict, layout: RowLayout):
        return policy_loss(model, mb, scalars, layout, self.cfg.loss, temperature=self.temperature,
                           chunk_size=self.ctx.logprob_chunk)


class Grpo(Mrt):
    """Outcome-reward GRPO: MRT-RL with empty prefixes, `group` advantages and alpha = 0."""

    name = "grpo"
    Config = GrpoConfig
    shown = ("reward", "advantage_abs", "completion_length", "sample_tokens_per_s")
    curves = ("reward", "completion_length", "kl")

    def __init__(self, cfg: GrpoConfig, ctx: Context):
        super().__init__(cfg.as_mrt(), ctx)
