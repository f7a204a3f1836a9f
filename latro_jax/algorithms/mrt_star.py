"""MRT-STaR (SPEC 2.7): each update is one round: sample num_samples traces on the round's
questions -> segment -> J at every prefix -> filter -> completion-only fine-tuning on the kept
traces for `epochs` passes over them (the paper: 3), one optimizer step each (the kept set is one
batch).

Filters (the exact rule was not published):
- `max_prefix` (default): cut each trace at its first prefix of maximal J and append a
  correct forced answer sampled there (suffix + answer); a trace with none is dropped;
- `nonneg`: keep correct traces whose every episode makes progress p_j >= 0;
- `outcome`: keep correct traces (vanilla STaR, the baseline).
At most `keep_per_question` traces per question (max_prefix: highest J first; ties and the
other filters: fewer tokens first). A round that keeps nothing takes no optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from latro_jax import objectives, rollout, sampling
from latro_jax.algorithms.core import Context, Policies, ScoredBatch
from latro_jax.algorithms.group_rl import GroupSampling
from latro_jax.algorithms.sft import completion_loss, completion_width
from latro_jax.data import Example
from latro_jax.episodes import SegmentConfig, make_segmenter
from latro_jax.meta_prover import ForcingConfig, MetaProver
from latro_jax.models import ModelConfig, Transformer
from latro_jax.sampling import SamplingParams
from latro_jax.train import RowLayout
from latro_jax.update_plan import Generation, Lengths, UpdatePlan, row_specs

FILTERS = ("max_prefix", "nonneg", "outcome")


@dataclasses.dataclass(frozen=True)
class MrtStarConfig:
    """rollout: num_samples traces of at most max_tokens per question, drawn at `sampling` (the
    GRPO family's block, group_rl.GroupSampling); filter: max_prefix | nonneg | outcome;
    keep_per_question: at most this many kept traces per question; epochs: optimizer steps on
    the kept set per round (each a pass over all of it; the stage's optimizer schedule counts
    steps x epochs); segment and forcing as for MRT-RL."""

    rollout: GroupSampling = GroupSampling(sampling=SamplingParams(temperature=1.0))
    filter: str = "max_prefix"
    keep_per_question: int = 1
    epochs: int = 3
    segment: SegmentConfig = SegmentConfig()
    forcing: ForcingConfig = ForcingConfig()

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ValueError(f"filter={self.filter!r}: choose one of {FILTERS}")
        if min(self.keep_per_question, self.epochs) < 1:
            raise ValueError(f"keep_per_question={self.keep_per_question} and epochs={self.epochs} must be >= 1")


@dataclasses.dataclass
class Kept:
    """A trace chosen for fine-tuning: its question, the completion to train on, its tokens
    and (max_prefix) the J of its prefix."""

    question: int
    completion: list[int]
    j: float = 1.0


@dataclasses.dataclass
class StarRollout:
    prompts: list[list[int]]
    kept: list[Kept]
    outcomes: np.ndarray  # [N, K] 0/1 scores of the sampled traces
    progress: list[np.ndarray]  # per trace: p_j of its episodes (empty without J)
    episodes: np.ndarray  # [N * K] episode counts


class MrtStar:
    name = "mrt_star"
    Config = MrtStarConfig
    needs_reference = False
    old_policy_refresh = None
    trains_on = "questions"
    shown = ("kept_fraction", "outcome", "mean_progress", "loss")
    curves = ("kept_fraction", "outcome", "mean_progress", "loss")

    def __init__(self, cfg: MrtStarConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.prover = MetaProver(cfg.forcing, ctx.task, ctx.fmt)
        self.segmenter = make_segmenter(cfg.segment, ctx.fmt)

    def rows(self, questions: int) -> int:
        return questions * self.cfg.keep_per_question

    def tokens_after_prompt(self, example: Example) -> int:
        """A trace (L) and a forced answer after it."""
        return self.cfg.rollout.max_tokens + self.prover.forced_tokens()

    def plan(self, questions: int, lengths: Lengths, model_config: ModelConfig) -> UpdatePlan:
        """K traces of L per question, forced answers at their prefixes unless the filter is
        `outcome` (one call per trace shown; the real number follows the traces' episodes),
        then `epochs` steps on the kept rows [x | prefix + suffix + answer]."""
        cfg, K, L = self.cfg, self.cfg.rollout.num_samples, self.cfg.rollout.max_tokens
        prompt = sampling.prompt_columns(lengths.prompt, self.ctx.prompt_width)
        gens = [Generation("traces", questions, prompt, K, L, cfg.rollout.sampling)]
        if cfg.filter != "outcome":
            gens.append(self.prover.plan("forced", questions * K, lengths.prompt + L))
        width = completion_width(lengths.prompt, L + self.prover.forced_tokens())
        return UpdatePlan(tuple(gens), (), row_specs(self.rows(questions), width, ("completion_mask",)),
                          ("completion_tokens",), RowLayout(), steps=cfg.epochs)

    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> StarRollout:
        fmt, K = self.ctx.fmt, self.cfg.rollout.num_samples
        k_sample, k_j, k_answer = jax.random.split(key, 3)
        prompts = [fmt.prompt_ids(e.question) for e in examples]
        golds = [e.gold for e in examples]
        out = policies.sampler.complete(policies.model(), prompts, max_new_tokens=self.cfg.rollout.max_tokens,
                                        sampling_params=self.cfg.rollout.sampling, num_samples=K,
                                        stops=fmt.stops.ends_only(), key=k_sample)
        outcomes = rollout.grade(self.ctx.task, out.texts(fmt), golds, out.by_prompt(out.finished))
        episodes = [self.segmenter(t) for t in out.ids]
        j_values, forced = self.j_at_every_prefix(policies, prompts, golds, episodes, k_j)
        progress = [objectives.progress(j) for j in j_values] if j_values else [np.zeros(0)] * len(out.ids)
        kept = self.keep(prompts, golds, out.ids, outcomes.reshape(-1), episodes, j_values, forced, policies,
                         k_answer)
        return StarRollout(prompts, kept, outcomes, progress, np.array([e.count for e in episodes]))

    def j_at_every_prefix(self, policies, prompts, golds, episodes, key):
        """J at prefixes 0..k of every trace (none for the outcome filter): a list of arrays, and
        with mc the forced answers' (outcomes, answer ids) per trace and prefix (else [])."""
        if self.cfg.filter == "outcome":
            return [], []
        K = self.cfg.rollout.num_samples
        items = [(t, j) for t, e in enumerate(episodes) for j in range(e.count + 1)]
        result = self.prover.estimate(policies.sampler, policies.scorer, policies.params,
                                      [prompts[t // K] for t, _ in items],
                                      [episodes[t].prefix(j) for t, j in items], [golds[t // K] for t, _ in items], key,
                                      final=[0 < j == episodes[t].count for t, j in items])
        j_values, forced, start = [], [], 0
        for e in episodes:
            n = e.count + 1
            j_values.append(result.j[start:start + n])
            if result.outcomes is not None:
                forced.append(list(zip(result.outcomes[start:start + n], result.answer_ids[start:start + n])))
            start += n
        return j_values, forced

    def keep(self, prompts, golds, traces, outcomes, episodes, j_values, forced, policies, key) -> list[Kept]:
        """The kept traces, at most keep_per_question per question."""
        cfg, K = self.cfg, self.cfg.rollout.num_samples
        candidates: list[Kept] = []
        if cfg.filter == "outcome":
            candidates = [Kept(t // K, traces[t]) for t in range(len(traces)) if outcomes[t]]
        elif cfg.filter == "nonneg":
            candidates = [Kept(t // K, traces[t]) for t in range(len(traces))
                          if outcomes[t] and np.all(objectives.progress(j_values[t]) >= 0)]
        else:
            best = [int(np.argmax(j)) for j in j_values]
            needs = [t for t in range(len(traces)) if j_values[t][best[t]] > 0]
            answers = self.correct_answers(policies, prompts, golds, episodes, best, needs, forced, key)
            for t in needs:
                if answers.get(t) is not None:
                    prefix, whole = episodes[t].prefix(best[t]), 0 < best[t] == episodes[t].count
                    candidates.append(Kept(t // K, prefix + self.prover.suffix_ids(prefix, whole) + answers[t],
                                           float(j_values[t][best[t]])))
        kept: list[Kept] = []
        for q in range(len(prompts)):
            mine = sorted((c for c in candidates if c.question == q), key=lambda c: (-c.j, len(c.completion)))
            kept += mine[:cfg.keep_per_question]
        return kept

    def correct_answers(self, policies, prompts, golds, episodes, best, needs, forced,
                        key) -> dict[int, list[int] | None]:
        """A correct forced answer's ids at each trace's best prefix: one the mc estimate
        already sampled, else (likelihood) from m new forced answers there."""
        K, out = self.cfg.rollout.num_samples, {}
        if forced:
            for t in needs:
                outcomes, answers = forced[t][best[t]]
                out[t] = next((a for o, a in zip(outcomes, answers) if o), None)
            return out
        if not needs:
            return out
        sampled = self.prover.mc(policies.sampler, policies.model(), [prompts[t // K] for t in needs],
                                 [episodes[t].prefix(best[t]) for t in needs], [golds[t // K] for t in needs], key,
                                 final=[0 < best[t] == episodes[t].count for t in needs])
        for i, t in enumerate(needs):
            out[t] = next((a for o, a in zip(sampled.outcomes[i], sampled.answer_ids[i]) if o), None)
        return out

    def score(self, policies: Policies, ro: StarRollout) -> ScoredBatch:
        """Completion rows of the kept traces, padded with empty rows to a fixed count."""
        rows_total = len(ro.prompts) * self.cfg.keep_per_question
        all_progress = np.concatenate(ro.progress) if ro.progress else np.zeros(0)
        metrics = {"kept_fraction": len(ro.kept) / ro.outcomes.size, "outcome": float(ro.outcomes.mean()),
                   "kept_tokens": float(sum(len(k.completion) for k in ro.kept)),
                   "episodes": float(ro.episodes.mean())}
        if all_progress.size:
            metrics["mean_progress"] = float(all_progress.mean())
            metrics["negative_progress"] = float((all_progress < 0).mean())
        if not ro.kept:
            return ScoredBatch(arrays={}, scalars={}, metrics=metrics, skip=True)
        pad = rows_total - len(ro.kept)
        pad_id = self.ctx.fmt.pad_id
        prompts = [ro.prompts[k.question] for k in ro.kept] + [[pad_id]] * pad
        completions = [k.completion for k in ro.kept] + [[]] * pad
        rows = rollout.completion_rows(prompts, completions, pad_id=pad_id)
        rows.valid[len(ro.kept):] = False
        return ScoredBatch(arrays=dict(tokens=rows.tokens, valid=rows.valid, completion_mask=rows.answer_mask),
                           scalars={"completion_tokens": float(rows.answer_mask.sum())}, metrics=metrics,
                           epochs=self.cfg.epochs)

    def loss(self, model: Transformer, mb: dict, scalars: dict, layout: RowLayout):
        """Completion-only NLL on the kept traces (as SFT)."""
        return completion_loss(model, mb, scalars, self.ctx.logprob_chunk)
