"""The training job behind `python -m latro_jax.main`: build everything from the config (and
validate it) before the workdir is touched, then run the stages in order -- each one registered
algorithm (algorithms.ALGORITHMS) driven by one generic loop -- with periodic Orbax checkpoints
and exact resume, evaluate before and after each stage, log metrics (JSONL, TensorBoard,
progress bar), plot, and export the final model as an HF folder."""

from __future__ import annotations

import dataclasses
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
    fmt = PromptFormatter(tokenizer, eos_ids=_model_eos_ids(c))
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
    model = _model(c, mesh, len(tokenizer), fmt) if load_model else None
    return Job(c, raw_config, mesh, tokenizer, fmt, task, stages, eval_examples, val_examples, model)


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


def _model_eos_ids(c: JobConfig) -> tuple[int, ...]:
    """The end ids of the model folder (config.json and generation_config.json), read without
    loading weights; () for a model built from scratch (its EOS is the tokenizer's)."""
    if not c.model.path:
        return ()
    return models.read_config(models.hf_io.resolve_model_dir(c.model.path)).eos_token_id


def _model(c: JobConfig, mesh, vocab_size: int, fmt: PromptFormatter) -> models.Transformer:
    kw = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat, mesh=mesh)
    if c.model.path:
        return models.load_hf(c.model.path, **kw)
    init = dict(c.model.init)
    init.setdefault("vocab_size", vocab_size)
    try:
        config = models.ModelConfig(bos_token_id=fmt.tokenizer.bos_token_id, eos_token_id=(fmt.end_id,),
                                    pad_token_id=fmt.pad_id, **init)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model.init: {e}") from e
    return models.init_model(config, seed=c.seed, **kw)


def restore_final(job: Job, workdir: str) -> models.Transformer:
    """The latest checkpoint of the last stage, with the config's compute dtype, remat and mesh
    (parameters as stored): what --mode=eval and --mode=export work on."""
    m = job.config.model
    return checkpoint.restore_model(os.path.join(workdir, "checkpoints", job.stages[-1].name),
                                    dtype=m.dtype, remat=m.remat, mesh=job.mesh)


# ---------------------------------------------------------------- running
class Logger:
    """metrics.jsonl + TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


def train(job: Job, workdir: str) -> dict[str, Any]:
    """Run the stages; returns results {stage: {greedy, maj@k}} (also in results.json)."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        job.tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(job.raw_config.to_json_best_effort(indent=2))
    results_path = os.path.join(workdir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    stop = {"requested": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    logger = Logger(workdir)
    model = job.model
    try:
        if "init" not in results:
            results["init"] = evaluate_stage(job, model, workdir, "init")
            _write_json(results_path, results)
        for stage in job.stages:
            model = _run_stage(job, stage, model, workdir, logger, stop)
            if stage.name not in results:
                results[stage.name] = evaluate_stage(job, model, workdir, stage.name)
                _write_json(results_path, results)
        if job.config.export.hf:
            models.save_hf(model, os.path.join(workdir, "hf"),
                           tokenizer_dir=os.path.join(workdir, "tokenizer"), overwrite=True)
        if jax.process_index() == 0:
            from latro_jax.plots import plot_run
            plot_run(workdir, {s.name: s.algorithm.curves for s in job.stages})
    finally:
        logger.close()
        signal.signal(signal.SIGTERM, previous)
    return results


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
    """Train `stage` from `model` (or resume it from its latest checkpoint) to its last update;
    returns the trained model. A stage whose checkpoints say it finished only restores its
    final parameters."""
    cfg, every_eval = stage.config.stage, job.config.eval.every
    ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints", stage.name),
                                        keep=job.config.checkpoint.keep,
                                        best_metric="val_greedy" if every_eval else None)
    try:
        meta = ckpts.latest_meta()
        if meta is not None and meta["step"] >= cfg.steps:
            graphdef, params = nnx.split(model)
            return nnx.merge(graphdef, ckpts.restore_latest_params(params))
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
        with tqdm(total=cfg.steps, initial=step, desc=stage.name, disable=jax.process_index() != 0) as bar:
            while step < cfg.steps:
                examples = select(stage.examples, batches.next())
                metrics = learner.update(examples, rollout_key(job.config.seed, stage.name, step))
                step += 1
                skipped += int(metrics.get("skipped", 0))
                logger.log(stage.name, step, metrics)
                bar.update(1)
                postfix = {k: f"{metrics[k]:.3g}" for k in stage.algorithm.shown if k in metrics}
                bar.set_postfix({**postfix, **({"skipped": skipped} if skipped else {})})
                validation = None
                if every_eval and step % every_eval == 0:
                    val = evaluate_stage(job, learner.model(), workdir, f"{stage.name}-val-{step}",
                                         job.val_examples)
                    validation = {f"val_{k.replace('@', '_at_')}": v for k, v in val.items()}
                    logger.log(stage.name, step, validation)
                if step % job.config.checkpoint.every == 0 or step == cfg.steps or stop["requested"]:
                    ckpts.save(step, learner.model(), learner.state,
                               {"step": step, "skipped": skipped, "data": batches.state()},
                               metrics=validation, extras=learner.extras())
                if stop["requested"] and step < cfg.steps:
                    raise Preempted(f"SIGTERM: saved {stage.name} step {step} in {workdir}; rerun to resume")
        return learner.model()
    finally:
        ckpts.close()


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
