r"""Where the training step's time goes: one forward + backward of the log-likelihood of B rows
of T tokens (the LaTRO step's shape without the optimizer), profiled op by op.

    python benchmarks/step_profile.py                       # bench shape: 32 rows x 200 tokens
    python benchmarks/step_profile.py --rows=64 --tokens=256 --top=30
    python benchmarks/step_profile.py --group=4             # each prompt (64 columns) once per 4 rows

Prints, for the jitted forward and forward + backward (after a warm-up call): the best wall time
of --repeats calls, the CPU time (user / system) and minor page faults per call; then, from a
jax.profiler trace of one forward + backward, the time per XLA op kind (dots are `ynn_fusion` /
`dot` on XLA:CPU; the rest is memory traffic: scan residual stacking, zero fills, copies, pads)
and the --top slowest ops. The model is the bench shape's random Llama (benchmarks/bench_model.py).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 32, "B, rows (the bench shape's N x K).")
flags.DEFINE_integer("tokens", 200, "T, tokens per row (the bench shape's row length: 64 + 128 + 8).")
flags.DEFINE_integer("repeats", 3, "Timed calls per function.")
flags.DEFINE_integer("top", 20, "Slowest ops to list.")
flags.DEFINE_integer("group", 1, "Rows per shared prompt (the bench shape's K = 4): > 1 runs each "
                     "group's first --prompt_width columns once (token_logprobs' shared_prefix).")
flags.DEFINE_integer("prompt_width", 64, "Prompt columns shared within a --group.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "The layers' rematerialisation (models' remat).")


def op_kind(name: str) -> str:
    """'ynn_fusion.12' -> 'dot (ynn_fusion)'; 'bitcast_pad_fusion.3' -> 'bitcast_pad_fusion'."""
    base = name.split(".")[0]
    return f"dot ({base})" if base in ("ynn_fusion", "dot", "dot_general") else base


def per_call(fn, repeats: int) -> dict:
    """Best wall time, and CPU time and minor page faults per call, after a warm-up call."""
    import jax
    jax.block_until_ready(fn())
    before, walls = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": round(min(walls), 3), "user_s": round((after.ru_utime - before.ru_utime) / repeats, 2),
            "system_s": round((after.ru_stime - before.ru_stime) / repeats, 2),
            "minor_faults": (after.ru_minflt - before.ru_minflt) // repeats}


def main(_):
    import jax
    import numpy as np
    from flax import nnx
    from bench_model import make_model  # benchmarks/ is the script's folder

    from latro_jax import logprobs, models

    with tempfile.TemporaryDirectory() as folder:
        make_model(folder)
        graphdef, params = nnx.split(models.load_hf(folder, remat=FLAGS.remat))
    tokens = np.random.default_rng(0).integers(1, 8192, (FLAGS.rows, FLAGS.tokens)).astype(np.int32)
    shared = (FLAGS.prompt_width, FLAGS.group) if FLAGS.group > 1 else None
    if shared:
        tokens[:, :FLAGS.prompt_width] = np.repeat(tokens[::FLAGS.group, :FLAGS.prompt_width], FLAGS.group, axis=0)
    valid = np.ones_like(tokens, bool)

    def loglik(params):
        return logprobs.token_logprobs(nnx.merge(graphdef, params), tokens, valid, shared_prefix=shared).sum()

    forward, backward = jax.jit(loglik), jax.jit(jax.grad(loglik))
    for name, fn in (("forward", forward), ("forward+backward", backward)):
        print(json.dumps({"call": name, "rows": FLAGS.rows, "tokens": FLAGS.tokens, "shared_prefix": shared,
                          "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                          **per_call(lambda fn=fn: fn(params), FLAGS.repeats)}), flush=True)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(backward(params))
        jax.profiler.stop_trace()
        (trace,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    ops = collections.Counter()
    for e in events:
        name = e.get("name", "")
        # XLA's ops only: not Python frames ($...), runtime bookkeeping or end markers
        if e.get("ph") == "X" and not name.startswith(("$", "end: ")) and not any(
                s in name for s in ("Execute", "Pjit", "Allocate", "ThreadPool")):
            ops[name] += e.get("dur", 0) / 1e6
    kinds = collections.Counter()
    for name, seconds in ops.items():
        kinds[op_kind(name)] += seconds
    print(json.dumps({"forward+backward seconds by op kind (summed over threads)":
                      {k: round(v, 3) for k, v in kinds.most_common()}}), flush=True)
    print(json.dumps({"slowest ops": {k: round(v, 3) for k, v in ops.most_common(FLAGS.top)}}), flush=True)


if __name__ == "__main__":
    from latro_jax.huge_pages import reexec_with_huge_pages
    reexec_with_huge_pages()  # as the job does: malloc on transparent huge pages (GLIBC_TUNABLES= opts out)
    app.run(main)
