"""The algorithm contract: every trainer is rollout -> scored batch -> update.

An algorithm is a small class (see latro.py, sft.py) with
    name, Config            its registry name and its config dataclass (a stage section's own keys)
    needs_reference         whether `Policies.reference` (the stage's initial weights) is kept
    trains_on               "rationales" (examples with gold rationales) or "questions"
    shown, curves           metrics for the progress bar and for training.png
    rows(questions)         rows of a step with this many questions (must split over the mesh)
    tokens_after_prompt(e)  the most positions its rows or generations take after e's prompt
    rollout(policies, examples, key)  -> anything `score` understands (sampled or gold rows)
    score(policies, rollout)          -> ScoredBatch
    loss(model, microbatch, scalars, layout) -> (loss contribution, aux); pure, jitted by the Trainer
and takes (config, Context) in its constructor. An algorithm that carries host state from one
update to the next (RLPR's std-filter EMA) also has state() -> {name: float32 NumPy array} and
load_state(that dict), which checkpoints hold so that a resume is exact. One that samples more
questions than a batch (DAPO's refill) sets draws_more and takes rollout(..., more=), a
callable drawing the next batch from the stage's data iterator (whose position checkpoints
hold). plan(questions, lengths, model_config) describes one update as shapes (UpdatePlan: its
sampler calls, scoring passes and optimizer steps' rows) for latro_jax.compile_check; an
algorithm without it trains as any other but cannot be compile-checked. It samples with
policies.sampler (rollout.Sampler.complete) and scores with policies.scorer, which record what
they spend in the update's Usage; `Learner.update` runs the three parts for every algorithm and
reports sample_s, score_s and step_s with one meaning for all. run.py finds algorithms by name
in algorithms.ALGORITHMS.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latro_jax import sharding
from latro_jax.data import Example, PromptFormatter, Task
from latro_jax.models import Transformer
from latro_jax.rollout import Sampler
from latro_jax.scoring import Scorer
from latro_jax.train import OptimConfig, RowLayout, Trainer, TrainState
from latro_jax.usage import Usage


@dataclasses.dataclass(frozen=True)
class Context:
    """What an algorithm works with besides parameters: the task (its grading, answer extraction,
    gold answers), the prompt formatter (prompt and answer ids, the pad id, the stops each
    algorithm takes its own from), the mesh, and the stage's batching (micro-batches per step,
    positions per log-prob chunk, rows per sampler call) and widths: the least prompt columns
    of its sampler calls and rows, and the least columns after the prompt of rows [x | z | y]
    (the stage's longest prompt and the most its algorithm appends to one, so that every
    update has the same shapes; 0: each batch's own longest). Algorithms used on token ids alone
    (tests, benchmarks) may leave the task None and give as fmt any object with `stops` and
    `pad_id`."""

    task: Task | None
    fmt: PromptFormatter
    mesh: jax.sharding.Mesh | None = None
    microbatches: int = 1
    logprob_chunk: int = 128
    sample_rows_per_call: int = 0
    prompt_width: int = 0
    body_width: int = 0

    @classmethod
    def of_stage(cls, task: Task | None, fmt: PromptFormatter, mesh: jax.sharding.Mesh | None, stage) -> Context:
        """The context of a stage section (job_config.StageSection)."""
        return cls(task, fmt, mesh, stage.microbatches, stage.logprob_chunk, stage.sample_rows_per_call)


@dataclasses.dataclass
class Policies:
    """The parameters an algorithm samples and scores with, all of one model graph: the policy
    being trained, the frozen reference (the stage's initial weights) when the algorithm needs
    it, and pi_old when it samples from an earlier policy; and the update's sampler (completions
    from a model) and scorer (log-probabilities of rows under any of them)."""

    params: Any
    reference: Any
    sampler: Sampler
    scorer: Scorer
    old: Any = None  # pi_old, for algorithms that sample from an earlier policy (MRT's prefixes)

    def model(self, params: Any = None) -> Transformer:
        return self.scorer.model(self.params if params is None else params)


@dataclasses.dataclass
class ScoredBatch:
    """What one optimizer step learns from.

    arrays:  [rows, ...] host arrays the loss reads, split into micro-batches by the Trainer
    scalars: global values the loss divides by (so micro-batch contributions sum to the loss);
             a list of them splits the rows into as many equal consecutive mini-batches, one
             optimizer step each in order (the GRPO family's updates_per_rollout)
    layout:  what shapes the loss's program (the rows' shared prompt columns), given to the loss
    metrics: host metrics of this rollout (logged with the step's own)
    details: per-row or per-question values for analysis, never sent to the step
    skip:    nothing to learn from: no optimizer step is taken
    epochs:  optimizer steps on this batch, each a pass over all of it (MRT-STaR's rounds); an
             algorithm whose Config has `epochs` gets a schedule of steps x epochs
    """

    arrays: dict[str, np.ndarray]
    scalars: dict[str, float] | list[dict[str, float]]
    metrics: dict[str, float]
    details: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    skip: bool = False
    layout: RowLayout = RowLayout()
    epochs: int = 1

    def minibatches(self) -> list[tuple[dict[str, np.ndarray], dict[str, float]]]:
        """(arrays, scalars) of each optimizer step of one pass, in order."""
        if isinstance(self.scalars, dict):
            return [(self.arrays, self.scalars)]
        parts = len(self.scalars)
        split = {k: np.split(v, parts) for k, v in self.arrays.items()}
        return [({k: v[i] for k, v in split.items()}, scalars) for i, scalars in enumerate(self.scalars)]


class Algorithm(Protocol):
    name: str
    Config: type
    needs_reference: bool
    trains_on: str
    shown: tuple[str, ...]
    curves: tuple[str, ...]
    ctx: Context
    # pi_old: None = not used; 0 = the stage's starting weights; N = the policy's weights,
    # copied every N optimizer steps (then saved in checkpoints, so a resume is exact)
    old_policy_refresh: int | None

    def rows(self, questions: int) -> int: ...

    def tokens_after_prompt(self, example: Example) -> int: ...

    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> Any: ...

    def score(self, policies: Policies, rollout: Any) -> ScoredBatch: ...

    def loss(self, model: Transformer, microbatch: dict, scalars: dict, layout: RowLayout
             ) -> tuple[jax.Array, dict]: ...


def frozen_dtype(dtype, compute_dtype) -> np.dtype:
    """The dtype a frozen parameter copy (the reference, pi_old) keeps a parameter of `dtype`
    in: the model's compute dtype where that is a narrower float. The model casts every weight
    to its compute dtype before using it, so the copy computes exactly what a full-precision
    copy would, in half the bytes for bfloat16 compute."""
    dtype, compute = np.dtype(dtype), np.dtype(compute_dtype)
    floats = jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(compute, jnp.floating)
    return compute if floats and compute.itemsize < dtype.itemsize else dtype


def frozen_copy(params, compute_dtype):
    """A copy of `params` (sharded as they are) in frozen_dtype, sharing no buffer with them."""
    def copy(x):
        dtype = frozen_dtype(x.dtype, compute_dtype)
        return x.astype(dtype) if dtype != x.dtype else jnp.copy(x)
    return jax.tree.map(copy, params)


class Learner:
    """One algorithm's training state: the policy's train state (a jitted, sharded Trainer
    step), the frozen reference when the algorithm needs one (frozen_copy: in the compute
    dtype), pi_old likewise, and the scorer. The copies are of what trains: with LoRA adapters
    the reference and pi_old are adapter copies over the one frozen base (the reference at
    the first stage: B = 0, the base itself)."""

    def __init__(self, algorithm: Algorithm, model: Transformer, optim: OptimConfig):
        ctx = algorithm.ctx
        self.algorithm = algorithm
        self.trainer = Trainer(model, optim, algorithm.loss, microbatches=ctx.microbatches, mesh=ctx.mesh)
        self.scorer = Scorer(self.trainer.graphdef, model.config, microbatches=ctx.microbatches, mesh=ctx.mesh,
                             chunk_size=ctx.logprob_chunk)
        self.compute_dtype = model.dtype
        copy = lambda: frozen_copy(self.trainer.state.params, self.compute_dtype)
        # trainable parts only; policies() joins them to the frozen base
        self.reference = copy() if algorithm.needs_reference else None
        self.refresh = algorithm.old_policy_refresh
        # pi_old starts as the stage's starting weights: the reference's arrays when there is one
        self.old = None if self.refresh is None else self.reference if self.reference is not None else copy()

    @property
    def step(self) -> int:
        return int(self.trainer.state.step)

    @property
    def state(self) -> TrainState:
        return self.trainer.state

    def load_state(self, state: TrainState, extras: dict[str, Any] | None = None) -> None:
        """Continue from a restored train state (placed on this learner's shardings) and the
        extras `extras()` saved with it."""
        self.trainer.load_state(state.params, state.opt_state, int(state.step))
        if extras and "old_params" in extras:
            self.old = jax.device_put(extras["old_params"], jax.tree.map(lambda x: x.sharding, self.old))
        if extras and "algorithm_state" in extras:
            self.algorithm.load_state({k: sharding.to_host(v) for k, v in extras["algorithm_state"].items()})

    def extras(self) -> dict[str, Any]:
        """State besides the train state that a checkpoint must hold for an exact resume: pi_old
        when it is refreshed from the policy (at refresh 0 it is the stage's starting weights),
        and the algorithm's host state when it has one (replicated over the mesh)."""
        extras = {"old_params": self.old} if self.refresh else {}
        if hasattr(self.algorithm, "state"):
            mesh = self.algorithm.ctx.mesh
            place = (jnp.asarray if mesh is None else
                     lambda x: sharding.put_global(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
            extras["algorithm_state"] = {k: place(np.asarray(v, np.float32)) for k, v in self.algorithm.state().items()}
        return extras

    def model(self) -> Transformer:
        return self.trainer.model()

    def policies(self, usage: Usage | None = None) -> Policies:
        """The current parameters, with a sampler and a scorer that record into `usage`."""
        usage = usage or Usage()
        ctx = self.algorithm.ctx
        sampler = Sampler(pad_id=ctx.fmt.pad_id, mesh=ctx.mesh, usage=usage, rows_per_call=ctx.sample_rows_per_call,
                          prompt_width=ctx.prompt_width)
        whole = lambda params: None if params is None else self.trainer.with_frozen(params)
        return Policies(whole(self.trainer.state.params), whole(self.reference), sampler,
                        self.scorer.with_usage(usage), whole(self.old))

    def apply(self, scored: ScoredBatch) -> dict[str, float]:
        """The optimizer steps of a scored batch (none when it says skip): scored.epochs passes,
        each one step per mini-batch; the metrics of the last, with the first's loss as
        first_loss when there are several."""
        if scored.skip:
            return {"skipped": 1.0}
        steps = [self.trainer.step(arrays, scalars, scored.layout)
                 for _ in range(scored.epochs) for arrays, scalars in scored.minibatches()]
        return {**steps[-1], "first_loss": steps[0]["loss"]} if len(steps) > 1 else steps[0]

    def update(self, examples: Sequence[Example], key: jax.Array,
               more: Callable[[], Sequence[Example]] | None = None) -> dict[str, float]:
        """rollout -> score -> step on `examples`; returns the step's and the scored batch's
        metrics and what the update spent: sample_s / sampled_tokens (all generation), score_s /
        scored_tokens (all scoring passes outside the step), step_s, sample_tokens_per_s, and
        update_s, the whole update (host-side grading and row assembly included). `more` draws
        the next batch of questions (the stage's data iterator); it is handed to the rollout of
        an algorithm that `draws_more` (DAPO's refill)."""
        started = time.perf_counter()
        if self.refresh and self.step and self.step % self.refresh == 0:
            self.old = frozen_copy(self.trainer.state.params, self.compute_dtype)
        usage = Usage()
        policies = self.policies(usage)
        extra = {"more": more} if more is not None and getattr(self.algorithm, "draws_more", False) else {}
        scored = self.algorithm.score(policies, self.algorithm.rollout(policies, examples, key, **extra))
        stepped = time.perf_counter()
        metrics = self.apply(scored)
        done = time.perf_counter()
        return {**metrics, **scored.metrics, **usage.metrics(), "step_s": done - stepped, "update_s": done - started}
