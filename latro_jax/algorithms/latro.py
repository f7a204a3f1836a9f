"""LaTRO (SPEC section 1): sample K rationales per question with the current policy, reward each
by the policy's own log-likelihood of the gold answer after it (minus a KL term to the initial
model), RLOO advantages, one on-policy optimizer step."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from latro_jax import objectives, rollout, sampling, scoring
from latro_jax.algorithms.core import Context, Policies, ScoredBatch
from latro_jax.data import Example
from latro_jax.logprobs import span_logprob, token_logprobs
from latro_jax.models import ModelConfig, Transformer
from latro_jax.sampling import SamplingParams
from latro_jax.train import RowLayout
from latro_jax.update_plan import Generation, Lengths, Scoring, UpdatePlan, row_specs


@dataclasses.dataclass(frozen=True)
class RationaleRollout:
    """What LaTRO and the likelihood-reward family (SPEC 3.1) share: K rationales of at most L
    tokens per question sampled at `sampling`, cut at the first stop, rows [x | z | y]."""

    num_samples: int = 16
    max_rationale_tokens: int = 500
    sampling: SamplingParams = SamplingParams(temperature=1.0)
    # log pi(z|x) and log pi(y|x+z) from the sampler (its token log-probs and its KV cache)
    # instead of a policy pass over the rows, where they are the policy's (T = 1, no top-k/top-p)
    reuse_sampler_logprobs: bool = True
    # the reference pass and the training step run each question's prompt once for its K rows
    # (scoring.prefix_sharing) instead of once per row
    share_prompts: bool = True

    def __post_init__(self):
        if self.num_samples < 2:
            raise ValueError(f"num_samples={self.num_samples}: leave-one-out baselines need K >= 2")
        if self.max_rationale_tokens < 1:
            raise ValueError(f"max_rationale_tokens={self.max_rationale_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class LatroConfig(RationaleRollout):
    """SPEC 1.2-1.5 defaults (GSM8K): K = 16, beta = 0.05, gamma = 2, c_sft = 1 (the paper's
    derivation; 0 reproduces the released code), L = 500 tokens sampled at T = 1, top-k off,
    top-p 1."""

    beta: float = 0.05
    nonstop_penalty: float = 2.0
    sft_coef: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")
        if self.nonstop_penalty < 0:
            raise ValueError(f"nonstop_penalty={self.nonstop_penalty} must be >= 0")


class Latro:
    """rollout: K rationales per question, cut at the first stop, rows [x | z | y];
    score: rewards r = R' - beta (log pi(z|x) - log pi_0(z|x)) and their RLOO advantages;
    loss: mean(-sg(A) log pi(z|x) - c_sft log pi(y|x+z))."""

    name = "latro"
    Config = LatroConfig
    needs_reference = True
    old_policy_refresh = None
    trains_on = "questions"
    answer_weights = False  # a per-row answer weight in the batch (the likelihood family's) instead of c_sft
    shown = ("reward", "answer_logp", "kl", "finished", "sample_tokens_per_s")
    curves = ("reward", "answer_logp", "kl", "finished")

    def __init__(self, cfg: LatroConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    def rows(self, questions: int) -> int:
        return questions * self.cfg.num_samples

    def tokens_after_prompt(self, example: Example) -> int:
        """The rationale budget L and the longer spelling of y."""
        fmt = self.ctx.fmt
        return self.cfg.max_rationale_tokens + max(len(fmt.answer_ids(example.answer)),
                                                   len(fmt.completion_ids(example.answer)))

    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> rollout.Rollout:
        """K rationales per question; y is " The answer is {gold}." + end token after a
        rationale, and the whole-completion "The answer is {gold}." after an empty one."""
        fmt = self.ctx.fmt
        return self.sample(policies, [fmt.prompt_ids(e.question) for e in examples],
                           [fmt.answer_ids(e.answer) for e in examples],
                           [fmt.completion_ids(e.answer) for e in examples], key)

    def sample(self, policies: Policies, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
               bare_answers: Sequence[Sequence[int]] | None, key: jax.Array) -> rollout.Rollout:
        """The rollout of token ids: K rationales per prompt from the policy, cut before the first
        stop (the formatter's end ids and answer phrases), rows [x | z | y] with y = `answers`
        (`bare_answers` after an empty rationale)."""
        cfg = self.cfg
        return rollout.sample_rows(
            policies.sampler, policies.model(), prompts, answers, bare_answers, num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_rationale_tokens, sampling_params=cfg.sampling, stops=self.ctx.fmt.stops,
            key=key, policy_logprobs=cfg.reuse_sampler_logprobs, body_width=self.ctx.body_width)

    def plan(self, questions: int, lengths: Lengths, model_config: ModelConfig) -> UpdatePlan:
        """K rationales of L per question (with the answer's cache slots where the sampler's
        log-probs are the policy's), the policy pass where they are not, the reference pass,
        one step on rows [x | z | y] of the prompt columns + L + y rounded up (the stage's fixed
        widths where the context has them)."""
        cfg, ctx, K = self.cfg, self.ctx, self.cfg.num_samples
        prompt = sampling.prompt_columns(lengths.prompt, ctx.prompt_width)
        reuse = cfg.reuse_sampler_logprobs and rollout.sampler_gives_policy_logprobs(
            model_config, cfg.sampling, questions, K, ctx.sample_rows_per_call)
        answer = max(lengths.answer, ctx.body_width - cfg.max_rationale_tokens)
        reserve = sampling.bucket(1 + answer) if reuse else 0
        rows = self.rows(questions)
        width = rollout.row_widths(lengths.prompt, cfg.max_rationale_tokens + answer,
                                   body_multiple=rollout.ROLLOUT_BODY_MULTIPLE, prompt_width=ctx.prompt_width)[1]
        shared = (scoring.sharing_group(model_config, prompt, K, rows, microbatches=ctx.microbatches, mesh=ctx.mesh)
                  if cfg.share_prompts else None)
        passes = [("policy", not reuse, ("rationale_mask", "answer_mask")),
                  ("reference", self.needs_reference, ("rationale_mask",))]
        return UpdatePlan(
            generations=(Generation("rationales", questions, prompt, K, cfg.max_rationale_tokens, cfg.sampling,
                                    reserve),),
            scoring=tuple(Scoring(name, rows, width, masks, shared_prefix=shared) for name, needed, masks in passes
                          if needed),
            batch=row_specs(rows, width, ("rationale_mask", "answer_mask"),
                            ("advantages", "answer_weight") if self.answer_weights else ("advantages",)),
            scalars=("rows",), layout=RowLayout(shared))

    def score(self, policies: Policies, ro: rollout.Rollout) -> ScoredBatch:
        """log pi(z|x), log pi(y|x+z) (and log pi_0(z|x) when the algorithm needs the reference)
        per row, then `estimate`'s rewards, advantages and answer weights. details holds the
        [N, K] values. The policy's terms come from the rollout when the sampler gave them,
        otherwise from a scoring pass. With share_prompts the scoring passes and the step run
        each question's prompt once."""
        cfg, K = self.cfg, self.cfg.num_samples
        arrays = ro.rows.arrays()
        shared = policies.scorer.prefix_sharing(ro.rows, K) if cfg.share_prompts else None
        if ro.z_logp is not None:
            z_logp, y_logp = ro.z_logp, ro.y_logp
        else:
            z_logp, y_logp = policies.scorer.span_logprobs(policies.params, arrays,
                                                            ("rationale_mask", "answer_mask"),
                                                            shared_prefix=shared)
        z_logp, y_logp = z_logp.reshape(-1, K), y_logp.reshape(-1, K)
        details = {"z_logp": z_logp, "y_logp": y_logp}
        if self.needs_reference:
            ref_z_logp, = policies.scorer.span_logprobs(policies.reference, arrays, ("rationale_mask",),
                                                        shared_prefix=shared)
            details["ref_z_logp"] = ref_z_logp.reshape(-1, K)
        rewards, advantages, answer_weight = self.estimate(details, ro.finished.reshape(-1, K))
        metrics = {"reward": float(rewards.mean()), "answer_logp": float(y_logp.mean()),
                   "finished": float(ro.finished.mean()), "rationale_length": float(ro.lengths.mean()),
                   "advantage_std": float(advantages.std())}
        if self.needs_reference:
            metrics["kl"] = float((z_logp - details["ref_z_logp"]).mean())
        arrays = {**arrays, "advantages": np.asarray(advantages, np.float32).reshape(-1)}
        if answer_weight is not None:
            arrays["answer_weight"] = np.asarray(answer_weight, np.float32).reshape(-1)
        return ScoredBatch(arrays=arrays, scalars={"rows": len(arrays["advantages"])},
                           layout=RowLayout(shared), metrics=metrics, details={**details, "rewards": rewards})

    def estimate(self, logps: dict[str, np.ndarray], finished: np.ndarray):
        """(rewards, advantages, per-row answer weights or None for the scalar c_sft), all
        [N, K]: LaTRO's r = R' - beta (log pi(z|x) - log pi_0(z|x)) (the non-stop penalty for
        unfinished z) and its RLOO advantages."""
        rewards = np.asarray(objectives.latro_rewards(
            logps["y_logp"], logps["z_logp"], logps["ref_z_logp"], finished, beta=self.cfg.beta,
            nonstop_penalty=self.cfg.nonstop_penalty))
        return rewards, np.asarray(objectives.advantages("rloo", objectives.GroupOutcomes(rewards))), None

    def loss(self, model: Transformer, mb: dict, scalars: dict, layout: RowLayout):
        """The LaTRO surrogate of a micro-batch, weighted by its share of the batch's rows
        (scalars["rows"]), so micro-batch contributions sum to the batch loss."""
        logp = token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=self.ctx.logprob_chunk,
                              shared_prefix=layout.shared_prefix)
        z_logp = span_logprob(logp, mb["rationale_mask"])
        y_logp = span_logprob(logp, mb["answer_mask"])
        share = z_logp.shape[0] / scalars["rows"]  # micro-batch share of the batch mean
        weight = mb["answer_weight"] if "answer_weight" in mb else self.cfg.sft_coef
        return objectives.latro_loss(z_logp, y_logp, mb["advantages"], sft_coef=weight) * share, {}
