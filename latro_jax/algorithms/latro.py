"""LaTRO (SPEC section 1): sample K rationales per question with the current policy, reward each
by the policy's own log-likelihood of the gold answer after it (minus a KL term to the initial
model), RLOO advantages, one on-policy optimizer step."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latro_jax import objectives, sampling, sharding
from latro_jax.models import Transformer
from latro_jax.train import OptimConfig, Trainer


@dataclasses.dataclass(frozen=True)
class LatroConfig:
    """SPEC 1.2-1.5 defaults (GSM8K): K = 16, beta = 0.05, gamma = 2, c_sft = 1 (the paper's
    derivation; 0 reproduces the released code), L = 500 tokens at T = 1, top-k off, top-p 1."""

    num_samples: int = 16
    beta: float = 0.05
    nonstop_penalty: float = 2.0
    sft_coef: float = 1.0
    max_rationale_tokens: int = 500
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    microbatches: int = 1
    logprob_chunk: int = 128

    def __post_init__(self):
        if self.num_samples < 2:
            raise ValueError(f"latro.num_samples={self.num_samples}: RLOO needs K >= 2")
        if self.beta < 0:
            raise ValueError(f"latro.beta={self.beta} must be >= 0")
        if self.nonstop_penalty < 0:
            raise ValueError(f"latro.nonstop_penalty={self.nonstop_penalty} must be >= 0")
        if self.max_rationale_tokens < 1:
            raise ValueError(f"latro.max_rationale_tokens={self.max_rationale_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Stops:
    """How a rationale ends: stop token ids (EOS, end-of-turn, pad) and stop phrases as token-id
    sequences (e.g. the tokens of "The answer is")."""

    ids: tuple[int, ...]
    phrases: tuple[tuple[int, ...], ...] = ()


_ROW_ARRAYS = ("tokens", "valid", "rationale_mask", "answer_mask")


def _score_fn(graphdef, chunk: int):
    @jax.jit
    def score(params, tokens, valid, rationale_mask, answer_mask):
        logp = objectives.token_logprobs(nnx.merge(graphdef, params), tokens, valid, chunk_size=chunk)
        return (objectives.span_logprob(logp, rationale_mask),
                objectives.span_logprob(logp, answer_mask))
    return score


@dataclasses.dataclass
class ScoredRollout:
    """A rollout's rows scored under the policy and the reference: `batch` (tokens, valid,
    rationale_mask, answer_mask, advantages; [N*K, ...]) is what a step trains on; the rest are
    [N, K]: log pi(z|x), log pi(y|x+z), log pi_0(z|x), rewards."""

    batch: dict[str, np.ndarray]
    z_logp: np.ndarray
    y_logp: np.ndarray
    ref_z_logp: np.ndarray
    rewards: np.ndarray


def make_loss(cfg: LatroConfig):
    """The trainer's loss_fn: the LaTRO surrogate of a micro-batch, weighted by its share of
    the batch's rows (scalars["rows"]), so micro-batch contributions sum to the batch loss."""
    def loss(model: Transformer, mb: dict, scalars: dict):
        logp = objectives.token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=cfg.logprob_chunk)
        z_logp = objectives.span_logprob(logp, mb["rationale_mask"])
        y_logp = objectives.span_logprob(logp, mb["answer_mask"])
        share = z_logp.shape[0] / scalars["rows"]  # micro-batch share of the batch mean
        return objectives.latro_loss(z_logp, y_logp, mb["advantages"], sft_coef=cfg.sft_coef) * share, {}
    return loss


class LatroTrainer:
    """Policy pi_theta (trained) and reference pi_0 (its initial weights, frozen)."""

    def __init__(self, model: Transformer, cfg: LatroConfig, optim: OptimConfig, stops: Stops, *,
                 pad_id: int = 0, mesh: jax.sharding.Mesh | None = None, seed: int = 0):
        self.cfg, self.stops, self.pad_id, self.mesh, self.seed = cfg, stops, pad_id, mesh, seed
        self.trainer = Trainer(model, optim, make_loss(cfg), microbatches=cfg.microbatches, mesh=mesh)
        self.ref_params = jax.tree.map(jnp.copy, self.trainer.state.params)
        self._score = _score_fn(self.trainer.graphdef, cfg.logprob_chunk)

    @property
    def step(self) -> int:
        return int(self.trainer.state.step)

    def rollout(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                bare_answers: Sequence[Sequence[int]] | None = None):
        """Sample K rationales per question, truncate them, and assemble the scored rows; a row
        whose rationale is empty (the model answered at once) gets its question's bare answer.
        Returns (rows, finished [N*K], rationale lengths [N*K], sampled tokens)."""
        cfg, K = self.cfg, self.cfg.num_samples
        out = sampling.generate(
            self.trainer.model(), prompts, cfg.max_rationale_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, num_samples=K, stop_token_ids=self.stops.ids,
            stop_sequences=self.stops.phrases, seed=self.seed * 1_000_003 + self.step,
            pad_id=self.pad_id, mesh=self.mesh)
        cut = [objectives.truncate_rationale(out.token_array[r, :out.lengths[r]], self.stops.ids,
                                             self.stops.phrases) for r in range(len(out.lengths))]
        rationales = [out.token_array[r, :n].tolist() for r, (n, _) in enumerate(cut)]
        finished = np.array([stopped for _, stopped in cut])
        width = sampling.bucket(max(map(len, prompts)), sampling.MIN_PROMPT_BUCKET)
        bare_answers = answers if bare_answers is None else bare_answers
        row_answers = [bare_answers[r // K] if not z else answers[r // K] for r, z in enumerate(rationales)]
        length = sampling.bucket(width + cfg.max_rationale_tokens + max(map(len, row_answers)))
        rows = objectives.assemble_rows([p for p in prompts for _ in range(K)], rationales, row_answers,
                                        prompt_width=width, length=length, pad_id=self.pad_id)
        return rows, finished, np.array([n for n, _ in cut]), int(out.lengths.sum())

    def update(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
               bare_answers: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
        """One LaTRO update on N questions (token ids) and their gold answers y (token ids of
        " The answer is {gold}." as it follows a rationale, plus the end token). `bare_answers`
        are the same y tokenized as a whole completion ("The answer is {gold}." with no space
        before it), scored after an empty rationale; default `answers`. Returns the metrics."""
        cfg, K, N = self.cfg, self.cfg.num_samples, len(prompts)
        shards = sharding.data_shards(self.mesh)
        if N * K % (cfg.microbatches * shards):
            raise ValueError(f"{N} questions x {K} samples = {N * K} rows must divide into "
                             f"{cfg.microbatches} micro-batches x {shards} data shards")
        t0 = time.perf_counter()
        rows, finished, z_lengths, sampled_tokens = self.rollout(prompts, answers, bare_answers)
        t1 = time.perf_counter()
        scored = self.score(rows, finished)
        metrics = self.trainer.step(scored.batch, {"rows": N * K})
        t2 = time.perf_counter()
        return {**metrics,
                "reward": float(scored.rewards.mean()), "answer_logp": float(scored.y_logp.mean()),
                "kl": float((scored.z_logp - scored.ref_z_logp).mean()),
                "finished": float(finished.mean()), "rationale_length": float(z_lengths.mean()),
                "advantage_std": float(scored.batch["advantages"].std()),
                "sample_tokens_per_s": sampled_tokens / (t1 - t0),
                "update_tokens_per_s": float(rows.valid.sum()) / (t2 - t1)}

    def score(self, rows: objectives.Rows, finished: np.ndarray) -> ScoredRollout:
        """Score a rollout's rows (from `rollout`) under the current policy and the reference:
        rewards R = log pi(y|x+z) - beta * (log pi(z|x) - log pi_0(z|x)) (non-stop penalty for
        unfinished z), and their RLOO advantages per question."""
        cfg, K = self.cfg, self.cfg.num_samples
        arrays = dataclasses.asdict(rows)
        z_logp, y_logp = self.score_rows(self.trainer.state.params, arrays)
        ref_z_logp, _ = self.score_rows(self.ref_params, arrays)
        z_logp, y_logp, ref_z_logp = (x.reshape(-1, K) for x in (z_logp, y_logp, ref_z_logp))
        rewards = np.asarray(objectives.latro_rewards(
            y_logp, z_logp, ref_z_logp, finished.reshape(-1, K), beta=cfg.beta,
            nonstop_penalty=cfg.nonstop_penalty))
        advantages = np.asarray(objectives.rloo_advantages(rewards)).reshape(-1)
        return ScoredRollout(batch={**arrays, "advantages": advantages}, z_logp=z_logp,
                             y_logp=y_logp, ref_z_logp=ref_z_logp, rewards=rewards)

    def score_rows(self, params, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(log pi(z|x), log pi(y|x+z)) of every row under `params` (the policy's or
        ref_params), one micro-batch at a time. `arrays` holds at least tokens, valid,
        rationale_mask and answer_mask (other entries, e.g. advantages, are ignored)."""
        placed = self.trainer.shard_rows({k: arrays[k] for k in _ROW_ARRAYS})
        parts = [self._score(params, **{k: v[m] for k, v in placed.items()})
                 for m in range(self.cfg.microbatches)]
        return tuple(np.concatenate([sharding.to_host(p[i]) for p in parts]) for i in range(2))
