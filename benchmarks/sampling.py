r"""Sampler throughput: latro_jax `sampling.generate` vs transformers `generate`, side by side.

    python benchmarks/sampling.py                 # the issue's CPU configuration
    python benchmarks/sampling.py --dtype=bfloat16  # the same, both sides in bf16
    python benchmarks/sampling.py --preset=gpu_1b # ~1B params, bf16, batch 64 (accelerator)

Both load the same randomly initialised Llama from the same HF folder and sample the same
batch (prompts x samples rows, fixed prompt length, exactly max_new tokens: no stop, sampling
at temperature 1.0, top-k off, top-p 1.0). Times exclude compilation (one warm-up call) and
take the best of --repeats calls. Prints tokens/s of each and the ratio, and a ceiling: the
tokens/s of the decode steps' weight matmuls alone (same shapes, dtype and rows, f32
accumulation; no prefill, attention, norms or sampling), the most any sampler built on XLA's
matmuls could reach on this machine.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench_model import make_model  # noqa: E402  (benchmarks/ is the script's folder)
from timing import best_time  # noqa: E402

PRESETS = {
    # The bench configuration for a 2-core CPU.
    "cpu": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=8192,
                prompts=8, samples=4, prompt_len=64, new_tokens=128, dtype="float32"),
    # ~1.1B parameters (TinyLlama-like shape) in bf16 at batch 64, for an accelerator.
    "gpu_1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000,
                   prompts=16, samples=4, prompt_len=128, new_tokens=256, dtype="bfloat16"),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Model and batch configuration.")
flags.DEFINE_integer("repeats", 3, "Timed calls per implementation (best is reported).")
flags.DEFINE_bool("skip_transformers", False, "Only time latro_jax.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Weights and compute dtype of both implementations (default: the preset's).")


def make_hf_folder(cfg: dict, out: str) -> None:
    """The preset's model (benchmarks/bench_model.py) in its dtype."""
    make_model(out, dtype=cfg["dtype"], vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
               intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
               num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"])


def time_latro_jax(folder: str, cfg: dict, prompts) -> float:
    from latro_jax import models, sampling
    from latro_jax.sampling import SamplingParams
    model = models.load_hf(folder, dtype=cfg["dtype"], param_dtype=cfg["dtype"])

    def run():
        out = sampling.generate(model, prompts, cfg["new_tokens"], sampling=SamplingParams(1.0),
                                num_samples=cfg["samples"], seed=0)
        assert int(out.lengths.min()) == cfg["new_tokens"]

    return best_time(run, FLAGS.repeats)


def time_matmul_ceiling(cfg: dict) -> float:
    """Seconds for new_tokens decode steps of only the weight matmuls: per layer x @ W_qkv,
    (attention-sized slice) @ W_o, x @ W_gate_up, (gate * up) @ W_down; then x @ W_lm_head."""
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(cfg["dtype"])
    hidden, inter, rows = cfg["hidden"], cfg["intermediate"], cfg["prompts"] * cfg["samples"]
    head_dim = hidden // cfg["heads"]
    q_width = cfg["heads"] * head_dim
    keys = iter(jax.random.split(jax.random.key(0), 4 * cfg["layers"] + 1))
    init = lambda shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)
    layers = [dict(qkv=init((hidden, q_width + 2 * cfg["kv_heads"] * head_dim)),
                   o=init((q_width, hidden)), gate_up=init((hidden, 2 * inter)),
                   down=init((inter, hidden))) for _ in range(cfg["layers"])]
    lm_head = init((hidden, cfg["vocab"]))
    mm = lambda x, w: jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)

    @jax.jit
    def decode(x):
        def step(_, x):
            for w in layers:
                x = x + mm(mm(x, w["qkv"])[:, :q_width], w["o"])
                gate_up = mm(x, w["gate_up"])
                x = x + mm(gate_up[:, :inter] * gate_up[:, inter:], w["down"])
            return x + 1e-3 * mm(x, lm_head)[:, :hidden]  # the next step depends on the logits
        return jax.lax.fori_loop(0, cfg["new_tokens"], step, x)

    x = jnp.ones((rows, hidden), jnp.float32)
    return best_time(lambda: decode(x).block_until_ready(), FLAGS.repeats)


def time_transformers(folder: str, cfg: dict, prompts) -> float:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, cfg["dtype"])).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ids = torch.tensor(prompts, device=device)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                                 num_return_sequences=cfg["samples"], pad_token_id=0)
        assert out.shape[1] == cfg["prompt_len"] + cfg["new_tokens"]
        if device == "cuda":
            torch.cuda.synchronize()

    return best_time(run, FLAGS.repeats)


def main(_):
    import jax
    import numpy as np
    cfg = dict(PRESETS[FLAGS.preset])
    if FLAGS.dtype:
        cfg["dtype"] = FLAGS.dtype
    rows = cfg["prompts"] * cfg["samples"]
    prompts = np.random.RandomState(0).randint(3, cfg["vocab"], (cfg["prompts"], cfg["prompt_len"])).tolist()
    print(f"preset {FLAGS.preset}: {cfg}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {len(jax.devices())} device(s)")
    with tempfile.TemporaryDirectory() as folder:
        make_hf_folder(cfg, folder)
        ours = time_latro_jax(folder, cfg, prompts)
        theirs = None if FLAGS.skip_transformers else time_transformers(folder, cfg, prompts)
    ceiling = time_matmul_ceiling(cfg)
    tokens = rows * cfg["new_tokens"]
    print(f"{'implementation':<32}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'latro_jax':<32}{ours:>10.3f}{tokens / ours:>12.1f}")
    if theirs is not None:
        print(f"{'transformers generate':<32}{theirs:>10.3f}{tokens / theirs:>12.1f}")
    print(f"{'ceiling: weight matmuls only':<32}{ceiling:>10.3f}{tokens / ceiling:>12.1f}")
    if theirs is not None:
        print(f"ratio latro_jax / transformers: {theirs / ours:.2f}x "
              f"(ceiling / transformers: {theirs / ceiling:.2f}x)")


if __name__ == "__main__":
    from latro_jax.huge_pages import reexec_with_huge_pages
    reexec_with_huge_pages()  # as the job does: malloc on transparent huge pages (GLIBC_TUNABLES= opts out)
    app.run(main)
