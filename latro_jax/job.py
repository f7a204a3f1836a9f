"""The training job built from its config: every check that needs no workdir (the config, the
mesh, data, tokenizer against model, lengths against max_position_embeddings, batches against
devices) runs here, before anything is written, each failure one ConfigError / FileNotFoundError
/ DataError naming the field and the fix.

    job = build(config)            # Job: mesh, tokenizer, formatter, task, stages, eval data, model
    model = restore_final(job, workdir)   # what --mode=eval / --mode=export work on
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
from tqdm.auto import tqdm

from latro_jax import checkpoint, models, run_dir, sharding
from latro_jax.algorithms import Algorithm, Context
from latro_jax.data import PromptFormatter, get_task, load_examples
from latro_jax.data.task_tokenizers import build_char_tokenizer, build_word_tokenizer
from latro_jax.evaluate import tokens_after_prompt
from latro_jax.job_config import ConfigError, JobConfig, StageConfig, minibatches, parse

__all__ = ["ConfigError", "Job", "Stage", "build", "restore_final"]


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
    lora_base: dict | None = None  # with LoRA: checkpoint.base_record of the frozen base weights


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
    tokenizer = load_tokenizer(c, train)
    model_dir = models.hf_io.resolve_model_dir(c.model.path) if c.model.path else None
    model_config = models.read_config(model_dir) if model_dir else None
    fmt = PromptFormatter(tokenizer, eos_ids=model_config.eos_token_id if model_config else ())
    model_config = model_config or init_model_config(c, len(tokenizer), fmt)
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
    stages = [_stage(s, c, train, Context.of_stage(task, fmt, mesh, s.stage))
              for s in c.stages]
    fits = _LengthCheck(fmt, model_config.max_position_embeddings, c.task.too_long)
    for stage in stages:
        stage.examples = fits(stage.examples, stage.algorithm.tokens_after_prompt, f"stage {stage.name}")
    evaluation = tokens_after_prompt(c.eval, task, fmt)
    eval_examples = fits(eval_examples, lambda e: evaluation, "evaluation")
    val_examples = fits(val_examples, lambda e: evaluation, "validation")
    for stage in stages:
        if len(stage.examples) < stage.config.stage.batch_size:
            raise ConfigError(f"config.{stage.name}.batch_size={stage.config.stage.batch_size} exceeds the "
                              f"{len(stage.examples)} training examples that fit the model.")
        longest = max(map(fits.prompt_tokens, stage.examples))
        stage.algorithm = stage.config.algorithm(stage.config.config, dataclasses.replace(
            stage.algorithm.ctx, prompt_width=prompt_width(c.task.prompt_width, longest),
            body_width=max(map(stage.algorithm.tokens_after_prompt, stage.examples))))
    model, base = _model(c, mesh, model_dir, model_config) if load_model else (None, None)
    return Job(c, raw_config, mesh, tokenizer, fmt, task, stages, eval_examples, val_examples, model, base)


def prompt_width(configured: int, longest: int) -> int:
    """The context's prompt_width for config.task.prompt_width and the stage's longest prompt:
    0 -> the longest, -1 -> 0 (each batch's own), N -> N."""
    return {0: longest, -1: 0}.get(configured, configured)


class _LengthCheck:
    """Examples whose prompt plus what a stage appends exceed max_position_embeddings: refused
    (naming the longest) or, with task.too_long = "drop", left out with a counted warning."""

    def __init__(self, fmt: PromptFormatter, limit: int, policy: str):
        self.fmt, self.limit, self.policy, self.prompts = fmt, limit, policy, {}

    def __call__(self, examples: list, after, where: str) -> list:
        needs = [(self.prompt_tokens(e) + after(e), e) for e in examples]
        over = [(n, e) for n, e in needs if n > self.limit]
        if not over:
            return examples
        n, worst = max(over, key=lambda x: x[0])
        if self.policy == "refuse":
            raise ConfigError(f"{len(over)} examples of the {where} need more positions than the model's "
                              f"max_position_embeddings = {self.limit}; the longest, {worst.id!r}, needs {n} "
                              f"(prompt {self.prompt_tokens(worst)} + {n - self.prompt_tokens(worst)}). Lower the "
                              "generation budget, or set config.task.too_long='drop' to leave them out.")
        say(f"warning: left out {len(over)} of {len(examples)} examples of the {where}: longer than "
             f"max_position_embeddings = {self.limit} (the longest needs {n})")
        return [e for m, e in needs if m <= self.limit]

    def prompt_tokens(self, example) -> int:
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
    parts = minibatches(s.config)
    if s.stage.batch_size % parts:
        raise ConfigError(f"config.{s.name}: batch_size={s.stage.batch_size} questions do not split into "
                          f"loss.updates_per_rollout={parts} mini-batches of whole groups; make batch_size a "
                          "multiple of it.")
    rows, shards = algorithm.rows(s.stage.batch_size) // parts, sharding.data_shards(ctx.mesh)
    if rows % (s.stage.microbatches * shards):
        raise ConfigError(f"config.{s.name}: a step of batch_size={s.stage.batch_size} has {rows} rows"
                          f"{f' per mini-batch' if parts > 1 else ''}, not divisible by microbatches "
                          f"({s.stage.microbatches}) x data-parallel devices ({shards}); change "
                          f"{s.name}.batch_size or the mesh.")
    return Stage(s, algorithm, examples)


def load_tokenizer(c: JobConfig, train: list):
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


def init_model_config(c: JobConfig, vocab_size: int, fmt: PromptFormatter) -> models.ModelConfig:
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


def _model(c: JobConfig, mesh, model_dir: str | None, config: models.ModelConfig):
    """(the initial model, the record of its base weights when config.model.lora adds adapters)."""
    kw = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat, mesh=mesh)
    model = models.load_hf(model_dir, **kw) if model_dir else models.init_model(config, seed=c.seed, **kw)
    model.set_query_chunk(c.model.query_chunk)
    if not c.model.lora.rank:
        return model, None
    base = checkpoint.base_record(model, path=os.path.abspath(model_dir) if model_dir else "", seed=c.seed)
    models.lora.attach(model, c.model.lora, seed=c.seed)
    return model, base


def restore_final(job: Job, workdir: str) -> models.Transformer:
    """The latest checkpoint of the last stage, with the config's compute dtype, remat and mesh
    (parameters as stored): what --mode=eval and --mode=export work on. The job's tokenizer must
    be the one the run trained with (<workdir>/tokenizer) and fit the model."""
    run_dir.check_tokenizer(job.tokenizer, workdir, "the config's tokenizer",
                            "drop the --config.tokenizer overrides so that the run's own is used.")
    m, directory = job.config.model, os.path.join(workdir, "checkpoints", job.stages[-1].name)
    model = checkpoint.restore_model(directory, dtype=m.dtype, remat=m.remat, mesh=job.mesh)
    model.set_query_chunk(m.query_chunk)
    problem = job.fmt.vocabulary_problem(model.config.vocab_size, directory)
    if problem:
        raise ConfigError(problem)
    return model


def say(message: str) -> None:
    """A one-line notice on stderr (process 0), above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)
