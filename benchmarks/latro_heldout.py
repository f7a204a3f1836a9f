r"""Held-out figures of a LaTRO run: what LaTRO maximises, measured on test questions, before and
after training, beside the run's own greedy accuracy.

    python benchmarks/latro_heldout.py --config=configs/latro_gsm8k_smollm2_lora.py \
        --workdir=/tmp/latro_smollm2_lora [--questions=40] [--out=heldout.json]

On the first --questions evaluation questions of the config (its eval split, eval.limit
applied) it runs the last stage's LaTRO rollout and scoring -- the stage's num_samples
rationales per question at its temperature and budget, then log pi(y | x + z) of the gold
answer y -- with the initial model and with the workdir's final checkpoint, the same random
keys for both, no update. Prints, for each: answer_logp (the mean of log pi(y | x + z) over the
rationales: the reward's likelihood term), reward (R, SPEC 1.3) and finished (the share of
rationales that ended); and greedy accuracy from <workdir>/results.json.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=False)
flags.DEFINE_string("workdir", None, "The run's workdir (its final checkpoint and results.json).")
flags.DEFINE_integer("questions", 40, "Held-out questions (at most eval.limit's).")
flags.DEFINE_string("out", None, "Also write the figures to this JSON file.")


def heldout(job, model, examples) -> dict[str, float]:
    """Mean answer_logp / reward / finished of the last stage's LaTRO rollout + score of `model`
    over `examples`, in batches of the stage's batch size (rollout keys by batch index)."""
    import numpy as np
    from flax import nnx

    from latro_jax.algorithms import Policies
    from latro_jax.rollout import Sampler
    from latro_jax.run import rollout_key
    from latro_jax.scoring import Scorer
    stage = job.stages[-1]
    algorithm, ctx, size = stage.algorithm, stage.algorithm.ctx, stage.config.stage.batch_size
    if algorithm.name != "latro":
        raise app.UsageError(f"the last stage is {algorithm.name}, not latro")
    graphdef, state = nnx.split(model)
    scorer = Scorer(graphdef, model.config, microbatches=ctx.microbatches, mesh=ctx.mesh, chunk_size=ctx.logprob_chunk)
    sampler = Sampler(pad_id=ctx.fmt.pad_id, mesh=ctx.mesh, rows_per_call=ctx.sample_rows_per_call,
                      prompt_width=ctx.prompt_width)
    policies = Policies(state, state, sampler, scorer)
    sums, n = {}, 0
    for i in range(0, len(examples) - size + 1, size):
        batch = examples[i:i + size]
        scored = algorithm.score(policies, algorithm.rollout(policies, batch, rollout_key(0, "heldout", i)))
        for k in ("answer_logp", "reward", "finished"):
            sums[k] = sums.get(k, 0.0) + scored.metrics[k] * len(batch)
        n += len(batch)
    return {k: float(np.round(v / n, 4)) for k, v in sums.items()} | {"questions": n}


def main(_):
    from latro_jax import job as jobs
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    job = jobs.build(FLAGS.config)
    examples = job.eval_examples[:FLAGS.questions]
    results = json.load(open(os.path.join(FLAGS.workdir, "results.json")))
    figures = {"init": {**heldout(job, job.model, examples), "greedy": results["init"]["greedy"]}}
    final = jobs.restore_final(job, FLAGS.workdir)
    last = job.stages[-1].name
    figures[last] = {**heldout(job, final, examples), "greedy": results[last]["greedy"]}
    print(json.dumps(figures, indent=2))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
