r"""Does the warm start give MRT a progress signal? Measured before any RL run.

    python -m latro_jax.main --config=configs/compare.py --workdir=/tmp/cmp/sft     # the warm start
    python benchmarks/mrt_precheck.py --model=/tmp/cmp/sft/hf [--questions=256 --samples=8]

On --questions training questions of configs/compare.py it samples --samples traces each (T = 1,
the config's MRT budget), splits them into episodes (the config's rule), computes J at every
prefix (the config's meta-prover, or --estimator), and prints:
- mean progress p_j = J(c_j) - J(c_{j-1}) by episode kind (step, slip, fix, restate, terse,
  other) with counts, and the share of negative-progress episodes;
- forced-answer accuracy against the budget (the last episode boundary within b tokens) for
  the traces of each style (worked, restate, slip, terse).
What MRT needs: restating ~0 progress (it wastes tokens), slips negative and fixes positive,
steps positive. A JSON summary goes to --out.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF folder of the warm start, tokenizer included.")
flags.DEFINE_integer("questions", 256, "Training questions.")
flags.DEFINE_integer("samples", 8, "Traces per question.")
flags.DEFINE_enum("estimator", None, ["mc", "likelihood"], "J estimator (default: the config's).")
flags.DEFINE_list("budgets", ["8", "16", "24", "32", "48", "64"], "Token budgets of the accuracy curve.")
flags.DEFINE_integer("seed", 0, "Sampling key.")
flags.DEFINE_string("out", None, "Write the summary JSON here.")
flags.mark_flag_as_required("model")


def style_of(kinds: list[str]) -> str:
    for style in ("terse", "slip", "restate"):
        if style in kinds or (style == "slip" and "fix" in kinds):
            return style
    return "worked"


def main(_):
    import dataclasses

    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from configs.compare import get_config
    from latro_jax import job_config, models
    from latro_jax.algorithms import Context, Learner, Sft, SftConfig
    from latro_jax.data import PromptFormatter, get_task, load_examples
    from latro_jax.data.synthetic import EPISODE_KINDS, episode_kind
    from latro_jax.episodes import make_segmenter
    from latro_jax.meta_prover import MetaProver
    from latro_jax.sampling import SamplingParams
    from latro_jax.train import OptimConfig

    config = get_config()
    config.stages = "mrt"
    job = job_config.parse(config)
    mrt = job.stages[0].config
    forcing = dataclasses.replace(mrt.forcing, estimator=FLAGS.estimator or mrt.forcing.estimator)
    task = get_task("synthetic")
    examples = load_examples(task, "synthetic", "train", synthetic=dataclasses.asdict(job.task.synthetic))
    examples = examples[-FLAGS.questions:]
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(FLAGS.model))
    model = models.load_hf(FLAGS.model)
    prover = MetaProver(forcing, task, fmt)
    segment = make_segmenter(mrt.segment, fmt)
    policies = Learner(Sft(SftConfig(), Context(task, fmt)), model, OptimConfig(total_steps=1)).policies()

    key = jax.random.key(FLAGS.seed)
    prompts = [fmt.prompt_ids(e.question) for e in examples]
    out = policies.sampler.complete(model, prompts, max_new_tokens=mrt.rollout.max_tokens,
                                    sampling_params=SamplingParams(1.0), num_samples=FLAGS.samples,
                                    stops=fmt.stops.ends_only(), key=key, progress=True)
    traces = [(r // FLAGS.samples, t) for r, t in enumerate(out.ids)]
    episodes = [segment(t) for _, t in traces]
    items = [(i, j) for i, e in enumerate(episodes) for j in range(e.count + 1)]
    print(f"{len(traces)} traces, {len(items)} prefixes; J by {forcing.estimator}", flush=True)
    j = prover.estimate(policies.sampler, policies.scorer, policies.params, [prompts[traces[i][0]] for i, _ in items],
                        [episodes[i].prefix(k) for i, k in items],
                        [examples[traces[i][0]].gold for i, _ in items], jax.random.fold_in(key, 1)).j
    by_trace, start = [], 0
    for e in episodes:
        by_trace.append(j[start:start + e.count + 1])
        start += e.count + 1
    progress = {k: [] for k in EPISODE_KINDS}
    styles = {}
    for e, values in zip(episodes, by_trace):
        kinds = [episode_kind(t) for t in e.episode_texts(fmt.tokenizer)]
        for kind, p in zip(kinds, np.diff(values)):
            progress[kind].append(float(p))
        styles.setdefault(style_of(kinds), []).append((e, values))
    everything = [p for ps in progress.values() for p in ps]
    summary = {"traces": len(traces), "estimator": forcing.estimator,
               "negative_share": float(np.mean(np.array(everything) < 0)),
               "progress": {k: {"count": len(v), "mean": float(np.mean(v)) if v else None,
                                "negative_share": float(np.mean(np.array(v) < 0)) if v else None}
                            for k, v in progress.items()},
               "budget_accuracy": {}}
    print(f"{'episode kind':<14}{'count':>8}{'mean progress':>16}{'share < 0':>12}")
    for kind, row in summary["progress"].items():
        if row["count"]:
            print(f"{kind:<14}{row['count']:>8}{row['mean']:>16.3f}{row['negative_share']:>12.3f}")
    print(f"negative-progress episodes: {summary['negative_share']:.3f} of {len(everything)}")
    budgets = [int(b) for b in FLAGS.budgets]
    print(f"{'style':<10}{'traces':>8}" + "".join(f"{'J@' + str(b):>8}" for b in budgets))
    for style, rows in sorted(styles.items()):
        curve = [float(np.mean([values[sum(1 for x in e.ends if x <= b)] for e, values in rows])) for b in budgets]
        summary["budget_accuracy"][style] = {"traces": len(rows), **{str(b): c for b, c in zip(budgets, curve)}}
        print(f"{style:<10}{len(rows):>8}" + "".join(f"{c:>8.3f}" for c in curve))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    app.run(main)
