"""The training job behind `python -m latro_jax.main`: build everything from the config (and
validate it) before the workdir is touched, then run the stages (sft, latro) with periodic Orbax
checkpoints and exact resume, evaluate before and after each stage, log metrics (JSONL,
TensorBoard, progress bar), plot, and export the final model as an HF folder."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from latro_jax import checkpoint, models, sharding
from latro_jax.algorithms.latro import LatroConfig, LatroTrainer, Stops
from latro_jax.algorithms.sft import SftTrainer
from latro_jax.data import BatchIterator, PromptFormatter, get_task, load_examples, select
from latro_jax.data.task_tokenizers import build_char_tokenizer, build_word_tokenizer
from latro_jax.evaluate import EvalConfig, evaluate
from latro_jax.train import OptimConfig

STAGES = ("sft", "latro")
TOKENIZER_BUILDS = ("", "char", "words")  # "": load config.tokenizer.path


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and the fix."""


def _dataclass(cls, section, name: str, **extra):
    """Build a config dataclass from a ConfigDict section, naming the section on errors."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(section).items() if k in fields}
    try:
        return cls(**values, **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{name}: {e}") from e


@dataclasses.dataclass
class Job:
    """Everything a run needs, built and validated from the config."""

    config: Any
    mesh: jax.sharding.Mesh
    tokenizer: Any
    fmt: PromptFormatter
    task: Any
    train: list
    sft_examples: list
    latro_examples: list
    eval_examples: list
    val_examples: list
    model: models.Transformer
    stages: tuple[str, ...]
    optims: dict[str, OptimConfig]
    latro: LatroConfig
    eval: EvalConfig


def build(config) -> Job:
    """Validate the config and build the job; raises ConfigError / FileNotFoundError /
    DataError with one clear message. Writes nothing."""
    c = config
    stages = tuple(s.strip() for s in c.stages.split(",") if s.strip())
    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"config.stages={c.stages!r}: a comma list of {STAGES}")
    try:
        mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from e
    shards = sharding.data_shards(mesh)
    latro = _dataclass(LatroConfig, c.latro, "latro")
    rows = c.latro.batch_size * latro.num_samples
    if "latro" in stages and rows % (latro.microbatches * shards):
        raise ConfigError(f"config.latro: batch_size x num_samples = {rows} rationales is not divisible "
                          f"by microbatches ({latro.microbatches}) x data-parallel devices ({shards}); "
                          "change latro.batch_size or the mesh.")
    if "sft" in stages and c.sft.batch_size % (c.sft.microbatches * shards):
        raise ConfigError(f"config.sft: batch_size={c.sft.batch_size} is not divisible by microbatches "
                          f"({c.sft.microbatches}) x data-parallel devices ({shards}).")
    optims = {stage: _dataclass(OptimConfig, c[stage].optim, f"{stage}.optim", total_steps=c[stage].steps)
              for stage in stages}
    eval_cfg = _dataclass(EvalConfig, c.eval, "eval")
    if c.tokenizer.build not in TOKENIZER_BUILDS:
        raise ConfigError(f"config.tokenizer.build={c.tokenizer.build!r}: choose one of {TOKENIZER_BUILDS}")

    task = get_task(c.task.name)
    synthetic = c.task.synthetic.to_dict() if "synthetic" in c.task else None
    load = functools.partial(load_examples, task, c.task.source, synthetic=synthetic,
                             config_name=c.task.config_name or None)
    train = load(c.task.train_split)
    tokenizer = _tokenizer(c, train)
    fmt = PromptFormatter(tokenizer)
    eval_examples = load(c.task.eval_split, limit=c.eval.limit or None)
    val_examples = []
    if c.eval.every:
        if not c.task.val_split or c.task.val_split == c.task.eval_split:
            raise ConfigError("config.eval.every > 0 needs config.task.val_split, a validation split "
                              "other than the evaluation split (the best checkpoint is never chosen on test).")
        val_examples = load(c.task.val_split, limit=c.eval.limit or None)
    n_sft = c.task.sft_examples if "sft" in stages else 0
    sft_examples, latro_examples = train[:n_sft], train[n_sft:]
    if "sft" in stages and (not sft_examples or any(e.rationale is None for e in sft_examples)):
        raise ConfigError("config.task.sft_examples: the SFT stage needs training examples with "
                          "gold rationales (and sft_examples >= 1).")
    if "latro" in stages and len(latro_examples) < c.latro.batch_size:
        raise ConfigError(f"config.latro.batch_size={c.latro.batch_size} exceeds the "
                          f"{len(latro_examples)} training questions left for LaTRO.")
    model = _model(c, mesh, len(tokenizer), fmt)
    return Job(c, mesh, tokenizer, fmt, task, train, sft_examples, latro_examples, eval_examples,
               val_examples, model, stages, optims, latro, eval_cfg)


def _tokenizer(c, train: list):
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


def _model(c, mesh, vocab_size: int, fmt: PromptFormatter) -> models.Transformer:
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
            f.write(job.config.to_json_best_effort(indent=2))
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
            if stage not in results:
                results[stage] = evaluate_stage(job, model, workdir, stage)
                _write_json(results_path, results)
        if job.config.export.hf:
            models.save_hf(model, os.path.join(workdir, "hf"),
                           tokenizer_dir=os.path.join(workdir, "tokenizer"), overwrite=True)
        if jax.process_index() == 0:
            from latro_jax.plots import plot_run
            plot_run(workdir)
    finally:
        logger.close()
        signal.signal(signal.SIGTERM, previous)
    return results


def evaluate_stage(job: Job, model, workdir: str, name: str, examples=None) -> dict[str, float]:
    """Greedy and maj@k accuracy of `model` on the evaluation split (or `examples`), with the
    per-example records in workdir/eval/<name>."""
    summary = evaluate(model, job.task, job.eval_examples if examples is None else examples,
                       job.fmt, job.eval, mesh=job.mesh, out_dir=os.path.join(workdir, "eval", name),
                       desc=f"eval {name}", progress=jax.process_index() == 0)
    return {k: v for k, v in summary.items() if k in ("greedy", f"maj@{job.eval.maj_k}")}


def _run_stage(job: Job, stage: str, model, workdir: str, logger: Logger, stop: dict):
    c, optim = job.config[stage], job.optims[stage]
    if stage == "sft":
        trainer = SftTrainer(model, optim, microbatches=c.microbatches, pad_id=job.fmt.pad_id, mesh=job.mesh)
        examples = job.sft_examples
    else:
        trainer = LatroTrainer(model, job.latro, optim, Stops(job.fmt.stop_ids, job.fmt.stop_phrases),
                               pad_id=job.fmt.pad_id, mesh=job.mesh, seed=job.config.seed)
        examples = job.latro_examples
    inner = trainer.trainer
    batches = BatchIterator(len(examples), c.batch_size, seed=job.config.seed)
    every_eval = job.config.eval.every
    ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints", stage),
                                        keep=job.config.checkpoint.keep,
                                        best_metric="val_greedy" if every_eval else None)
    step = 0
    latest = ckpts.latest_step()
    if latest is not None:
        params, opt_state, meta = ckpts.restore(latest, inner.state.params, inner.state.opt_state)
        inner.load_state(params, opt_state, meta["step"])
        batches.restore(meta["data"])
        step = meta["step"]
    bar = tqdm(total=c.steps, initial=step, desc=stage, disable=jax.process_index() != 0)
    try:
        while step < c.steps:
            batch = select(examples, batches.next())
            prompts = [job.fmt.prompt_ids(e.question) for e in batch]
            if stage == "sft":
                metrics = trainer.update(prompts, [job.fmt.completion_ids(e.rationale) for e in batch])
            else:
                metrics = trainer.update(prompts, [job.fmt.answer_ids(e.answer) for e in batch],
                                         [job.fmt.completion_ids(e.answer) for e in batch])
            step += 1
            logger.log(stage, step, metrics)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in _SHOWN[stage] if k in metrics})
            validation = None
            if every_eval and step % every_eval == 0:
                val = evaluate_stage(job, inner.model(), workdir, f"{stage}-val-{step}", job.val_examples)
                validation = {f"val_{k.replace('@', '_at_')}": v for k, v in val.items()}
                logger.log(stage, step, validation)
            if step % job.config.checkpoint.every == 0 or step == c.steps or stop["requested"]:
                ckpts.save(step, inner.model(), inner.state.opt_state,
                           {"step": step, "data": batches.state()}, metrics=validation)
            if stop["requested"] and step < c.steps:
                raise Preempted(f"SIGTERM: saved {stage} step {step} in {workdir}; rerun to resume")
    finally:
        bar.close()
        ckpts.close()
    return inner.model()


_SHOWN = {"sft": ("loss", "grad_norm"),
          "latro": ("reward", "answer_logp", "kl", "finished", "sample_tokens_per_s")}


def _write_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


def results_table(results: dict[str, Any]) -> str:
    keys = sorted({k for r in results.values() for k in r})
    lines = [f"{'stage':<8}" + "".join(f"{k:>10}" for k in keys)]
    for stage, r in results.items():
        lines.append(f"{stage:<8}" + "".join(f"{r.get(k, float('nan')):>10.3f}" for k in keys))
    return "\n".join(lines)
