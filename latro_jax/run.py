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

from latro_jax import checkpoint, models, sharding
from latro_jax.algorithms import Algorithm, Context, Learner
from latro_jax.data import BatchIterator, PromptFormatter, get_task, load_examples, select
from latro_jax.data.task_tokenizers import build_char_tokenizer, build_word_tokenizer
from latro_jax.evaluate import evaluate
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
    _check_vocabulary(tokenizer, fmt, model_config.vocab_size, model_dir or "config.model.init")
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


def _check_vocabulary(tokenizer, fmt: PromptFormatter, vocab_size: int, source: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding (NaN logits otherwise)."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {largest} ({len(tokenizer)} tokens) but the model "
                          f"({source}) has {vocab_size} embedding rows; use the model's own tokenizer "
                          "(config.tokenizer.path) or a model built for this one.")
    outside = [i for i in (*fmt.stop_ids, fmt.pad_id, tokenizer.bos_token_id) if i is not None and i >= vocab_size]
    if outside:
        raise ConfigError(f"token ids {outside} (stops, pad, bos) lie beyond the model's {vocab_size} "
                          f"embedding rows ({source}).")


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
    (parameters as stored): what --mode=eval and --mode=export work on."""
    m = job.config.model
    return checkpoint.restore_model(os.path.join(workdir, "checkpoints", job.stages[-1].name),
                                    dtype=m.dtype, remat=m.remat, mesh=job.mesh)


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
    """SIGTERM or Ctrl-C arrived; a checkpoint was written."""


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


class WorkdirError(RuntimeError):
    """The workdir is in use, or holds a run of a different config."""


def train(job: Job, workdir: str, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Run the stages; returns results {stage: {greedy, maj@k, ...}} (also in results.json).

    The workdir is locked against a second run. A workdir that holds a run of a config that
    trains differently (anything but mesh, eval, checkpoint, export) is refused unless
    allow_config_change; a stage that trains further in this run is evaluated again, and so is
    every stage after it. SIGTERM and Ctrl-C checkpoint the current update and stop."""
    os.makedirs(workdir, exist_ok=True)
    lock = _lock(workdir)
    try:
        _record_config(job, workdir, allow_config_change)
        results_path = os.path.join(workdir, "results.json")
        results = json.load(open(results_path)) if os.path.exists(results_path) else {}
        stop = {"requested": False}
        handler = lambda *_: stop.update(requested=True)
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        logger = Logger(workdir)
        model = job.model
        try:
            if "init" not in results:
                results["init"] = evaluate_stage(job, model, workdir, "init")
                _write_json(results_path, results)
            stale = False
            for stage in job.stages:
                model, trained = _run_stage(job, stage, model, workdir, logger, stop)
                stale = stale or trained
                if stale or stage.name not in results:
                    results[stage.name] = {**evaluate_stage(job, model, workdir, stage.name),
                                           "updates": stage.config.stage.steps}
                    _write_json(results_path, results)
            if job.config.export.hf:
                path = models.save_hf(model, os.path.join(workdir, "hf"),
                                      tokenizer_dir=os.path.join(workdir, "tokenizer"), overwrite=True)
                _say(f"exported {path}")
            if jax.process_index() == 0:
                from latro_jax.plots import plot_run
                plot_run(workdir, {s.name: s.algorithm.curves for s in job.stages})
        finally:
            logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return results
    finally:
        lock.close()


TRAINING_INVARIANT = ("mesh", "eval", "checkpoint", "export")  # config sections a resume may change


def _record_config(job: Job, workdir: str, allow_change: bool) -> None:
    """Write config.json (and the tokenizer) into the workdir; if it already holds a config
    whose training fields differ, refuse (naming them) unless allow_change."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(job.raw_config.to_json_best_effort())
    if os.path.exists(path):
        old = json.load(open(path))
        changed = sorted(set(_flatten(old, TRAINING_INVARIANT)) ^ set(_flatten(new, TRAINING_INVARIANT)))
        fields = sorted({k for k, _ in changed})
        if fields and not allow_change:
            raise WorkdirError(f"{workdir} holds a run whose config differs in {', '.join(fields[:8])}"
                               f"{' ...' if len(fields) > 8 else ''}; resuming would mix the two. Use a "
                               "new --workdir, or pass --allow_config_change to continue it with the new config.")
        if fields:
            _say(f"config changed in {', '.join(fields)}: continuing with the new values (--allow_config_change)")
    if jax.process_index() == 0:
        job.tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
        _write_json(path, new)
        training = json.dumps(sorted(_flatten(new, TRAINING_INVARIANT)))
        with open(os.path.join(workdir, "config.sha256"), "w") as f:  # of the fields that change training
            f.write(hashlib.sha256(training.encode()).hexdigest() + "\n")


def _flatten(config: dict, skip: tuple[str, ...], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in config.items():
        if not prefix and k in skip:
            continue
        if isinstance(v, dict):
            out += _flatten(v, (), f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", json.dumps(v)))
    return out


def _lock(workdir: str):
    """An exclusive lock on <workdir>/.lock-<process index> (released when the process ends, however it ends)."""
    import fcntl
    f = open(os.path.join(workdir, f".lock-{jax.process_index()}"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise WorkdirError(f"{workdir} is in use by another run (it holds the lock .lock-"
                           f"{jax.process_index()}); wait for it to finish or use another --workdir.")
    return f


def evaluate_stage(job: Job, model, workdir: str, name: str, examples=None) -> dict[str, float]:
    """Greedy and maj@k accuracy of `model` on the evaluation split (or `examples`), its mean
    greedy output tokens, and (when configured) forced-answer accuracy by budget and regret,
    with the per-example records in workdir/eval/<name>."""
    summary = evaluate(model, job.task, job.eval_examples if examples is None else examples,
                       job.fmt, job.config.eval, mesh=job.mesh, out_dir=os.path.join(workdir, "eval", name),
                       desc=f"eval {name}", progress=jax.process_index() == 0)
    return {k: v for k, v in summary.items()
            if k in ("greedy", f"maj@{job.config.eval.maj_k}", "greedy_tokens") or k.startswith(("forced@", "regret@"))}


def rollout_key(seed: int, stage: str, step: int) -> jax.Array:
    """The random key of update `step` of the stage named `stage`: key(seed) folded with the
    stage name's CRC-32, then with the step. Independent across stages and steps, and the same
    on resume; an algorithm splits it for the draws of one update."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode())), step)


def _run_stage(job: Job, stage: Stage, model, workdir: str, logger: Logger, stop: dict):
    """Train `stage` from `model` (or resume it from its newest usable checkpoint) to its last
    update; returns (the trained model, whether any update ran now). A stage whose checkpoints
    say it finished only restores its final parameters."""
    cfg, every_eval = stage.config.stage, job.config.eval.every
    ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints", stage.name),
                                        keep=job.config.checkpoint.keep,
                                        best_metric="val_greedy" if every_eval else None, notify=_say)
    try:
        graphdef, params = nnx.split(model)
        newest = next(iter(sorted(ckpts.manager.all_steps(), reverse=True)), None)
        if newest is not None and newest >= cfg.steps:
            finished = ckpts.restore_latest_params(params)
            if finished is not None and finished[1]["step"] >= cfg.steps:
                return nnx.merge(graphdef, finished[0]), False
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
                    val = evaluate_stage(job, learner.model(), workdir, f"{stage.name}-val-{step}",
                                         job.val_examples)
                    validation = {f"val_{k.replace('@', '_at_')}": v for k, v in val.items()}
                    logger.log(stage.name, step, validation)
                due = step % job.config.checkpoint.every == 0 or step == cfg.steps or stop["requested"]
                if due and not streak:  # during a non-finite streak the newest checkpoint stays the good one
                    ckpts.save(step, learner.model(), learner.state,
                               {"step": step, "skipped": skipped, "data": batches.state()},
                               metrics=validation, extras=learner.extras())
                if stop["requested"] and step < cfg.steps:
                    raise Preempted(f"stopped by a signal: saved {stage.name} step {step} in {workdir}; "
                                    "rerun to resume")
        return learner.model(), step > started
    finally:
        ckpts.close()


def _newest(ckpts: checkpoint.TrainCheckpoints) -> str:
    step = ckpts.latest_step()
    return f"step {step} in {ckpts.directory}" if step is not None else f"none (in {ckpts.directory})"


def _say(message: str) -> None:
    """A one-line notice on stderr (process 0), above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)


def _write_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


def results_table(results: dict[str, Any]) -> str:
    keys = sorted({k for r in results.values() for k in r})
    widths = [max(10, len(k) + 2) for k in keys]
    first = max(8, *(len(s) + 1 for s in results))
    lines = [f"{'stage':<{first}}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))]
    for stage, r in results.items():
        lines.append(f"{stage:<{first}}" + "".join(f"{r.get(k, float('nan')):>{w}.3f}" for k, w in zip(keys, widths)))
    return "\n".join(lines)
