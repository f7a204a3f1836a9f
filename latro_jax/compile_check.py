r"""Compile one training update of a recipe for a TPU topology, on a machine without a TPU.

    pip install "jax[tpu]==0.10.2"      # libtpu: the TPU compiler (no TPU needed)
    python -m latro_jax.compile_check --config=configs/latro_gsm8k_phi35.py --topology=v5e:2x4
    python -m latro_jax.compile_check --config=configs/latro_gsm8k_mistral7b.py --topology=v4:2x2x1 \
        --config.mesh.fsdp=4 --json=checks.jsonl

The job is built from the config as training builds it (the mesh over the topology's devices,
the parameters' shardings, dtypes, remat, micro-batches, the algorithm's own config), with
abstract parameters (no weights: the model's config.json is enough; `--model_config`, else
config.model.path when it is a folder holding one, else configs/models/<its last part>/). Each
stage's algorithm describes one update as shapes (`plan`, latro_jax/update_plan.py), at the worst
case its config allows (every completion as long as its budget), and every program of it is
compiled for the topology: each sampler call (the whole generate program; its prefill and one
decode step alone, for the time estimate), each scoring pass and the optimizer step (micro-batch
accumulation and the AdamW update). Per program it prints the bytes per chip XLA reserves
(arguments, outputs, temporaries; total against the chip's HBM), FLOPs and bytes accessed per
chip, the collectives in the compiled HLO and the compile time; per update a roofline estimate.

Roofline: a program takes max(FLOPs / peak, bytes accessed / HBM bandwidth) per chip (CHIPS:
the public per-chip figures); XLA's cost analysis counts a loop's body once, so an update =
prefill + new_tokens x decode step per sampler call, micro-batches x the step program per
optimizer step (which counts the AdamW update once per micro-batch: an over-estimate of a few
percent), micro-batches x each scoring pass. No collective time is modelled: the collectives are
listed instead. Prompt, answer and gold-rationale lengths are assumptions (flags), not data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

if __name__ == "__main__":  # before jax starts a backend
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are abstract; nothing runs on them
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: checks may run side by side

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from latro_jax import models, sampling, sharding  # noqa: E402
from latro_jax.models.transformer import KVCache  # noqa: E402
from latro_jax.update_plan import Generation, Lengths, Scoring  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_CONFIGS = os.path.join(os.path.dirname(HERE), "configs", "models")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures: HBM bytes, bf16 peak FLOP/s, HBM bandwidth bytes/s."""

    hbm: float
    peak: float
    bandwidth: float


CHIPS = {"v4": Chip(32e9, 275e12, 1.2e12), "v5e": Chip(16e9, 197e12, 8.19e11),
         "v5p": Chip(95e9, 459e12, 2.765e12), "v6e": Chip(32e9, 918e12, 1.64e12)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


MEGACORE = ("v4", "v5p")  # two cores per chip that jax drives as one device, as on the real hosts


class CheckError(Exception):
    """A problem with the check's input (topology, model config, mesh), with the fix."""


@dataclasses.dataclass
class Program:
    """One compiled program's figures, per chip (bytes, FLOPs) and per call (`calls` per update,
    `repeat` times its cost per call in the roofline: decode steps, micro-batches)."""

    stage: str
    name: str
    shapes: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, list[int]]  # kind -> [count, bytes]
    compile_s: float
    calls: int = 1
    repeat: int = 1
    timed: bool = True  # counted in the roofline (the whole generate program is not: its parts are)
    part: bool = False  # a part of generate compiled alone for the roofline: the job never runs it
    refused: str = ""  # XLA's message when it refused the program for lack of HBM

    @property
    def total_bytes(self) -> int:
        """What the program holds at once: arguments + outputs + temporaries, less the outputs
        that reuse donated arguments' buffers."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def seconds(self, chip: Chip) -> float:
        return max(self.flops / chip.peak, self.bytes_accessed / chip.bandwidth)


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The abstract devices of a TPU topology ("v5e:2x4", "v4:2x2x1", ...), from libtpu."""
    from jax.experimental import topologies
    try:
        megacore = {"chip_config_name": "megacore"} if name.split(":")[0] in MEGACORE else {}
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices, **megacore)
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise CheckError(f"--topology={name}: no TPU topology ({type(e).__name__}: {str(e).splitlines()[0]}). "
                         'The TPU compiler comes with libtpu: pip install "jax[tpu]==0.10.2"; topologies are '
                         "named <chip>:<shape>, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x2.") from e
    return list(topology.devices)


def chip_of(topology: str) -> Chip:
    kind = topology.split(":")[0]
    if kind not in CHIPS:
        raise CheckError(f"--topology={topology}: no chip figures for {kind!r} (known: {sorted(CHIPS)})")
    return CHIPS[kind]


def model_config(raw_config, path: str = "") -> models.ModelConfig:
    """The model's config: `path` (a folder with config.json, or the file), else config.model.path
    when it is a local folder with one, else configs/models/<its last part>/; a model built from
    scratch (config.model.init) needs none."""
    from latro_jax.job_config import parse
    c = parse(raw_config)
    shipped = os.path.join(MODEL_CONFIGS, os.path.basename(c.model.path.rstrip("/")))
    candidates = [path] if path else [c.model.path, shipped]
    for candidate in candidates:
        folder = os.path.dirname(candidate) if candidate.endswith(".json") else candidate
        if candidate and os.path.isfile(os.path.join(folder, "config.json")):
            return models.read_config(folder)
    raise CheckError(f"no config.json for config.model.path={c.model.path!r} (looked in {candidates}); pass "
                     "--model_config=<folder with the model's config.json>")


def check(raw_config, topology: str, *, num_slices: int = 1, model_config_path: str = "",
          lengths: Lengths = Lengths(256), tokenizer: str = "", say=print) -> list[tuple[list[Program], StageReport]]:
    """Compile every program of one update of each stage of `raw_config` for `topology`: per
    stage its programs and its report."""
    from latro_jax import job as jobs
    from latro_jax.algorithms import Context
    from latro_jax.algorithms.core import frozen_dtype
    from latro_jax.data import PromptFormatter, get_task
    from latro_jax.job_config import ConfigError, parse
    c = parse(raw_config)
    devices = topology_devices(topology, num_slices)
    try:
        mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    except ValueError as e:
        raise CheckError(f"config.mesh on {topology} ({len(devices)} devices): {e}; e.g. "
                         f"--config.mesh.fsdp={len(devices)}") from e
    init = not c.model.path
    if init:
        train = []
        if c.tokenizer.build == "words":
            synthetic = dataclasses.asdict(c.task.synthetic) if c.task.synthetic else None
            from latro_jax.data import load_examples
            train = load_examples(get_task(c.task.name), c.task.source, c.task.train_split, synthetic=synthetic)
        tok = jobs.load_tokenizer(c, train)
        fmt = PromptFormatter(tok)
        config = jobs.init_model_config(c, len(tok), fmt)
    else:
        config = model_config(raw_config, model_config_path)
        try:
            tok = jobs.load_tokenizer(dataclasses.replace(c, tokenizer=dataclasses.replace(
                c.tokenizer, path=tokenizer or c.tokenizer.path)), [])
        except (ConfigError, FileNotFoundError) as e:
            raise CheckError(f"{e}\nAny tokenizer serves the check (its stop ids and suffixes): "
                             "--tokenizer=<a local tokenizer folder>, e.g. ../shared/tokenizers/phi-3-mini") from e
        fmt = PromptFormatter(tok, eos_ids=config.eos_token_id)
    chip, results = chip_of(topology), []
    for s in c.stages:
        ctx = Context.of_stage(get_task(c.task.name), fmt, mesh, s.stage)
        # as the job pads its sampler calls' prompts, the stage's longest prompt being lengths.prompt
        ctx = dataclasses.replace(ctx, prompt_width=jobs.prompt_width(c.task.prompt_width, lengths.prompt))
        algorithm = s.algorithm(s.config, ctx)
        if not hasattr(algorithm, "plan"):
            raise CheckError(f"stage {s.name}: algorithm {algorithm.name!r} describes no update as shapes "
                             "(its class has no plan(); see latro_jax/update_plan.py)")
        plan = algorithm.plan(s.stage.batch_size, lengths, config)
        plan = dataclasses.replace(plan, generations=tuple(g.in_calls_of(ctx.sample_rows_per_call)
                                                           for g in plan.generations))
        build = lambda cfg, chunk, say, unroll=1: _stage_programs(
            s, plan, _abstract(cfg, c.model, mesh, unroll), cfg, c.model.dtype, fmt,
            dataclasses.replace(ctx, logprob_chunk=chunk), say)
        programs, params, trainer = build(config, s.stage.logprob_chunk, say)
        # XLA counts a loop's body once: the costs of 1- and 2-layer models, their layers
        # unrolled and their log-prob chunk loops run once, extrapolated to the model's layers
        # (every program is affine in them)
        widest = max([plan.batch["tokens"].shape[1], *(p.width for p in plan.scoring)])
        small = [build(dataclasses.replace(config, num_layers=n), widest, lambda _: None, n)[0] for n in (1, 2)]
        for p, one, two in zip(programs, *small):
            p.flops = one.flops + (config.num_layers - 1) * (two.flops - one.flops)
            p.bytes_accessed = one.bytes_accessed + (config.num_layers - 1) * (two.bytes_accessed - one.bytes_accessed)
        refresh = algorithm.old_policy_refresh
        copies = int(algorithm.needs_reference) + int(refresh is not None
                                                       and (refresh > 0 or not algorithm.needs_reference))
        total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
        even = total / (c.mesh.fsdp * c.mesh.tensor)
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype(x.dtype, c.model.dtype),
                                                             sharding=x.sharding), params)
        state = TrainState(per_chip_bytes(params), per_chip_bytes(trainer.state.opt_state), copies,
                           per_chip_bytes(frozen), even)
        results.append((programs, stage_report(s.name, programs, chip, state)))
    return results


def _abstract(config: models.ModelConfig, model_section, mesh, unroll: int = 1):
    """(graphdef, abstract parameters with their shardings on the mesh) of the model, with the
    section's query chunk, its layer scan unrolled as `unroll` says."""
    graphdef, abstract = models.abstract_model(config, dtype=model_section.dtype,
                                               param_dtype=model_section.param_dtype, remat=model_section.remat)
    model = nnx.merge(graphdef, abstract)
    model.scan_unroll = unroll
    model.set_query_chunk(model_section.query_chunk)
    model.shard_batch(mesh)
    graphdef, abstract = nnx.split(model)
    shardings = sharding.param_shardings(abstract, mesh)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _stage_programs(s, plan, model, config, dtype, fmt, ctx, say):
    """(programs, parameters, abstract trainer) of one update of stage `s` for the model
    (graphdef, parameters) of `config`, its algorithm bound to `ctx`."""
    graphdef, params = model
    algorithm = s.algorithm(s.config, ctx)
    programs = []
    for g in plan.generations:
        programs += _generation(s.name, g, graphdef, config, dtype, params, fmt, ctx.mesh, say)
    for pass_ in plan.scoring:
        programs.append(_scoring(s.name, pass_, graphdef, config, params, ctx, say))
    step, trainer = _step(s.name, plan, algorithm, graphdef, params, s.stage, ctx.mesh, say)
    return programs + [step], params, trainer


def _spec(shape, dtype, mesh, *, batch_axis: int | None = 0) -> jax.ShapeDtypeStruct:
    """An abstract array on the mesh: its `batch_axis` split over the data axes, else replicated."""
    spec = [None] * len(shape)
    if batch_axis is not None:
        spec[batch_axis] = sharding.BATCH_AXES
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, P(*spec)))


def _compile(stage: str, name: str, shapes: str, lowered, say, **extra) -> Program:
    """The program compiled for the topology; one that XLA refuses for lack of HBM is reported
    with the temporaries XLA said it needs (and no cost figures)."""
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        needed = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
            raise
        seconds = time.perf_counter() - started
        say(f"  {stage}/{name} {shapes}: does not fit ({str(e).splitlines()[0][:200]})")
        temp = int(float(needed.group(1)) * 2 ** (10 * " KMGT".index(needed.group(2))))
        return Program(stage, name, shapes, 0, 0, temp, 0, math.nan, math.nan, {},
                       seconds, refused=str(e).splitlines()[0], **extra)
    seconds = time.perf_counter() - started
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program = Program(stage, name, shapes, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                      memory.temp_size_in_bytes, memory.alias_size_in_bytes, float(cost.get("flops", 0.0)),
                      float(cost.get("bytes accessed", 0.0)), collectives(compiled.as_text()), seconds, **extra)
    say(f"  compiled {stage}/{name} {shapes} in {seconds:.1f} s")
    return program


def collectives(hlo: str) -> dict[str, list[int]]:
    """kind -> [count, bytes of their results] of the collective ops in compiled HLO text (an op
    inside a loop counts once)."""
    found: dict[str, list[int]] = {}
    pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m or "-done" in line.split("=")[1][:40]:
            continue
        size = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                   for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
        entry = found.setdefault(m.group(2), [0, 0])
        entry[0] += 1
        entry[1] += size
    return found


def _generation(stage: str, g: Generation, graphdef, config, dtype, params, fmt, mesh, say) -> list[Program]:
    """The sampler's generate program for one call (as sampling.generate runs it), and its
    prefill and one decode step alone for the roofline."""
    n = sampling.round_up(g.prompts, int(np.lcm(sampling.BATCH_MULTIPLE, sharding.data_shards(mesh))))
    gen_bucket, rows = sampling.bucket(g.new_tokens), n * g.samples
    size = g.width + gen_bucket + g.reserve
    stops = sampling._stop_matrix(fmt.stops)
    cache_dt = sampling.cache_dtype(dtype, mesh)
    prompts, valid = _spec((n, g.width), np.int32, mesh), _spec((n, g.width), bool, mesh)
    scalar = lambda dtype: _spec((), dtype, mesh, batch_axis=None)
    lowered = sampling._generate_core.lower(
        graphdef, params, prompts, valid, _spec((rows,), np.int32, mesh), _spec((rows,), bool, mesh),
        _spec(stops.shape, np.int32, mesh, batch_axis=None), scalar(np.int32),
        _spec((2,), np.uint32, mesh, batch_axis=None), scalar(np.int32), num_samples=g.samples,
        gen_bucket=gen_bucket, params=g.sampling, pad_id=0, progress=False, reserve=g.reserve, cache_dt=cache_dt)
    shapes = f"{g.prompts} prompts of {g.width} x {g.samples} samples, +{g.new_tokens}"
    prefill = jax.jit(_prefill, static_argnames=("graphdef", "size", "cache_dt")).lower(
        graphdef, params, prompts, valid, size=size, cache_dt=cache_dt)
    cache = jax.tree.map(lambda x, batched: _spec(x.shape, x.dtype, mesh, batch_axis=0 if batched else None),
                         jax.eval_shape(lambda: KVCache.zeros(config, rows, size, cache_dt)),
                         KVCache(k=(True,) * config.num_layers, v=(True,) * config.num_layers, valid=True,
                                 lengths=True, index=False))
    # the cache donated, as generate's loop updates it in place: its bytes count once, not in and out
    decode = jax.jit(_decode, static_argnames=("graphdef",), donate_argnames=("cache",)).lower(
        graphdef, params, _spec((rows,), np.int32, mesh), cache)
    return [_compile(stage, f"generate:{g.name}", shapes, lowered, say, calls=g.calls, timed=False),
            _compile(stage, f"prefill:{g.name}", f"{n} prompts of {g.width}", prefill, say, calls=g.calls, part=True),
            _compile(stage, f"decode:{g.name}", f"{rows} rows, cache of {size}", decode, say, calls=g.calls,
                     repeat=g.new_tokens, part=True)]


def _prefill(graphdef, params, prompts, valid, *, size: int, cache_dt: str):
    """The sampler's prompt pass into an empty cache of `size` slots and its last logits."""
    model = nnx.merge(graphdef, params)
    cache = KVCache.zeros(model.config, prompts.shape[0], size, dtype=cache_dt)
    hidden, cache = model.hidden_states(prompts, valid=valid, cache=cache, layers=model.unstack_layers())
    return model.logits(hidden[:, -1]), cache


def _decode(graphdef, params, token, cache):
    """One decode step of the sampler: a token per row through the cache, its logits."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model.hidden_states(token[:, None], cache=cache, layers=model.unstack_layers())
    return model.logits(hidden[:, 0]), cache


def _scoring(stage: str, s: Scoring, graphdef, config, params, ctx, say) -> Program:
    """One micro-batch of a scoring pass (the Scorer's program), `microbatches` per call."""
    from latro_jax.scoring import Scorer
    scorer = Scorer(graphdef, config, microbatches=ctx.microbatches, mesh=ctx.mesh, chunk_size=ctx.logprob_chunk)
    rows = s.rows // ctx.microbatches
    row = lambda dtype: _spec((rows, s.width), dtype, ctx.mesh)
    if s.masks:
        lowered = scorer._spans.lower(params, row(np.int32), row(bool), tuple(row(np.float32) for _ in s.masks),
                                      temperature=float(s.temperature), shared_prefix=s.shared_prefix)
    else:
        lowered = scorer._tokens.lower(params, row(np.int32), row(bool), temperature=float(s.temperature),
                                       shared_prefix=s.shared_prefix)
    return _compile(stage, f"score:{s.name}", f"{rows} rows of {s.width}", lowered, say, calls=s.calls,
                    repeat=ctx.microbatches)


def _step(stage: str, plan, algorithm, graphdef, params, stage_config, mesh, say):
    """The optimizer step (micro-batch accumulation, AdamW) on the plan's rows, and its
    abstract trainer."""
    from latro_jax.train import Trainer
    mb = stage_config.microbatches
    trainer = Trainer.abstract(graphdef, params, stage_config.optim, algorithm.loss, microbatches=mb, mesh=mesh)
    batch = {k: jax.ShapeDtypeStruct((mb, v.shape[0] // mb, *v.shape[1:]), v.dtype,
                                     sharding=NamedSharding(mesh, P(None, sharding.BATCH_AXES,
                                                                    *([None] * (v.ndim - 1)))))
             for k, v in plan.batch.items()}
    scalars = {k: _spec((), np.float32, mesh, batch_axis=None) for k in plan.scalars}
    rows, width = plan.batch["tokens"].shape
    lowered = trainer.step_program(batch, scalars, plan.layout)
    return _compile(stage, "step", f"{mb} x {rows // mb} rows of {width}", lowered, say, calls=plan.steps,
                    repeat=mb), trainer


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of abstract arrays with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Bytes per chip of what stays in HBM across a stage's programs: one parameter copy, the
    optimizer state, and `copies` frozen copies (the reference, pi_old; `copy` bytes each, in
    the compute dtype: core.frozen_copy); `even`, the parameters' total bytes / (fsdp x
    tensor), what one copy takes when every array is split."""

    params: int
    optimizer: int
    copies: int
    copy: int
    even: float

    def besides(self, program: "Program") -> int:
        """What stays resident while `program` runs and is not among its arguments: a step takes
        the parameters and the optimizer state, a sampler or scorer one parameter copy. XLA gives
        a refused program's temporaries only: its arguments count as that state (a lower bound)."""
        step = program.name == "step"
        resident = self.copies * self.copy + (0 if step else self.optimizer)
        return resident + (self.params + (self.optimizer if step else 0) if program.refused else 0)


@dataclasses.dataclass
class StageReport:
    """One stage's update on a topology: the peak bytes per chip (a program's own and the train
    state it does not take), the parameters' bytes per chip against an even split, the roofline
    update time, FLOPs per chip and the collective moving the most bytes."""

    stage: str
    peak_bytes: int
    peak_program: str
    hbm: float
    state: TrainState
    update_s: float
    flops: float
    dominant_collective: str

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm


def stage_report(stage: str, programs: list[Program], chip: Chip, state: TrainState) -> StageReport:
    footprint = lambda p: p.total_bytes + state.besides(p)
    peak = max((p for p in programs if not p.part), key=footprint)
    timed = [p for p in programs if p.timed]
    moved: dict[str, float] = {}
    for p in timed:
        for kind, (_, size) in p.collectives.items():
            moved[kind] = moved.get(kind, 0.0) + size * p.calls * p.repeat
    dominant = max(moved, key=moved.get) if moved else None
    return StageReport(stage, footprint(peak), peak.name, chip.hbm, state,
                       sum(p.calls * p.repeat * p.seconds(chip) for p in timed),
                       sum(p.calls * p.repeat * p.flops for p in timed),
                       f"{dominant} {moved[dominant] / 1e9:.1f} GB" if dominant else "none")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def report_lines(topology: str, results) -> list[str]:
    """The programs' table and each stage's summary, as printed."""
    chip = chip_of(topology)
    lines = [f"topology {topology}: per chip {chip.hbm / 1e9:.0f} GB HBM, {chip.peak / 1e12:.0f} TFLOP/s bf16, "
             f"{chip.bandwidth / 1e9:.0f} GB/s (latro_jax/compile_check.py:CHIPS)",
             f"{'program':<28} {'shapes':<44} {'GB/chip':>8} {'(args':>6} {'out':>6} {'temp)':>6} "
             f"{'GFLOP':>9} {'GB read':>8} {'x calls':>8} {'compile':>8}  collectives"]
    for programs, report in results:
        for p in programs:
            coll = ", ".join(f"{k} x{n} ({size / 1e6:.0f} MB)" for k, (n, size) in sorted(p.collectives.items()))
            lines.append(f"{p.stage + '/' + p.name:<28} {p.shapes:<44} {_gb(p.total_bytes):>8} "
                         f"{_gb(p.argument_bytes):>6} {_gb(p.output_bytes):>6} {_gb(p.temp_bytes):>6} "
                         f"{p.flops / 1e9:>9.1f} {_gb(p.bytes_accessed):>8} {p.calls * p.repeat:>8} "
                         f"{p.compile_s:>7.1f}s  {'REFUSED: out of HBM' if p.refused else coll or 'none'}")
        r, st = report, report.state
        at_least = ">= " if any(p.refused and p.name == r.peak_program for p in programs) else ""
        roofline = (f"{r.update_s:.1f} s ({r.flops / 1e12:.1f} TFLOP per chip)" if math.isfinite(r.update_s)
                    else "unknown (a refused program has no cost figures)")
        lines.append(
            f"== {r.stage}: {'FITS' if r.fits else 'DOES NOT FIT'}: peak {at_least}{_gb(r.peak_bytes)} GB per chip of "
            f"{r.hbm / 1e9:.0f} ({r.peak_program}; parameters {_gb(st.params)} GB and {st.copies} frozen "
            f"copies of {_gb(st.copy)}, "
            f"optimizer {_gb(st.optimizer)} GB); parameters per chip {_gb(st.params)} GB against "
            f"{_gb(st.even)} GB split evenly; roofline update {roofline}; dominant collective "
            f"{r.dominant_collective}")
    return lines


def json_records(config_name: str, topology: str, results) -> list[dict]:
    records = []
    for programs, r in results:
        records += [{"config": config_name, "topology": topology, "stage": p.stage, "program": p.name,
                     "shapes": p.shapes, "total_bytes": p.total_bytes, "argument_bytes": p.argument_bytes,
                     "output_bytes": p.output_bytes, "temp_bytes": p.temp_bytes, "alias_bytes": p.alias_bytes,
                     "flops": p.flops, "bytes_accessed": p.bytes_accessed, "calls": p.calls, "repeat": p.repeat,
                     "collectives": p.collectives, "compile_s": p.compile_s, "refused": p.refused}
                    for p in programs]
        records.append({"config": config_name, "topology": topology, "stage": r.stage, "summary": True,
                        "fits": r.fits, "peak_bytes": r.peak_bytes, "peak_program": r.peak_program, "hbm": r.hbm,
                        **{f"state_{k}": v for k, v in dataclasses.asdict(r.state).items()},
                        "update_s": r.update_s, "flops": r.flops, "dominant_collective": r.dominant_collective})
    return records


FLAGS = flags.FLAGS


def _define_flags():
    """The command line's flags, defined only when it runs (other modules define --tokenizer too)."""
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).")
    flags.DEFINE_string("topology", "v5e:2x4", "TPU topology, <chip>:<shape> (v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x2).")
    flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multi-slice).")
    flags.DEFINE_string("model_config", "", "Folder holding the model's config.json (default: config.model.path "
                        "when it holds one, else configs/models/<its last part>).")
    flags.DEFINE_string("tokenizer", "", "Tokenizer folder for the stop ids and forcing suffixes (default: the "
                        "config's); any tokenizer serves: shapes follow the length flags.")
    flags.DEFINE_integer("prompt_tokens", 256, "The longest prompt (tokens) the check assumes.")
    flags.DEFINE_integer("answer_tokens", 16, "The longest gold answer y (tokens).")
    flags.DEFINE_integer("rationale_tokens", 256, "The longest gold rationale (tokens; SFT rows).")
    flags.DEFINE_string("json", "", "Append one JSON line per program and per stage to this file.")
    flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from latro_jax import job_config
    from latro_jax.data import DataError
    lengths = Lengths(FLAGS.prompt_tokens, FLAGS.answer_tokens, FLAGS.rationale_tokens)
    try:
        results = check(FLAGS.config, FLAGS.topology, num_slices=FLAGS.num_slices,
                        model_config_path=FLAGS.model_config, lengths=lengths, tokenizer=FLAGS.tokenizer,
                        say=lambda line: print(line, file=sys.stderr, flush=True))
    except (CheckError, job_config.ConfigError, models.ConfigError, DataError, FileNotFoundError) as e:
        print(f"compile_check: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(report_lines(FLAGS.topology, results)))
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            for record in json_records(config_flags.get_config_filename(FLAGS["config"]), FLAGS.topology,
                                        results):
                record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
                f.write(json.dumps(record, allow_nan=False) + "\n")  # a refused program's costs: null


if __name__ == "__main__":
    _define_flags()
    app.run(main)
