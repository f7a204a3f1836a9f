"""Train state and the jitted, sharded update step shared by every trainer.

A trainer supplies `loss_fn(model, microbatch, scalars) -> (loss_contribution, aux)`, where the
contributions of the micro-batches SUM to the loss of the whole batch (each normalises by a
global denominator passed in `scalars`). A step's `static` values (hashable, e.g. a prompt width
that shapes the program) reach the loss in `scalars` too, as Python values; each distinct set
compiles its own step. The step accumulates gradients over micro-batches with
`lax.scan`, applies one optax update, and returns the new state (donated in place) and metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from latro_jax import sharding
from latro_jax.models import Transformer, lora

SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a learning-rate schedule (SPEC 1.5 defaults: lr 5e-7, linear decay to 0, no
    warm-up, b1 0.9, b2 0.999, eps 1e-8, weight decay 0, no gradient clipping)."""

    learning_rate: float = 5e-7
    schedule: str = "linear"  # linear: decay to 0; cosine: decay to 0; constant
    warmup_steps: int = 0
    total_steps: int = 117
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global norm; 0 = off
    max_nonfinite: int = 3  # stop after this many updates in a row with a non-finite loss or gradient

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if self.learning_rate <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("optim: learning_rate must be > 0, total_steps >= 1, warmup_steps >= 0")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        if self.max_nonfinite < 1:
            raise ValueError(f"optim.max_nonfinite={self.max_nonfinite} must be >= 1")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup, decay = cfg.warmup_steps, cfg.total_steps - cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.total_steps)
    after = (optax.linear_schedule(cfg.learning_rate, 0.0, decay) if cfg.schedule == "linear"
             else optax.constant_schedule(cfg.learning_rate))
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


NEVER_GIVE_UP = 2**30  # apply_if_finite's max_consecutive_errors: the run stops itself first


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW (with global-norm clipping when set) behind optax.apply_if_finite: an update whose
    gradient holds a NaN or Inf is not applied (the moments stay as they were). The job stops
    after cfg.max_nonfinite such updates in a row (run.py)."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw
    return optax.apply_if_finite(inner, max_consecutive_errors=NEVER_GIVE_UP)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's Params
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """What shapes a loss's program besides array shapes (a static jit argument): shared_prefix,
    the rows' shared prompt columns (W, g) for logprobs.token_logprobs (None: none shared)."""

    shared_prefix: tuple[int, int] | None = None


# loss(model, micro-batch, scalars, layout) -> (the micro-batch's share of the loss, aux metrics)
LossFn = Callable[[Transformer, dict, dict, RowLayout], tuple[jax.Array, dict]]


class Trainer:
    """Holds the train state of one model and runs jitted update steps on it.

    What trains is lora.trainable(model): every parameter, or the adapters alone when the model
    has them; the rest (the base weights under LoRA) is `frozen`: passed to each step, never
    donated, differentiated or given optimizer moments. Batches are dicts of host arrays with a
    leading row axis; rows are split into `microbatches` equal parts (rows must divide) and
    each part over the mesh's data axes.
    """

    def __init__(self, model: Transformer, optim: OptimConfig, loss_fn: LossFn, *,
                 microbatches: int = 1, mesh: jax.sharding.Mesh | None = None):
        graphdef, params, self.frozen = nnx.split(model, lora.trainable(model), ...)
        self._setup(graphdef, optim, loss_fn, microbatches, mesh)
        opt_state = jax.jit(self.optimizer.init)(params)  # moments follow the params' shardings
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
        # Parameters and moments keep their mesh placement; scalars are replicated on the mesh.
        # The state is updated in place (donated) and keeps these shardings across steps.
        state_shardings = jax.tree.map(
            lambda x: x.sharding if mesh is None or isinstance(x.sharding, NamedSharding)
            else NamedSharding(mesh, P()), state)
        self.state = jax.device_put(state, state_shardings)
        self._compile(state_shardings)

    @classmethod
    def abstract(cls, graphdef, params, optim: OptimConfig, loss_fn: LossFn, *, microbatches: int = 1,
                 mesh: jax.sharding.Mesh) -> "Trainer":
        """A trainer whose state is shapes only: `params` are jax.ShapeDtypeStructs with their
        NamedShardings on `mesh` (of any devices, a TPU topology's included), the moments get the
        parameters' shardings, the scalars are replicated. Nothing is allocated; its programs
        lower and compile for the mesh's devices (`step_program`)."""
        self = cls.__new__(cls)
        self.frozen = nnx.State({})
        self._setup(graphdef, optim, loss_fn, microbatches, mesh)
        replicated = NamedSharding(mesh, P())
        shapes = jax.eval_shape(self.optimizer.init, params)
        shardings = optax.tree_map_params(self.optimizer, lambda p, s: s, shapes,
                                          jax.tree.map(lambda p: p.sharding, params),
                                          transform_non_params=lambda _: replicated)
        opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
        self.state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                                opt_state=opt_state)
        self._compile(jax.tree.map(lambda x: x.sharding, self.state))
        return self

    def _setup(self, graphdef, optim: OptimConfig, loss_fn: LossFn, microbatches: int, mesh) -> None:
        if microbatches < 1:
            raise ValueError(f"microbatches={microbatches} must be >= 1")
        self.graphdef = graphdef
        self.optimizer = make_optimizer(optim)
        self.schedule = make_schedule(optim)
        self.microbatches = microbatches
        self.mesh = mesh
        self.loss_fn = loss_fn

    def _compile(self, state_shardings) -> None:
        self._step = jax.jit(self._step_impl, donate_argnums=(0,), static_argnums=(4,),
                             out_shardings=(state_shardings, None))
        self._gradients = jax.jit(lambda params, frozen, batch, scalars, layout:
                                  self._accumulate(params, frozen, batch, scalars, layout)[0], static_argnums=(4,))

    def step_program(self, batch: dict, scalars: dict, layout: RowLayout = RowLayout()) -> jax.stages.Lowered:
        """The update step lowered for this trainer's state and `batch` / `scalars` as shapes
        (arrays or jax.ShapeDtypeStructs [microbatches, rows, ...] placed as _place places them)."""
        return self._step.lower(self.state, self.frozen, batch, scalars, layout)

    def load_state(self, params, opt_state, step: int) -> None:
        """Replace the state with restored values, placed on the current state's shardings."""
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
        self.state = jax.device_put(state, shardings)

    def model(self) -> Transformer:
        """The current policy as a model (shares the state's arrays)."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen)

    def with_frozen(self, params):
        """The whole model state of trainable `params` (the state's or a copy of them) with
        the frozen part: what nnx.merge(graphdef, .) makes a model of."""
        return nnx.merge_state(self.frozen, params)

    def step(self, batch: dict[str, np.ndarray], scalars: dict[str, float],
             layout: RowLayout = RowLayout()) -> dict[str, float]:
        """One optimizer update on `batch`; returns the step's metrics as floats."""
        scalars = {k: jnp.float32(v) for k, v in scalars.items()}
        self.state, metrics = self._step(self.state, self.frozen, self._place(batch), scalars, layout)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def gradients(self, batch: dict[str, np.ndarray], scalars: dict[str, float],
                  layout: RowLayout = RowLayout()):
        """Gradients of the batch loss at the current parameters (summed over micro-batches, as
        a step computes them), without an update."""
        scalars = {k: jnp.float32(v) for k, v in scalars.items()}
        return self._gradients(self.state.params, self.frozen, self._place(batch), scalars, layout)

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.split_microbatches(batch, self.microbatches, self.mesh)

    def _accumulate(self, params, frozen, batch: dict, scalars: dict, layout: RowLayout):
        """(grads of `params`, loss, aux) of the batch, summed over its micro-batches with lax.scan."""
        def loss_of(params, microbatch):
            return self.loss_fn(nnx.merge(self.graphdef, params, frozen), microbatch, scalars, layout)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def accumulate(carry, microbatch):
            (loss, aux), grads = grad_fn(params, microbatch)
            return jax.tree.map(jnp.add, carry, (grads, loss, aux)), None

        first = jax.tree.map(lambda x: x[0], batch)
        (loss_shape, aux_shape), grad_shape = jax.eval_shape(grad_fn, params, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shape, loss_shape, aux_shape))
        return jax.lax.scan(accumulate, zeros, batch)[0]

    def _step_impl(self, state: TrainState, frozen, batch: dict, scalars: dict, layout: RowLayout):
        """One update, unless the loss, a gradient or a new parameter is not finite: then the
        state stays as it was (step included) and metrics["nonfinite"] = 1."""
        grads, loss, aux = self._accumulate(state.params, frozen, batch, scalars, layout)
        # a non-finite loss poisons the gradient, so that apply_if_finite rejects the update
        grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # a finite update that overflows a parameter is undone too
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(params_finite, a, b), new, old)
        finite = opt_state.last_finite & params_finite
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step), "nonfinite": 1.0 - finite.astype(jnp.float32),
                   **aux}
        new = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state))
        return new, metrics
