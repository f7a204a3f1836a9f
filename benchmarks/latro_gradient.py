r"""Signal and noise of the LaTRO gradient estimate on a warm start, and what a step along it does.

    python -m latro_jax.main --config=configs/demo.py --config.stages=sft --workdir=/tmp/ws
    python benchmarks/latro_gradient.py --model=/tmp/ws/hf          # the demo's task and SFT model

On a fixed set of --questions training questions it draws two independent rollouts of
--samples rationales per question, computes the REINFORCE-with-RLOO gradient of each (SPEC 1.2,
c_sft = 0: the policy part only) and prints their norms and cosine. For independent estimates
g_i = s + n_i with noise of equal size, cos = |s|^2 / (|s|^2 + |n|^2): the signal-to-noise
ratio |s|/|n| of one estimate is sqrt(cos / (1 - cos)); it grows as sqrt(rows).

Then it steps the parameters along the mean of the two estimates, by plain gradient steps
(theta - eta * g) and by sign steps (theta - eta * sign(g), what Adam's first updates are), and
re-samples: the policy objective E_z[R'] with the scorer held at the warm start (R' = log pi_0(y|x+z),
the non-stop penalty for unfinished z) and the share of rationales after which the gold answer is
likely (R' > -2), each next to the same measurement of the warm start with the same seeds.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF folder of the warm start, tokenizer included (the demo's SFT export).")
flags.DEFINE_integer("questions", 64, "Training questions in the fixed set.")
flags.DEFINE_integer("samples", 32, "Rationales per question (K) in each rollout.")
flags.DEFINE_integer("max_rationale_tokens", None, "L, the rationale length limit (default: the demo's).")
flags.DEFINE_float("beta", None, "KL weight in the reward (default: the demo's).")
flags.DEFINE_list("sgd_steps", ["3e-4", "1e-3", "3e-3"], "Step sizes of plain gradient steps.")
flags.DEFINE_list("sign_steps", ["1e-4", "3e-4", "1e-3"], "Step sizes of sign steps.")
flags.mark_flag_as_required("model")

CHUNK_ROWS = 256  # rows per micro-batch of the scoring and gradient passes


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from configs.demo import get_config
    from latro_jax import models, run
    from latro_jax.algorithms import Context, Latro, LatroConfig, Learner
    from latro_jax.data import PromptFormatter, get_task, load_examples
    from latro_jax.train import OptimConfig

    demo = get_config()
    fmt, task = PromptFormatter(AutoTokenizer.from_pretrained(FLAGS.model)), get_task("synthetic")
    synthetic = demo.task.synthetic.to_dict()  # the demo's problems
    questions = load_examples(task, "synthetic", "train", synthetic=synthetic)[-FLAGS.questions:]
    prompts = [fmt.prompt_ids(e.question) for e in questions]
    answers = [fmt.answer_ids(e.answer) for e in questions]
    bare = [fmt.completion_ids(e.answer) for e in questions]
    N, K = len(prompts), FLAGS.samples
    beta = demo.latro.beta if FLAGS.beta is None else FLAGS.beta
    cfg = LatroConfig(num_samples=K, beta=beta, sft_coef=0.0,
                      max_rationale_tokens=FLAGS.max_rationale_tokens or demo.latro.max_rationale_tokens)
    ctx = Context(task, fmt, microbatches=max(1, N * K // CHUNK_ROWS))
    latro = Latro(cfg, ctx)
    learner = Learner(latro, models.load_hf(FLAGS.model), OptimConfig(total_steps=1))
    start = learner.policies()  # the warm start: policy and reference

    def rollout(params, seed):
        """Rationales sampled from `params`, as rows (with the key of a run's first update)."""
        return latro.sample(dataclasses.replace(start, params=params), prompts, answers, bare,
                            run.rollout_key(seed, "latro", 0))

    def estimate(seed):
        """The gradient of the policy part of the LaTRO loss on one rollout from the warm start."""
        scored = latro.score(start, rollout(start.params, seed))
        return learner.trainer.gradients(scored.arrays, scored.scalars, scored.layout)

    def measure(params, seeds=(7, 8)):
        """Mean over seeds of (E[R'] under the warm-start scorer, share with R' > -2)."""
        out = []
        for seed in seeds:
            sampled = rollout(params, seed)
            (y_logp,) = learner.scorer.span_logprobs(start.params, sampled.rows.arrays(), ("answer_mask",))
            reward = np.where(sampled.finished, y_logp, cfg.nonstop_penalty * y_logp.mean())
            out.append((reward.mean(), (reward > -2).mean()))
        return np.mean(out, axis=0)

    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
    g1, g2 = estimate(101), estimate(202)
    a, b = flat(g1), flat(g2)
    cos = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    print(f"{N} questions x {K} rationales = {N * K} rows per estimate")
    print(f"gradient norms {float(jnp.linalg.norm(a)):.2f}, {float(jnp.linalg.norm(b)):.2f}; "
          f"cosine of two independent estimates {cos:.3f}; "
          f"signal/noise of one estimate {np.sqrt(max(cos, 0) / (1 - cos)):.2f}")
    mean = jax.tree.map(lambda x, y: (x + y) / 2, g1, g2)
    base = measure(start.params)
    print(f"{'step':<18}{'E[R`] (fixed scorer)':>24}{'share R` > -2':>18}")
    print(f"{'none':<18}{base[0]:>24.3f}{base[1]:>18.3f}")
    for kind, sizes, direction in (("gradient", FLAGS.sgd_steps, lambda g: g),
                                   ("sign", FLAGS.sign_steps, jnp.sign)):
        for eta in map(float, sizes):
            moved = jax.tree.map(lambda w, g: w - eta * direction(g), start.params, mean)
            r, share = measure(moved)
            print(f"{kind + ' ' + format(eta, 'g'):<18}{r:>24.3f}{share:>18.3f}", flush=True)


if __name__ == "__main__":
    app.run(main)
