"""The stage loop behind `python -m latro_jax.main`: with the job built and checked (job.py), run
the stages in order -- each one registered algorithm (algorithms.ALGORITHMS) driven by one
generic loop -- with periodic Orbax checkpoints and exact resume, evaluations before and after
each stage (run_results.py), metrics (metrics_log.py), the workdir's lock and record
(run_dir.py), SIGTERM / Ctrl-C stops at safe points, the plot and the HF export."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import zlib
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from latro_jax import checkpoint, models, run_dir
from latro_jax.algorithms import Learner
from latro_jax.data import BatchIterator, select
from latro_jax.evaluate import EvaluationStopped
from latro_jax.job import Job, Stage, say
from latro_jax.job_config import JobConfig
from latro_jax.metrics_log import Logger
from latro_jax.run_results import Evaluations, evaluate_stage

__all__ = ["NonFiniteError", "OutputError", "Preempted", "StopSignals", "export", "rollout_key", "train"]


def evaluate_final(job: Job, model, workdir: str) -> dict[str, float]:
    """--mode=eval: `model` evaluated as eval/<last stage>-latest; SIGTERM or Ctrl-C stop it
    between two batches."""
    with StopSignals() as stop:
        try:
            return evaluate_stage(job, model, workdir, f"{job.stages[-1].name}-latest", stop=stop)
        except EvaluationStopped as e:
            raise Preempted(f"stopped by a signal during {e}; nothing was written") from e


# ---------------------------------------------------------------- running


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; the checkpoints written so far are safe."""


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


class OutputError(RuntimeError):
    """The run trained, but writing one of its outputs (the export, the plot) failed."""


class StopSignals:
    """SIGTERM and Ctrl-C while the job runs. The first asks it to stop at the next safe point:
    after the running update (which is then checkpointed), or at once during an evaluation (the
    checkpoints are already safe; the evaluation reruns on resume). A second one stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():  # once stopping, the job only reports and exits
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, *_):
        if self.requested:
            raise Preempted("stopped at once by a second signal; the checkpoints written before are "
                            "kept: rerun to resume")
        self.requested = True


def train(job: Job, workdir: str, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Run the stages; returns results {stage: {greedy, maj@k, ...}} (also in results.json).

    The workdir is locked against a second run. A workdir that holds a run of a config that
    trains differently (anything but mesh, eval, checkpoint, export) is refused unless
    allow_config_change. The workdir's record (config.json, the tokenizer) is written only once
    the run can start, so a refused or failed attempt leaves it as it was. A stage that trains
    further in this run is evaluated again, and every stage after it starts again from it (its
    older checkpoints set aside); a stage whose evaluation settings changed is evaluated again.
    SIGTERM and Ctrl-C checkpoint the current update (or cut an evaluation short) and stop."""
    run_dir.prepare(workdir)
    lock = run_dir.lock(workdir)
    try:
        record = json.loads(job.raw_config.to_json_best_effort())
        changed = run_dir.config_changes(workdir, record, allow_config_change)
        for stage in job.stages:  # an unwritable checkpoint folder stops the run before it starts
            checkpoint.check_writable(_stage_dir(workdir, stage))
        results_path = os.path.join(workdir, "results.json")
        results = run_dir.read_json(results_path, "delete it to evaluate every stage again (training "
                                    "is not repeated).", default={})
        if changed:
            say(f"config changed in {', '.join(changed)}: continuing with the new values (--allow_config_change)")
        run_dir.record(workdir, record, job.tokenizer)
        logger = Logger(workdir)
        model, origin = job.model, _initial_origin(job.config)
        try:
            with StopSignals() as stop:
                evaluations = Evaluations(job, workdir, results, stop)
                evaluations.ensure("init", model, redo=False)
                redo = False
                for stage in job.stages:
                    model, trained, origin = _run_stage(job, stage, model, origin, workdir, logger, stop)
                    redo = redo or trained
                    evaluations.ensure(stage.name, model, redo, updates=stage.config.stage.steps)
                if job.config.export.hf:
                    say(f"exported {export(model, workdir, job.config.export.peft, job.config.model.path)}")
                if jax.process_index() == 0:
                    _plot(workdir, job)
        except EvaluationStopped as e:
            raise Preempted(f"stopped by a signal during {e}; the checkpoints are saved: rerun to "
                            "evaluate again and go on") from e
        finally:
            logger.close()
        return results
    finally:
        lock.close()


def export(model, workdir: str, peft: bool = False, base: str = "") -> str:
    """The model as an HF folder <workdir>/hf with the run's tokenizer (LoRA adapters merged), and
    with `peft` its adapters as a PEFT folder <workdir>/peft for the base model `base`; each
    written whole or not at all. Returns the folders written."""
    from safetensors import SafetensorError
    path = os.path.join(workdir, "hf")
    try:
        written = models.save_hf(model, path, tokenizer_dir=os.path.join(workdir, "tokenizer"), overwrite=True)
        if peft:
            path = os.path.join(workdir, "peft")
            written += " and " + models.peft_io.save_peft(model, path, base, overwrite=True)
        return written
    except (OSError, SafetensorError) as e:
        raise OutputError(f"exporting the model to {path} failed ({getattr(e, 'strerror', None) or e}); "
                          f"{path} is as it was and the run's checkpoints are intact: free disk space, "
                          "then run --mode=export.") from e


def _plot(workdir: str, job: Job) -> None:
    from latro_jax.plots import plot_run
    try:
        plot_run(workdir, {s.name: s.algorithm.curves for s in job.stages})
    except OSError as e:
        raise OutputError(f"writing the training plot in {workdir} failed ({e.strerror or e}); the "
                          "run finished: its checkpoints, results.json and export are complete.") from e


def rollout_key(seed: int, stage: str, step: int) -> jax.Array:
    """The random key of update `step` of the stage named `stage`: key(seed) folded with the
    stage name's CRC-32, then with the step. Independent across stages and steps, and the same
    on resume; an algorithm splits it for the draws of one update."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode())), step)


def _initial_origin(c: JobConfig) -> str:
    """The identity of the model the first stage starts from: its folder, or its init config and seed."""
    source = {"path": c.model.path} if c.model.path else {"init": c.model.init, "seed": c.seed}
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _next_origin(origin: str, stage: str, step: int) -> str:
    """The identity of the model a stage hands on: its start's identity, its name and its last update."""
    return hashlib.sha256(f"{origin}/{stage}@{step}".encode()).hexdigest()[:16]


def _stage_dir(workdir: str, stage: Stage) -> str:
    return os.path.join(workdir, "checkpoints", stage.name)


def _set_aside(directory: str) -> str:
    """A stage's checkpoint folder set aside as <folder>.stale (checkpoint.set_aside), once every
    process may reopen the folder."""
    aside = checkpoint.set_aside(directory, ".stale")
    if jax.process_count() > 1:  # every process reopens the folder only once it is empty
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"set aside {directory}")
    return aside


def _run_stage(job: Job, stage: Stage, model, origin: str, workdir: str, logger: Logger, stop: StopSignals):
    """Train `stage` from `model` (whose identity is `origin`) or resume it from its newest usable
    checkpoint, to its last update; returns (the trained model, whether any update ran now, the
    identity of the model it hands on). Every checkpoint records the origin it started from: one
    that started from another model (an earlier stage trained further since) is set aside and the
    stage trains again. A stage whose checkpoints say it finished only restores its final
    parameters."""
    cfg, every_eval = stage.config.stage, job.config.eval.every
    open_checkpoints = lambda: checkpoint.TrainCheckpoints(
        _stage_dir(workdir, stage), keep=job.config.checkpoint.keep,
        best_metric="val_greedy" if every_eval else None, notify=say, base=job.lora_base)
    ckpts = open_checkpoints()
    try:
        graphdef, params, frozen = nnx.split(model, models.lora.trainable(model), ...)
        newest = ckpts.newest_meta()
        if newest is not None and newest.get("origin", origin) != origin:
            ckpts.close()
            aside = _set_aside(ckpts.directory)
            say(f"{stage.name}: its checkpoints started from another model (an earlier stage trained "
                 f"further since); set aside as {aside}, training {stage.name} again")
            ckpts = open_checkpoints()
        elif newest is not None and newest["step"] >= cfg.steps:
            finished = ckpts.restore_latest_params(params)
            if finished is not None and finished[1]["step"] >= cfg.steps:
                return nnx.merge(graphdef, finished[0], frozen), False, _next_origin(origin, stage.name, finished[1]["step"])
        learner = Learner(stage.algorithm, model, cfg.optim)
        batches = BatchIterator(len(stage.examples), cfg.batch_size, seed=job.config.seed)
        step, skipped = 0, 0
        restored = ckpts.restore_latest(learner.state, learner.extras())
        if restored is not None:
            state, meta, extras = restored
            learner.load_state(state, extras)
            batches.restore(meta["data"])
            step, skipped = meta["step"], meta.get("skipped", 0)
            say(f"{stage.name}: resuming after update {step} of {cfg.steps} from {ckpts.directory}")
        logger.resume(stage.name, step)
        streak, started = 0, step
        with tqdm(total=cfg.steps, initial=step, desc=stage.name, disable=jax.process_index() != 0) as bar:
            while step < cfg.steps:
                examples = select(stage.examples, batches.next())
                metrics = learner.update(examples, rollout_key(job.config.seed, stage.name, step),
                                         more=lambda: select(stage.examples, batches.next()))
                step += 1
                streak = streak + 1 if metrics.get("nonfinite") else 0
                skipped += int(metrics.get("skipped", 0) or metrics.get("nonfinite", 0))
                logger.log(stage.name, step, metrics)
                bar.update(1)
                postfix = {k: f"{metrics[k]:.3g}" for k in stage.algorithm.shown if k in metrics}
                bar.set_postfix({**postfix, **({"skipped": skipped} if skipped else {})})
                if streak >= cfg.optim.max_nonfinite:
                    raise NonFiniteError(
                        f"{stage.name}: {streak} updates in a row (up to update {step}) had a non-finite "
                        f"loss or gradient; none of them was applied. The newest checkpoint is "
                        f"{_newest(ckpts)}. Lower {stage.name}.optim.learning_rate (now "
                        f"{cfg.optim.learning_rate:g}) or set {stage.name}.optim.grad_clip, then rerun "
                        "(with --allow_config_change) to resume from it.")
                validation = None
                if every_eval and step % every_eval == 0:
                    try:
                        val = evaluate_stage(job, learner.model(), workdir, f"{stage.name}-val-{step}",
                                             job.val_examples, stop=stop)
                        validation = {f"val_{k.replace('@', '_at_')}": v for k, v in val.items()}
                        logger.log(stage.name, step, validation)
                    except EvaluationStopped:
                        pass  # the update is checkpointed below, without its validation
                due = step % job.config.checkpoint.every == 0 or step == cfg.steps or stop.requested
                if due and not streak:  # during a non-finite streak the newest checkpoint stays the good one
                    ckpts.save(step, learner.model(), learner.state,
                               {"step": step, "skipped": skipped, "data": batches.state(), "origin": origin},
                               metrics=validation, extras=learner.extras())
                if stop.requested and step < cfg.steps:
                    raise Preempted(f"stopped by a signal: saved {stage.name} step {step} in {workdir}; "
                                    "rerun to resume")
        return learner.model(), step > started, _next_origin(origin, stage.name, step)
    finally:
        ckpts.close()


def _newest(ckpts: checkpoint.TrainCheckpoints) -> str:
    step = ckpts.latest_step()
    return f"step {step} in {ckpts.directory}" if step is not None else f"none (in {ckpts.directory})"
