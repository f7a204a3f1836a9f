"""Orbax checkpoints behind one small facade.

Layout: `<directory>/<step>/` managed by an Orbax CheckpointManager, with the items
  params        what trains (a nested dict of arrays, as nnx.to_pure_dict gives): every model
                parameter, or with LoRA the adapters alone
  model_config  the HF config.json dict of the model (so a checkpoint exports without its run);
                with LoRA also "latro_lora": the adapters' config and the base they apply to
                (its folder, or the seed of a randomly initialised one, and checksums of its
                weights, checked when the checkpoint is restored)
Training checkpoints add their own items beside these; export reads only these two, so every
checkpoint of a run converts to HF through `restore_model` + `models.save_hf`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import nnx

from latro_jax import models, sharding
from latro_jax.models import ModelConfig, Transformer, lora
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


LORA_KEY = "latro_lora"  # model_config's entry for a LoRA checkpoint


def base_record(model: Transformer, *, path: str = "", seed: int = 0) -> dict[str, Any]:
    """What identifies the base weights a LoRA checkpoint applies to: its folder (or, without
    one, the seed that initialised it) and the checksums of its weights (checksums())."""
    return {"path": path, "seed": seed, "checksums": checksums(nnx.state(model, nnx.Param))}


def model_items(model: Transformer, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The save args of the params and model_config items of `model`: its trainable state
    (lora.trainable) and its config, with LoRA's and `base` (base_record) when it has adapters."""
    params = nnx.to_pure_dict(nnx.state(model, lora.trainable(model)))
    config = model.config.to_hf_dict(str(jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype))
    if lora.has_adapters(model):
        if base is None:
            raise ValueError("a model with LoRA adapters is saved with the record of its base (base_record)")
        config[LORA_KEY] = {**dataclasses.asdict(lora.config_of(model)), "base": base}
    return {"params": ocp.args.StandardSave(params), "model_config": ocp.args.JsonSave(config)}


def save_model(directory: str, model: Transformer, step: int = 0,
               extra: Mapping[str, Any] | None = None, base: dict[str, Any] | None = None) -> None:
    """Save `model` (plus any extra Orbax items) as checkpoint `step` and wait for it."""
    with manager(directory) as mngr:
        mngr.save(step, args=ocp.args.Composite(**model_items(model, base), **(extra or {})))
        mngr.wait_until_finished()


def latest_step(directory: str) -> int:
    with manager(directory, create=False) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory}: no finished checkpoint in this directory.")
    return step


def read_model_config(directory: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, the model_config item) of checkpoint `step` (default: the latest) of `directory`."""
    step = latest_step(directory) if step is None else step
    with manager(directory, create=False) as mngr:
        return step, _model_config(mngr, directory, step)


def _model_config(mngr: ocp.CheckpointManager, directory: str, step: int) -> dict[str, Any]:
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; "
                                f"available: {sorted(mngr.all_steps())}")
    return mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]


def restore_model(directory: str, step: int | None = None, *, dtype="float32",
                  param_dtype=None, remat: models.transformer.Remat = "none",
                  mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The model saved at `step` (default: the latest), with parameters cast to param_dtype
    (default: as saved) and placed sharded over `mesh` when given."""
    step = latest_step(directory) if step is None else step
    with manager(directory, create=False) as mngr:
        hf_config = _model_config(mngr, directory, step)
        config = ModelConfig.from_hf_dict(hf_config, source=f"{directory}/{step}/model_config")
        param_dtype = param_dtype or hf_config.get("dtype", "float32")
        if LORA_KEY in hf_config:
            model = _lora_base(hf_config[LORA_KEY], config, f"{directory}/{step}", dtype=dtype,
                               param_dtype=param_dtype, remat=remat, mesh=mesh)
            graphdef, adapters, rest = nnx.split(model, lora.LoRAWeight, ...)
            restored = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(adapters)))))["params"]
            nnx.replace_by_pure_dict(adapters, restored)
            return nnx.merge(graphdef, adapters, rest)
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
    model = nnx.merge(graphdef, abstract)
    model.shard_batch(mesh)
    return model


def _lora_base(record: dict[str, Any], config: ModelConfig, where: str, *, dtype, param_dtype, remat,
               mesh) -> Transformer:
    """The base model a LoRA checkpoint's record names (its folder, or init_model at its seed),
    checked against the record's checksums, with (zero) adapters of the record's config attached."""
    base = record["base"]
    if base["path"]:
        if not os.path.isdir(base["path"]):
            raise FileNotFoundError(f"{where} holds LoRA adapters for the base model {base['path']}, which is "
                                    "not there; put that folder back (the adapters apply to it alone).")
        model = models.load_hf(base["path"], dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh)
    else:
        model = models.init_model(config, seed=base["seed"], dtype=dtype, param_dtype=param_dtype,
                                  remat=remat, mesh=mesh)
    try:
        _verify("the base model", nnx.state(model, nnx.Param), base["checksums"])
    except CheckpointError as e:
        raise CheckpointError(f"{where} holds LoRA adapters for other base weights than "
                              f"{base['path'] or 'init seed ' + str(base['seed'])} now holds ({e}); restore "
                              "the base the run trained on.") from e
    fields = {f.name for f in dataclasses.fields(lora.LoRAConfig)}
    lora.attach(model, lora.LoRAConfig(**{k: tuple(v) if k == "targets" else v
                                          for k, v in record.items() if k in fields}))
    return model


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one could not be written; the message names the directory."""


def checksums(tree: Any) -> list[list[float]]:
    """[sum, sum of squares] (float32) of every array of `tree`, computed where the arrays live:
    what a checkpoint's meta records so that a restore can verify it got the same values."""
    sums = jax.tree.map(lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                             jnp.sum(jnp.square(x.astype(jnp.float32)))]), tree)
    return [[float(a), float(b)] for a, b in (sharding.to_host(x) for x in jax.tree.leaves(sums))]


def _verify(name: str, tree: Any, recorded: list[list[float]] | None) -> None:
    """Raise CheckpointError unless every array is finite and (when recorded) its checksums
    match the saved ones to 1e-4 (summation order may differ on another mesh)."""
    got = checksums(tree)
    if not all(np.isfinite(v).all() for v in got):
        raise CheckpointError(f"{name} holds NaN or Inf")
    if recorded is not None:
        if len(recorded) != len(got):
            raise CheckpointError(f"{name} has {len(got)} arrays, its record {len(recorded)}")
        for i, (g, r) in enumerate(zip(got, recorded)):
            if not np.allclose(g, r, rtol=1e-4, atol=1e-6):
                raise CheckpointError(f"{name} array {i} does not match its checksum (the file is damaged)")


class TrainCheckpoints:
    """Checkpoints of one training stage: params + model_config (exportable as above), the
    optimizer state, extra items, and `meta` (step, data position, checksums of every array,
    ... as JSON). Keeps exactly the last `keep` steps plus the best by `best_metric` (a
    validation metric, larger is better). Saves are waited for, so a failed write stops the
    run at once; restores verify what they read and fall back to the previous checkpoint."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
                 notify=lambda message: None, base: dict[str, Any] | None = None):
        policies = [_policies.LatestN(keep)]
        if best_metric:
            policies.append(_policies.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                            keep_checkpoints_without_metrics=False))
        self.directory = os.path.abspath(directory)
        self.notify = notify
        self.base = base  # base_record of a LoRA model's base weights
        check_writable(self.directory)
        # synchronous: a failed write raises in save(), with no background thread left behind
        self.manager = manager(directory, preservation_policy=_policies.AnyPreservationPolicy(policies),
                               enable_async_checkpointing=False)

    def save(self, step: int, model: Transformer, state: TrainState, meta: dict[str, Any],
             metrics: dict[str, float] | None = None, extras: dict[str, Any] | None = None) -> None:
        """Checkpoint `step` of the stage: the model (params + config), the optimizer state,
        `meta` plus the optimizer's own step count (which lags `step` when updates were
        skipped), `extras` (named pytrees of arrays, e.g. an algorithm's pi_old) and checksums
        of all of them. Raises CheckpointError (naming the last good step) when the write fails."""
        extras = extras or {}
        meta = {**meta, "optimizer_steps": int(state.step), "extras": sorted(extras),
                "checksums": {"params": checksums(state.params), "opt_state": checksums(state.opt_state),
                              **{k: checksums(v) for k, v in extras.items()}}}
        items = {name: ocp.args.StandardSave(tree) for name, tree in extras.items()}
        previous = self.manager.latest_step()
        last_good = f"the last good checkpoint is {'none' if previous is None else f'step {previous}'}"
        needed = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state, extras)))
        free = shutil.disk_usage(self.directory).free
        if free < needed * 1.1:
            raise CheckpointError(f"writing checkpoint {step} to {self.directory} needs about {needed / 2**20:.0f} MiB "
                                  f"but the disk has {free / 2**20:.0f} MiB free; {last_good}. Free disk space, "
                                  "then rerun to resume.")
        try:
            with _writer_noise_held():
                self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
                    **model_items(model, self.base), opt_state=ocp.args.StandardSave(state.opt_state),
                    meta=ocp.args.JsonSave(meta), **items))
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - every write failure gets the same report
            raise CheckpointError(
                f"writing checkpoint {step} to {self.directory} failed ({type(e).__name__}: "
                f"{_first_line(e)}); {last_good}. Free disk space or "
                "fix the directory's permissions, then rerun to resume.") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def newest_meta(self) -> dict[str, Any] | None:
        """The meta of the newest checkpoint whose meta reads (its arrays not read or verified),
        or None when there is none."""
        self.skipped = []
        return next((meta for _, meta in self._candidates()), None)

    def _candidates(self):
        """Steps, newest first, with their meta (unreadable meta: a skipped step)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if not isinstance(meta, dict) or "step" not in meta:
                    raise CheckpointError("its meta item is missing or incomplete")
                yield step, meta
            except Exception as e:  # noqa: BLE001
                self._skip(step, e)

    def _skip(self, step: int, error: Exception) -> None:
        """Set an unusable checkpoint aside (renamed <step>.unusable, kept for inspection), so
        that the step can be written again, and say so."""
        self.skipped.append(f"step {step}: {_first_line(error)}")
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
            set_aside(path, ".unusable")
        self.manager.reload()
        self.notify(f"checkpoint {step} in {self.directory} is unusable ({_first_line(error)}); set aside "
                    "as <step>.unusable, falling back to the previous one")

    def restore_latest(self, target: TrainState, extras: dict[str, Any] | None = None
                       ) -> tuple[TrainState, dict[str, Any], dict[str, Any]] | None:
        """(train state, meta, extras) of the newest checkpoint that restores and verifies
        (finite, checksums as saved), or None when the directory holds no checkpoint at all.
        `target` and `extras` (the live values) give structure, dtypes and shardings; extras
        the checkpoint does not hold are left out. Raises CheckpointError when checkpoints
        exist but none is usable."""
        self.skipped = []
        for step, meta in self._candidates():
            wanted = {k: v for k, v in (extras or {}).items() if k in meta.get("extras", ())}
            try:
                params, out = self._restore_verified(step, meta, target.params,
                                                     {"opt_state": target.opt_state, **wanted})
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                self._skip(step, e)
                continue
            state = target.replace(step=jnp.asarray(meta.get("optimizer_steps", meta["step"]), jnp.int32),
                                   params=params, opt_state=out["opt_state"])
            return state, meta, {k: out[k] for k in wanted}
        return self._none_usable()

    def restore_latest_params(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """(parameters like `target`, meta) of the newest checkpoint whose parameters restore
        and verify, without the optimizer state: what a finished stage hands to the next one."""
        self.skipped = []
        for step, meta in self._candidates():
            try:
                params, _ = self._restore_verified(step, meta, target, {})
            except Exception as e:  # noqa: BLE001
                self._skip(step, e)
                continue
            return params, meta
        return self._none_usable()

    def _restore_verified(self, step: int, meta: dict[str, Any], params_target: Any,
                          items: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(parameters like params_target, {name: tree} of `items`) of checkpoint `step`, each
        verified against the checksums recorded in its meta (raises when one does not match)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params_target))),
            **{k: ocp.args.StandardRestore(_abstract(v)) for k, v in items.items()}))
        recorded = meta.get("checksums", {})
        params = jax.tree.map(lambda x: x, params_target)
        nnx.replace_by_pure_dict(params, out["params"])
        _verify("params", params, recorded.get("params"))
        for k in items:
            _verify(k, out[k], recorded.get(k))
        return params, out

    def _none_usable(self) -> None:
        if self.skipped:
            raise CheckpointError(f"no usable checkpoint in {self.directory} ({'; '.join(self.skipped)}). "
                                  "Delete the directory to train this stage from its start.")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def set_aside(path: str, suffix: str) -> str:
    """Rename `path` to path + suffix ("+" added while that name is taken; process 0 renames),
    kept for inspection; returns the new name."""
    aside = path + suffix
    while os.path.exists(aside):
        aside += "+"
    if jax.process_index() == 0:
        os.rename(path, aside)
    return aside


@contextlib.contextmanager
def _writer_noise_held():
    """Hold what is written to stderr (file descriptor 2, so C++ writers too) during a save: a
    failed write makes Orbax's and TensorStore's writer threads print dozens of tracebacks and
    error logs before the save raises -- and some after, from threads still unwinding -- so on
    failure stderr is given back only once the held output has settled; the caller reports the
    failure in one line. Held output is replayed when the save succeeds, and on failure too
    with --verbosity >= 1."""
    sys.stderr.flush()
    held, saved = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(held.fileno(), 2)
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed:
            _settle(held)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if not failed or absl_logging.get_verbosity() >= 1:
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
        held.close()


def _settle(held, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
    """Wait until nothing more is written to `held` for `quiet_s` (at most `limit_s`): the
    writer threads of a failed save finish their reports there, and the tasks it left behind
    are collected (asyncio reports an unretrieved task exception when it is collected)."""
    deadline, size = time.monotonic() + limit_s, -1
    while time.monotonic() < deadline:
        gc.collect()
        sys.stderr.flush()
        now = os.fstat(held.fileno()).st_size
        if now == size:
            return
        size = now
        time.sleep(quiet_s)


def check_writable(directory: str) -> None:
    """Fail at once, naming the path, when checkpoints cannot be written there."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {e.strerror or e}. Point "
                              "--workdir at a writable directory with free space.") from e


def _first_line(error: Exception) -> str:
    """The gist of an error: its first line, without TensorStore's spec dump."""
    text = str(error).strip() or type(error).__name__
    os_error = re.search(r"([A-Za-z][^:\[\]]*?) \[os_error_code='(\d+)'\]", text)
    if os_error:  # TensorStore's long write error ends with the OS's reason
        return f"{os_error.group(1).strip()} (OS error {os_error.group(2)})"
    return text.splitlines()[0].split(" See full TensorStore details")[0][:300]
