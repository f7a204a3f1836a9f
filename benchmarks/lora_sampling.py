r"""Sampling with LoRA adapters: applied in the graph (what latro_jax does) against merged into
the weights first (lora.merged, timed too: a merge per update), side by side.

    python benchmarks/lora_sampling.py --model=/tmp/smollm2 [--rank=16] [--repeats=3]

Loads the HF folder, attaches rank --rank adapters on every projection (B random: a trained
adapter's cost), samples --prompts x --samples rows of --new_tokens tokens (prompt
--prompt_len, temperature 1, no stop) with each, and prints tokens/s of each, the merge's
seconds and the ratios. Times exclude compilation (one warm-up call) and take
the best of --repeats calls.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from timing import best_time  # noqa: E402  (benchmarks/ is the script's folder)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "/tmp/smollm2", "HF model folder.")
flags.DEFINE_integer("rank", 16, "Adapter rank.")
flags.DEFINE_integer("prompts", 8, "Prompts.")
flags.DEFINE_integer("samples", 4, "Samples per prompt.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 96, "Generated tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed calls per variant (best is reported).")


def main(_):
    import jax
    import numpy as np
    from flax import nnx

    from latro_jax import models, sampling
    from latro_jax.models import lora
    model = models.load_hf(FLAGS.model)
    lora.attach(model, lora.LoRAConfig(rank=FLAGS.rank, alpha=2.0 * FLAGS.rank))
    flat = nnx.to_flat_state(nnx.state(model, lora.LoRAWeight))
    nnx.update(model, nnx.from_flat_state([
        (p, v.replace(0.01 * jax.random.normal(jax.random.key(i), v.shape)) if str(p[-1]).endswith("_b") else v)
        for i, (p, v) in enumerate(flat)]))
    prompts = np.random.RandomState(0).randint(3, model.config.vocab_size, (FLAGS.prompts, FLAGS.prompt_len)).tolist()
    rows = FLAGS.prompts * FLAGS.samples * FLAGS.new_tokens

    def sample(m):
        return lambda: np.asarray(sampling.generate(m, prompts, FLAGS.new_tokens, sampling=sampling.SamplingParams(1.0),
                                                    num_samples=FLAGS.samples, seed=0).tokens)

    merge = lambda: jax.block_until_ready(nnx.state(lora.merged(model), nnx.Param))
    merge_s = best_time(merge, FLAGS.repeats)
    adapted_s = best_time(sample(model), FLAGS.repeats)
    merged_s = best_time(sample(lora.merged(model)), FLAGS.repeats)
    print(f"{FLAGS.model}, rank {FLAGS.rank} on q k v o gate up down; {FLAGS.prompts} x {FLAGS.samples} rows x "
          f"{FLAGS.new_tokens} tokens after {FLAGS.prompt_len}; jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"adapters applied: {rows / adapted_s:8.1f} tokens/s ({adapted_s:.2f} s)")
    print(f"merged weights:   {rows / merged_s:8.1f} tokens/s ({merged_s:.2f} s) + merge {merge_s:.2f} s per update")
    print(f"applied / (merged + merge) time: {adapted_s / (merged_s + merge_s):.2f}; "
          f"applied / merged: {adapted_s / merged_s:.2f}")


if __name__ == "__main__":
    app.run(main)
