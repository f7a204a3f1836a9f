"""Orbax checkpoints behind one small facade.

Layout: `<directory>/<step>/` managed by an Orbax CheckpointManager, with the items
  params        the model parameters (a nested dict of arrays, as nnx.to_pure_dict gives)
  model_config  the HF config.json dict of the model (so a checkpoint exports without its run)
Training checkpoints add their own items beside these; export reads only these two, so every
checkpoint of a run converts to HF through `restore_model` + `models.save_hf`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from latro_jax import models, sharding
from latro_jax.models import ModelConfig, Transformer
from latro_jax.train import TrainState

_policies = ocp.checkpoint_managers.preservation_policy


def manager(directory: str, *, max_to_keep: int | None = None, create: bool = True,
            **options: Any) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager on `directory` (absolute path; created when `create`)."""
    directory = os.path.abspath(directory)
    if not create and not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory.")
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, **options)
    return ocp.CheckpointManager(directory, options=opts)


def model_items(model: Transformer) -> dict[str, Any]:
    """The save args of the params and model_config items of `model`."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtype = str(jax.tree.leaves(params)[0].dtype)
    return {"params": ocp.args.StandardSave(params),
            "model_config": ocp.args.JsonSave(model.config.to_hf_dict(dtype))}


def save_model(directory: str, model: Transformer, step: int = 0,
               extra: Mapping[str, Any] | None = None) -> None:
    """Save `model` (plus any extra Orbax items) as checkpoint `step` and wait for it."""
    with manager(directory) as mngr:
        mngr.save(step, args=ocp.args.Composite(**model_items(model), **(extra or {})))
        mngr.wait_until_finished()


def latest_step(directory: str) -> int:
    with manager(directory, create=False) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory}: no finished checkpoint in this directory.")
    return step


def restore_model(directory: str, step: int | None = None, *, dtype="float32",
                  param_dtype=None, remat: models.transformer.Remat = "none",
                  mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The model saved at `step` (default: the latest), with parameters cast to param_dtype
    (default: as saved) and placed sharded over `mesh` when given."""
    step = latest_step(directory) if step is None else step
    with manager(directory, create=False) as mngr:
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; "
                                    f"available: {sorted(mngr.all_steps())}")
        hf_config = mngr.restore(step, args=ocp.args.Composite(
            model_config=ocp.args.JsonRestore()))["model_config"]
        config = ModelConfig.from_hf_dict(hf_config, source=f"{directory}/{step}/model_config")
        param_dtype = param_dtype or hf_config.get("dtype", "float32")
        graphdef, abstract = models.abstract_model(config, dtype=dtype, param_dtype=param_dtype,
                                                   remat=remat)
        if mesh is not None:
            shardings = sharding.param_shardings(abstract, mesh)
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        target = nnx.to_pure_dict(abstract)
        params = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class TrainCheckpoints:
    """Checkpoints of one training stage: params + model_config (exportable as above), the
    optimizer state, and `meta` (step, data position, ... as JSON). Keeps the last `keep`
    steps plus the best by `best_metric` (a validation metric, larger is better)."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None):
        policies = [_policies.LatestN(keep)]
        if best_metric:
            policies.append(_policies.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                            keep_checkpoints_without_metrics=True))
        self.directory = os.path.abspath(directory)
        self.manager = manager(directory, preservation_policy=_policies.AnyPreservationPolicy(policies))

    def save(self, step: int, model: Transformer, state: TrainState, meta: dict[str, Any],
             metrics: dict[str, float] | None = None, extras: dict[str, Any] | None = None) -> None:
        """Checkpoint `step` of the stage: the model (params + config), the optimizer state,
        `meta` plus the optimizer's own step count (which lags `step` when updates were
        skipped), and `extras` (named pytrees of arrays, e.g. an algorithm's pi_old)."""
        meta = {**meta, "optimizer_steps": int(state.step), "extras": sorted(extras or {})}
        items = {name: ocp.args.StandardSave(tree) for name, tree in (extras or {}).items()}
        self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
            **model_items(model), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta), **items))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def latest_meta(self) -> dict[str, Any] | None:
        """The meta item (step, data position, ...) of the latest checkpoint; None without one."""
        step = self.latest_step()
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, target: TrainState, extras: dict[str, Any] | None = None
                       ) -> tuple[TrainState, dict[str, Any], dict[str, Any]] | None:
        """(train state, meta, extras) of the latest checkpoint, or None when there is none.
        `target` and `extras` (the live values) give the structure, dtypes and shardings the
        arrays are restored to; extras the checkpoint does not hold are left out."""
        step = self.latest_step()
        if step is None:
            return None
        meta = self.latest_meta()
        wanted = {k: v for k, v in (extras or {}).items() if k in meta.get("extras", ())}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(target.params))),
            opt_state=ocp.args.StandardRestore(_abstract(target.opt_state)),
            **{k: ocp.args.StandardRestore(_abstract(v)) for k, v in wanted.items()}))
        params = jax.tree.map(lambda x: x, target.params)
        nnx.replace_by_pure_dict(params, out["params"])
        state = target.replace(step=jnp.asarray(meta.get("optimizer_steps", meta["step"]), jnp.int32),
                               params=params, opt_state=out["opt_state"])
        return state, meta, {k: out[k] for k in wanted}

    def restore_latest_params(self, target: Any) -> Any:
        """The parameters (an nnx.State like `target`) of the latest checkpoint, without the
        optimizer state: what a finished stage hands to the next one."""
        step = self.latest_step()
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(target)))))
        params = jax.tree.map(lambda x: x, target)
        nnx.replace_by_pure_dict(params, out["params"])
        return params

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
