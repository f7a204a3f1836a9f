"""The job config (an ml_collections ConfigDict, configs/*.py) read into typed, validated
dataclasses. Reading is strict: a key that no section knows is an error naming the section and
the key, so a misspelled field never silently falls back to its default.

Sections: seed, stages, model, tokenizer, task, mesh, eval, checkpoint, export, and one section
per stage. A stage section holds the stage's own keys (StageSection: algorithm, steps,
batch_size, microbatches, logprob_chunk, sample_rows_per_call, optim) and its algorithm's config keys; `algorithm`
defaults to the section's name, so `stages = "sft,latro,latro2"` with
`latro2 = dict(algorithm="latro", ...)` runs two rounds of LaTRO.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from latro_jax import algorithms
from latro_jax.data.synthetic import SyntheticConfig
from latro_jax.data.tasks import TASKS
from latro_jax.evaluate import EvalConfig
from latro_jax.models.lora import LoRAConfig
from latro_jax.train import OptimConfig

TOKENIZER_BUILDS = ("", "char", "words")  # "": load tokenizer.path (default model.path)


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and the fix."""


def read(cls, values: Mapping[str, Any], where: str, **extra):
    """cls(**values) for a config dataclass, strictly: unknown keys are an error; fields whose
    type is a dataclass are read recursively from their sub-section; list values become tuples
    for tuple fields. Construction errors are re-raised as ConfigError naming `where`."""
    values = dict(values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"config.{where}: unknown key {unknown[0]!r}; the keys of this section "
                          f"are {sorted(names)}.")
    for name, value in values.items():
        kind = _dataclass_type(hints[name])
        if kind is not None and isinstance(value, Mapping):
            values[name] = read(kind, value, f"{where}.{name}")
        elif typing.get_origin(hints[name]) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    try:
        return cls(**values, **extra)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.{where}: {e}") from e


def _dataclass_type(hint) -> type | None:
    """The dataclass a field holds (also inside `X | None`), else None."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((o for o in options if dataclasses.is_dataclass(o)), None)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """path: HF folder or hub id (empty: build `init`, a dict of ModelConfig fields, from
    scratch); dtype: compute dtype; param_dtype: storage dtype; remat: none | full | dots;
    query_chunk: attention over that many query positions at a time (0: all at once), so the
    scores of a long row take chunk x length memory instead of length^2, for the same result;
    lora: LoRA adapters (models/lora.py: rank 0 = off, every weight trains; rank r > 0 = only
    adapters on lora.targets train, the base weights frozen and shared with the reference)."""

    path: str = ""
    init: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "full"
    query_chunk: int = 0
    lora: LoRAConfig = LoRAConfig()

    def __post_init__(self):
        if self.query_chunk < 0:
            raise ValueError(f"query_chunk={self.query_chunk} must be >= 0 (0: every query position at once)")


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    """path: tokenizer folder (default model.path); build: "" (load path), "char" or "words"
    (built in code, see data/task_tokenizers.py)."""

    path: str = ""
    build: str = ""

    def __post_init__(self):
        if self.build not in TOKENIZER_BUILDS:
            raise ValueError(f"build={self.build!r}: choose one of {TOKENIZER_BUILDS}")


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """name: gsm8k | arc_challenge | synthetic | math_boxed; source: local file/folder, hub id,
    or "synthetic" (generated from `synthetic`); eval_source: the evaluation data when it is
    another dataset (MATH-500 for a DeepScaleR-trained run); sft_examples: the first N training
    examples go to stages that train on gold rationales, the rest to stages that train on
    questions; prompt_width: the prompt columns of a stage's sampler calls (and of LaTRO's and
    the likelihood family's rows, whose text after the prompt is padded to the longest the
    stage can append): 0 = the stage's longest prompt, so a stage compiles its programs at its
    first update and never again; N > 0 = N, a batch with a longer prompt getting that
    prompt's bucket (a program for each new bucket: less padding where a few prompts are far
    longer than the rest); -1 = each batch's longest, bucketed."""

    name: str = "gsm8k"
    source: str = "../shared/data/gsm8k"
    eval_source: str = ""  # where eval_split (and val_split) come from; "" = source
    config_name: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    val_split: str = ""
    sft_examples: int = 7473
    synthetic: SyntheticConfig | None = None
    too_long: str = "refuse"  # examples longer than max_position_embeddings: refuse | drop
    prompt_width: int = 0

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"name={self.name!r}: unknown task; choose one of {sorted(TASKS)}")
        if self.too_long not in ("refuse", "drop"):
            raise ValueError(f"too_long={self.too_long!r}: choose 'refuse' or 'drop'")
        if self.prompt_width < -1:
            raise ValueError(f"prompt_width={self.prompt_width}: choose 0 (the stage's longest prompt), "
                             "N > 0 (N columns) or -1 (each batch's longest)")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Devices per mesh axis; one may be -1 (the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class EvalSection(EvalConfig):
    """EvalConfig (evaluate.py) plus: limit (first N evaluation examples, 0 = all) and every
    (validate on task.val_split every N updates, 0 = off; the best checkpoint by validation
    greedy accuracy is kept besides the last checkpoint.keep)."""

    limit: int = 0
    every: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 10
    keep: int = 3

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"every={self.every} and keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ExportSection:
    hf: bool = True  # write the final model to <workdir>/hf (LoRA adapters merged into their weights)
    peft: bool = False  # also write the LoRA adapters to <workdir>/peft, a folder PEFT loads on the base


@dataclasses.dataclass(frozen=True)
class StageSection:
    """The keys every stage has: its algorithm (registry name; default the section's name),
    updates, questions per update, micro-batches per update, positions per log-prob chunk, the
    rows one sampler program holds at most (0: every row of a call at once; fewer bound the KV
    cache's memory, in more calls, with the same samples; whole prompts, padded to 8 per call:
    a multiple of 8 x the samples per prompt wastes no row), and the optimizer (OptimConfig;
    total_steps is `steps`)."""

    algorithm: str = ""
    steps: int = 1
    batch_size: int = 1
    microbatches: int = 1
    logprob_chunk: int = 128
    sample_rows_per_call: int = 0
    optim: OptimConfig = OptimConfig()

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.microbatches < 1 or self.logprob_chunk < 1:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size}, microbatches="
                             f"{self.microbatches} and logprob_chunk={self.logprob_chunk} must be >= 1")
        if self.sample_rows_per_call < 0:
            raise ValueError(f"sample_rows_per_call={self.sample_rows_per_call} must be >= 0 "
                             "(0: every row of a sampler call at once)")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    name: str
    stage: StageSection
    algorithm: type  # the registered algorithm class
    config: Any  # its Config dataclass


@dataclasses.dataclass(frozen=True)
class JobConfig:
    seed: int
    stages: tuple[StageConfig, ...]
    model: ModelSection
    tokenizer: TokenizerSection
    task: TaskSection
    mesh: MeshSection
    eval: EvalSection
    checkpoint: CheckpointSection
    export: ExportSection


FIXED = {"model": ModelSection, "tokenizer": TokenizerSection, "task": TaskSection, "mesh": MeshSection,
         "eval": EvalSection, "checkpoint": CheckpointSection, "export": ExportSection}
STAGE_KEYS = {f.name for f in dataclasses.fields(StageSection)}


def parse(config) -> JobConfig:
    """The typed job config of a ConfigDict (or nested dict). Raises ConfigError."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    stage_names = tuple(s.strip() for s in str(c.get("stages", "")).split(",") if s.strip())
    if not stage_names:
        raise ConfigError(f"config.stages={c.get('stages')!r}: name at least one stage section, "
                          f"e.g. 'sft,latro' (algorithms: {sorted(algorithms.ALGORITHMS)}).")
    for key, value in c.items():
        if key in ("seed", "stages") or key in FIXED:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"config: unknown key {key!r}; the top-level keys are seed, stages, "
                              f"{', '.join(FIXED)} and stage sections.")
        if key not in stage_names and key not in algorithms.ALGORITHMS and "algorithm" not in value:
            raise ConfigError(f"config.{key}: a section that is neither a stage ({', '.join(stage_names)}) "
                              f"nor an algorithm ({', '.join(sorted(algorithms.ALGORITHMS))}); "
                              "remove it or add it to config.stages.")
        _stage(key, value, check_only=key not in stage_names)
    missing = [s for s in stage_names if s not in c]
    if missing:
        raise ConfigError(f"config.stages names {missing[0]!r}, which has no config section; add "
                          f"config.{missing[0]} = dict(algorithm=..., steps=..., ...).")
    fixed = {name: read(cls, c.get(name, {}), name) for name, cls in FIXED.items()}
    if fixed["export"].peft and not fixed["model"].lora.rank:
        raise ConfigError("config.export.peft=True writes LoRA adapters, but config.model.lora.rank is 0 "
                          "(no adapters); set model.lora.rank > 0 or export.peft=False.")
    return JobConfig(seed=int(c.get("seed", 0)), stages=tuple(_stage(s, c[s]) for s in stage_names), **fixed)


def _stage(name: str, section: Mapping[str, Any], check_only: bool = False) -> StageConfig | None:
    """A stage section split into its StageSection keys and its algorithm's config keys. With
    check_only (a section no stage runs), only the keys are checked."""
    algo_name = section.get("algorithm") or name
    if algo_name not in algorithms.ALGORITHMS:
        raise ConfigError(f"config.{name}.algorithm={algo_name!r}: unknown algorithm; registered: "
                          f"{sorted(algorithms.ALGORITHMS)}.")
    algorithm = algorithms.ALGORITHMS[algo_name]
    own = {k: v for k, v in section.items() if k in STAGE_KEYS}
    rest = {k: v for k, v in section.items() if k not in STAGE_KEYS}
    algo_keys = {f.name for f in dataclasses.fields(algorithm.Config)}
    unknown = sorted(set(rest) - algo_keys)
    if unknown:
        raise ConfigError(f"config.{name}: unknown key {unknown[0]!r}; a {algo_name} stage takes "
                          f"{sorted(STAGE_KEYS | algo_keys)}.")
    if check_only:
        return None
    optim = dict(own.pop("optim", {}))
    stage = read(StageSection, {**own, "algorithm": algo_name}, name)
    config = read(algorithm.Config, rest, name)
    steps_per_update = optimizer_steps_per_update(config)
    stage = dataclasses.replace(stage, optim=read(OptimConfig, optim, f"{name}.optim",
                                                  total_steps=stage.steps * steps_per_update))
    return StageConfig(name=name, stage=stage, algorithm=algorithm, config=config)


def minibatches(config) -> int:
    """Optimizer steps in one pass over an update's batch: the GRPO family's updates_per_rollout."""
    return getattr(getattr(config, "loss", None), "updates_per_rollout", 1)


def optimizer_steps_per_update(config) -> int:
    """ScoredBatch.epochs passes (MRT-STaR's epochs) of minibatches(config) steps each; the
    schedule counts steps x this."""
    return getattr(config, "epochs", 1) * minibatches(config)
