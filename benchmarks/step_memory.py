r"""What the training step keeps besides the train state: XLA's temporaries of the compiled step
(gradient accumulation over micro-batches, AdamW, the non-finite guard) as a multiple of the
parameters' bytes, for the step as built (train.Trainer) and for a baseline that also undoes an
update leaving a non-finite weight (the step before 2026-12-07), side by side. Nothing runs:
the step is compiled for this machine's CPU (one device) and its memory analysis read.

    python benchmarks/step_memory.py
    python benchmarks/step_memory.py --hidden=2048 --layers=2 --microbatches=1,4

On a TPU chip the same multiples decide whether a 7B full fine-tune fits (docs/tpu.md).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from latro_jax import models, train

FLAGS = flags.FLAGS
flags.DEFINE_integer("hidden", 1024, "Hidden size of the random Llama (parameters dominate the activations).")
flags.DEFINE_integer("layers", 4, "Layers.")
flags.DEFINE_integer("rows", 4, "Rows per step.")
flags.DEFINE_integer("tokens", 16, "Tokens per row.")
flags.DEFINE_list("microbatches", ["1", "2", "4"], "Micro-batch counts to compile.")


class GuardedTrainer(train.Trainer):
    """The baseline: the step, then the whole state back as it was when a new weight is not finite."""

    def _step_impl(self, state, batch, scalars, layout):
        new, metrics = super()._step_impl(state, batch, scalars, layout)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new.params)]))
        kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return kept, {**metrics, "nonfinite": jnp.maximum(metrics["nonfinite"], 1.0 - ok.astype(jnp.float32))}


def _loss(model, microbatch, scalars, layout):
    logits = model(microbatch["tokens"])
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 1]), {}


def temporaries(cls, model, microbatches: int) -> dict:
    trainer = cls(model, train.OptimConfig(), _loss, microbatches=microbatches)
    batch = trainer._place({"tokens": np.ones((FLAGS.rows, FLAGS.tokens), np.int32)})
    memory = trainer.step_program(batch, {}).compile().memory_analysis()
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.state.params))
    return {"params_mb": params / 1e6, "temp_mb": memory.temp_size_in_bytes / 1e6,
            "temp_x_params": memory.temp_size_in_bytes / params}


def main(argv):
    del argv
    config = models.ModelConfig(family="llama", vocab_size=512, hidden_size=FLAGS.hidden,
                                intermediate_size=2 * FLAGS.hidden, num_layers=FLAGS.layers, num_heads=8,
                                num_kv_heads=8, head_dim=FLAGS.hidden // 8, max_position_embeddings=256)
    model = models.init_model(config, dtype="bfloat16", param_dtype="float32", remat="full")
    for m in map(int, FLAGS.microbatches):
        now, baseline = temporaries(train.Trainer, model, m), temporaries(GuardedTrainer, model, m)
        print(json.dumps({"microbatches": m, "params_mb": round(now["params_mb"], 1),
                          "temp_x_params": round(now["temp_x_params"], 2),
                          "baseline_temp_x_params": round(baseline["temp_x_params"], 2),
                          "ratio": round(now["temp_mb"] / baseline["temp_mb"], 3)}))


if __name__ == "__main__":
    app.run(main)
