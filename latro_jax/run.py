"""The training job behind `python -m latro_jax.main`: build everything from the config (and
validate it) before the workdir is touched, then run the stages in order -- each one registered
algorithm (algorithms.ALGORITHMS) driven by one generic loop -- with periodic Orbax checkpoints
and exact resume, evaluate before and after each stage, log metrics (JSONL, TensorBoard,
progress bar), plot, and export the final model as an HF folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import zlib
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from latro_jax import checkpoint, models, run_dir, sharding
from latro_jax.algorithms import Algorithm, Context, Learner
from latro_jax.data import BatchIterator, PromptFormatter, get_task, load_examples, select
from latro_jax.data.task_tokenizers import build_char_tokenizer, build_word_tokenizer
from latro_jax.evaluate import EvaluationStopped, evaluate
from latro_jax.job_config import ConfigError, JobConfig, StageConfig, parse
from latro_jax.meta_prover import MetaProver
from latro_jax.rollout import Stops

__all__ = ["ConfigError", "Job", "Stage", "build", "evaluate_stage", "results_table", "train"]


@dataclasses.dataclass
class Stage:
    """One stage of the run: its config, its algorithm (bound to the job's context) and the
    training examples it draws batches from."""

    config: StageConfig
    algorithm: Algorithm
    examples: list

    @property
    def name(self) -> str:
        return self.config.name


@dataclasses.dataclass
class Job:
    """Everything a run needs, built and validated from the config."""

    config: JobConfig
    raw_config: Any  # the ConfigDict, written to <workdir>/config.json
    mesh: jax.sharding.Mesh
    tokenizer: Any
    fmt: PromptFormatter
    task: Any
    stages: list[Stage]
    eval_examples: list
    val_examples: list
    model: models.Transformer | None  # the initial model (None when built for eval / export)


def build(raw_config, *, load_model: bool = True) -> Job:
    """Validate the config and build the job; raises ConfigError / FileNotFoundError /
    DataError with one clear message. Writes nothing. load_model=False skips the initial
    model (evaluation and export restore a checkpoint instead)."""
    c = parse(raw_config)
    try:
        mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from e
    task = get_task(c.task.name)
    synthetic = dataclasses.asdict(c.task.synthetic) if c.task.synthetic else None

    def load(split: str, limit: int | None = None, source: str = c.task.source) -> list:
        return load_examples(task, source, split, synthetic=synthetic,
                             config_name=c.task.config_name or None, limit=limit)

    train = load(c.task.train_split)
    eval_source = c.task.eval_source or c.task.source
    tokenizer = _tokenizer(c, train)
    model_dir = models.hf_io.resolve_model_dir(c.model.path) if c.model.path else None
    model_config = models.read_config(model_dir) if model_dir else None
    fmt = PromptFormatter(tokenizer, eos_ids=model_config.eos_token_id if model_config else ())
    model_config = model_config or _init_config(c, len(tokenizer), fmt)
    problem = fmt.vocabulary_problem(model_config.vocab_size, model_dir or "config.model.init")
    if problem:
        raise ConfigError(f"{problem} (config.tokenizer.path)")
    eval_examples = load(c.task.eval_split, c.eval.limit or None, eval_source)
    val_examples = []
    if c.eval.every:
        if not c.task.val_split or c.task.val_split == c.task.eval_split:
            raise ConfigError("config.eval.every > 0 needs config.task.val_split, a validation split "
                              "other than the evaluation split (the best checkpoint is never chosen on test).")
        val_examples = load(c.task.val_split, c.eval.limit or None, eval_source)
    stops = Stops(fmt.stop_ids, fmt.stop_phrases)
    stages = [_stage(s, c, train, Context(task, fmt, stops, fmt.pad_id, mesh, s.stage.microbatches,
                                                 s.stage.logprob_chunk))
              for s in c.stages]
    fits = _LengthCheck(fmt, model_config.max_position_embeddings, c.task.too_long)
    for stage in stages:
        stage.examples = fits(stage.examples, stage.algorithm.tokens_after_prompt, f"stage {stage.name}")
    forced = MetaProver(c.eval.forcing, task, fmt).forced_tokens() if c.eval.forced else 0
    eval_examples = fits(eval_examples, lambda e: c.eval.max_new_tokens + forced, "evaluation")
    val_examples = fits(val_examples, lambda e: c.eval.max_new_tokens + forced, "validation")
    for stage in stages:
        if len(stage.examples) < stage.config.stage.batch_size:
            raise ConfigError(f"config.{stage.name}.batch_size={stage.config.stage.batch_size} exceeds the "
                              f"{len(stage.examples)} training examples that fit the model.")
    model = _model(c, mesh, model_dir, model_config) if load_model else None
    return Job(c, raw_config, mesh, tokenizer, fmt, task, stages, eval_examples, val_examples, model)


class _LengthCheck:
    """Examples whose prompt plus what a stage appends exceed max_position_embeddings: refused
    (naming the longest) or, with task.too_long = "drop", left out with a counted warning."""

    def __init__(self, fmt: PromptFormatter, limit: int, policy: str):
        self.fmt, self.limit, self.policy, self.prompts = fmt, limit, policy, {}

    def __call__(self, examples: list, after, where: str) -> list:
        needs = [(self._prompt(e) + after(e), e) for e in examples]
        over = [(n, e) for n, e in needs if n > self.limit]
        if not over:
            return examples
        n, worst = max(over, key=lambda x: x[0])
        if self.policy == "refuse":
            raise ConfigError(f"{len(over)} examples of the {where} need more positions than the model's "
                              f"max_position_embeddings = {self.limit}; the longest, {worst.id!r}, needs {n} "
                              f"(prompt {self._prompt(worst)} + {n - self._prompt(worst)}). Lower the "
                              "generation budget, or set config.task.too_long='drop' to leave them out.")
        _say(f"warning: left out {len(over)} of {len(examples)} examples of the {where}: longer than "
             f"max_position_embeddings = {self.limit} (the longest needs {n})")
        return [e for m, e in needs if m <= self.limit]

    def _prompt(self, example) -> int:
        if example.id not in self.prompts:
            self.prompts[example.id] = len(self.fmt.prompt_ids(example.question))
        return self.prompts[example.id]


def _stage(s: StageConfig, c: JobConfig, train: list, ctx: Context) -> Stage:
    """The stage's algorithm and examples, checked: gold rationales where it trains on them,
    enough examples for a batch, rows that split into micro-batches over the data shards."""
    try:
        algorithm = s.algorithm(s.config, ctx)
    except ValueError as e:
        raise ConfigError(f"config.{s.name}: {e}") from e
    wants_rationales = any(st.algorithm.trains_on == "rationales" for st in c.stages)
    n_sft = c.task.sft_examples if wants_rationales else 0
    if algorithm.trains_on == "rationales":
        examples = train[:n_sft]
        if not examples or any(e.rationale is None for e in examples):
            raise ConfigError(f"config.task.sft_examples: stage {s.name!r} ({algorithm.name}) trains "
                              "on gold rationales; it needs training examples with rationales "
                              "(and sft_examples >= 1).")
    else:
        examples = train[n_sft:]
    if len(examples) < s.stage.batch_size:
        raise ConfigError(f"config.{s.name}.batch_size={s.stage.batch_size} exceeds the "
                          f"{len(examples)} training examples left for this stage.")
    rows, shards = algorithm.rows(s.stage.batch_size), sharding.data_shards(ctx.mesh)
    if rows % (s.stage.microbatches * shards):
        raise ConfigError(f"config.{s.name}: a step of batch_size={s.stage.batch_size} has {rows} rows, "
                          f"not divisible by microbatches ({s.stage.microbatches}) x data-parallel "
                          f"devices ({shards}); change {s.name}.batch_size or the mesh.")
    return Stage(s, algorithm, examples)


def _tokenizer(c: JobConfig, train: list):
    """The tokenizer folder at config.tokenizer.path (default model.path), or one built in code:
    build="char" (one token per character), "words" (words whole, digits single; learned from
    the training split's questions and rationales)."""
    import transformers
    if c.tokenizer.build == "char":
        return build_char_tokenizer()
    if c.tokenizer.build == "words":
        return build_word_tokenizer([e.question for e in train] + [e.rationale for e in train if e.rationale])
    path = c.tokenizer.path or c.model.path
    if not path:
        raise ConfigError("config.tokenizer.path (or config.model.path) must name a tokenizer folder")
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"config.tokenizer: cannot load a tokenizer from {path!r}: {e}") from e


def _init_config(c: JobConfig, vocab_size: int, fmt: PromptFormatter) -> models.ModelConfig:
    """The ModelConfig of config.model.init (a model built from scratch for this tokenizer)."""
    init = dict(c.model.init)
    init.setdefault("vocab_size", vocab_size)
    unknown = sorted(set(init) - {f.name for f in dataclasses.fields(models.ModelConfig)})
    if unknown:
        raise ConfigError(f"config.model.init: unknown key {unknown[0]!r}; the keys are ModelConfig's fields.")
    try:
        return models.ModelConfig(bos_token_id=fmt.tokenizer.bos_token_id, eos_token_id=(fmt.end_id,),
                                  pad_token_id=fmt.pad_id, **init)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model.init: {e}") from e


def _model(c: JobConfig, mesh, model_dir: str | None, config: models.ModelConfig) -> models.Transformer:
    kw = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat, mesh=mesh)
    if model_dir:
        return models.load_hf(model_dir, **kw)
    return models.init_model(config, seed=c.seed, **kw)


def restore_final(job: Job, workdir: str) -> models.Transformer:
    """The latest checkpoint of the last stage, with the config's compute dtype, remat and mesh
    (parameters as stored): what --mode=eval and --mode=export work on. The job's tokenizer must
    be the one the run trained with (<workdir>/tokenizer) and fit the model."""
    run_dir.check_tokenizer(job.tokenizer, workdir, "the config's tokenizer",
                            "drop the --config.tokenizer overrides so that the run's own is used.")
    m, directory = job.config.model, os.path.join(workdir, "checkpoints", job.stages[-1].name)
    model = checkpoint.restore_model(directory, dtype=m.dtype, remat=m.remat, mesh=job.mesh)
    problem = job.fmt.vocabulary_problem(model.config.vocab_size, directory)
    if problem:
        raise ConfigError(problem)
    return model


def evaluate_final(job: Job, model, workdir: str) -> dict[str, float]:
    """--mode=eval: `model` evaluated as eval/<last stage>-latest; SIGTERM or Ctrl-C stop it
    between two batches."""
    with StopSignals() as stop:
        try:
            return evaluate_stage(job, model, workdir, f"{job.stages[-1].name}-latest", stop=stop)
        except EvaluationStopped as e:
            raise Preempted(f"stopped by a signal during {e}; nothing was written") from e


# ---------------------------------------------------------------- running
class Logger:
    """metrics.jsonl + TensorBoard (process 0 only). Opening repairs the file: a partial last
    line (a kill mid-write) is dropped."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if self.active:
            self._rewrite(lambda row: True)
            self.jsonl = open(self.path, "a")
            self.tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

    def _rewrite(self, keep) -> None:
        """Keep the complete rows for which keep(row) holds."""
        if not os.path.exists(self.path):
            return
        rows = []
        with open(self.path) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if keep(r))
        os.replace(tmp, self.path)

    def resume(self, stage: str, step: int) -> None:
        """Forget the rows of `stage` after `step` (logged after its checkpoint, before a kill):
        they are logged again when those updates rerun."""
        if self.active:
            self.jsonl.close()
            self._rewrite(lambda r: r.get("stage") != stage or r.get("step", 0) <= step)
            self.jsonl = open(self.path, "a")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


def _tensorboard_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported with torch hidden. tensorboardX imports torch where it
    is installed, only to recognise torch tensors among the values it is given: that cost each job
    ~1 s and ~190 MB and put a second framework (on GPUs, with its own CUDA libraries) beside jax."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


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
            _say(f"config changed in {', '.join(changed)}: continuing with the new values (--allow_config_change)")
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
                    _say(f"exported {export(model, workdir)}")
                if jax.process_index() == 0:
                    _plot(workdir, job)
        finally:
            logger.close()
        return results
    finally:
        lock.close()


def export(model, workdir: str) -> str:
    """The model as an HF folder <workdir>/hf with the run's tokenizer (written whole or not at all)."""
    from safetensors import SafetensorError
    path = os.path.join(workdir, "hf")
    try:
        return models.save_hf(model, path, tokenizer_dir=os.path.join(workdir, "tokenizer"), overwrite=True)
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


class Evaluations:
    """The evaluations of a run, as results.json records them: one per stage (and "init"), each
    with its settings in eval/<name>/settings.json. An evaluation is run when its stage trained
    (redo), when results.json lacks it, or when its recorded settings differ from the config's."""

    def __init__(self, job: Job, workdir: str, results: dict, stop: StopSignals):
        self.job, self.workdir, self.results, self.stop = job, workdir, results, stop
        self.settings = _eval_settings(job.config)

    def ensure(self, name: str, model, redo: bool, **extra) -> None:
        settings_path = os.path.join(self.workdir, "eval", name, "settings.json")
        recorded = run_dir.read_json(settings_path, "delete it to evaluate this stage again.")
        if not redo and name in self.results and recorded == self.settings:
            return
        if name in self.results and not redo:
            _say(f"{name}: evaluating again, with the config's evaluation settings")
        try:
            summary = evaluate_stage(self.job, model, self.workdir, name, stop=self.stop)
        except EvaluationStopped as e:
            raise Preempted(f"stopped by a signal during {e}; the checkpoints are saved: rerun to "
                            "evaluate again and go on") from e
        run_dir.write_json(settings_path, self.settings)
        self.results[name] = {**summary, **extra}
        run_dir.write_json(os.path.join(self.workdir, "results.json"), self.results)


def _eval_settings(c: JobConfig) -> dict:
    """What an evaluation's result depends on: the eval section (but its validation cadence)
    and the evaluation data, as JSON values."""
    settings = {k: v for k, v in dataclasses.asdict(c.eval).items() if k != "every"}
    settings["data"] = {"task": c.task.name, "source": c.task.eval_source or c.task.source,
                        "split": c.task.eval_split}
    return json.loads(json.dumps(settings, default=str))


def evaluate_stage(job: Job, model, workdir: str, name: str, examples=None, stop=None) -> dict[str, float]:
    """Greedy and maj@k accuracy of `model` on the evaluation split (or `examples`), its mean
    greedy output tokens, and (when configured) sampled pass@1, forced-answer accuracy by budget and regret,
    with the per-example records in workdir/eval/<name>. Raises EvaluationStopped when `stop()`
    turns true between batches."""
    summary = evaluate(model, job.task, job.eval_examples if examples is None else examples,
                       job.fmt, job.config.eval, mesh=job.mesh, out_dir=os.path.join(workdir, "eval", name),
                       desc=f"eval {name}", progress=jax.process_index() == 0, stop=stop)
    return {k: v for k, v in summary.items()
            if k in ("greedy", f"maj@{job.config.eval.maj_k}", "pass@1", "greedy_tokens")
            or k.startswith(("forced@", "regret@"))}


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
        best_metric="val_greedy" if every_eval else None, notify=_say)
    ckpts = open_checkpoints()
    try:
        graphdef, params = nnx.split(model)
        newest = ckpts.newest_meta()
        if newest is not None and newest.get("origin", origin) != origin:
            ckpts.close()
            aside = _set_aside(ckpts.directory)
            _say(f"{stage.name}: its checkpoints started from another model (an earlier stage trained "
                 f"further since); set aside as {aside}, training {stage.name} again")
            ckpts = open_checkpoints()
        elif newest is not None and newest["step"] >= cfg.steps:
            finished = ckpts.restore_latest_params(params)
            if finished is not None and finished[1]["step"] >= cfg.steps:
                return nnx.merge(graphdef, finished[0]), False, _next_origin(origin, stage.name, finished[1]["step"])
        learner = Learner(stage.algorithm, model, cfg.optim)
        batches = BatchIterator(len(stage.examples), cfg.batch_size, seed=job.config.seed)
        step, skipped = 0, 0
        restored = ckpts.restore_latest(learner.state, learner.extras())
        if restored is not None:
            state, meta, extras = restored
            learner.load_state(state, extras)
            batches.restore(meta["data"])
            step, skipped = meta["step"], meta.get("skipped", 0)
            _say(f"{stage.name}: resuming after update {step} of {cfg.steps} from {ckpts.directory}")
        logger.resume(stage.name, step)
        streak, started = 0, step
        with tqdm(total=cfg.steps, initial=step, desc=stage.name, disable=jax.process_index() != 0) as bar:
            while step < cfg.steps:
                examples = select(stage.examples, batches.next())
                metrics = learner.update(examples, rollout_key(job.config.seed, stage.name, step))
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


def _say(message: str) -> None:
    """A one-line notice on stderr (process 0), above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)


def results_table(results: dict[str, Any]) -> str:
    keys = sorted({k for r in results.values() for k in r})
    widths = [max(10, len(k) + 2) for k in keys]
    first = max(8, *(len(s) + 1 for s in results))
    lines = [f"{'stage':<{first}}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))]
    for stage, r in results.items():
        lines.append(f"{stage:<{first}}" + "".join(f"{r.get(k, float('nan')):>{w}.3f}" for k, w in zip(keys, widths)))
    return "\n".join(lines)
