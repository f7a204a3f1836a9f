r"""Does the warm start give MRT something to act on? Measured before any RL run.

    python -m latro_jax.main --config=configs/compare.py --workdir=/tmp/cmp/sft     # the warm start
    python benchmarks/mrt_precheck.py --model=/tmp/cmp/sft/hf [--questions=256 --samples=8]

On --questions training questions of the config it samples --samples traces each at T = 1 and
one greedy trace, of at most eval.max_new_tokens (so a trace the training budget L =
mrt.rollout.max_tokens would cut is seen whole), splits them into episodes (the config's rule),
computes J at every prefix (the config's meta-prover, or --estimator) and prints, for the T = 1
and the greedy traces:
- mean progress p_j = J(c_j) - J(c_{j-1}) by episode kind (data/synthetic.py episode_kinds),
  with counts and the shares of zero-progress (|p| < --zero) and negative-progress episodes;
- the three properties MRT's comparison needs (issue 36): (1) the share of zero-progress
  episodes; (2) J after the first half of a trace's episodes (rounded down) against J(empty);
  (3) the share of traces longer than L per trace style (search: wasteful -- checks after
  the find --, stops -- ends at the find -- and no find);
- forced-answer accuracy against the budget (the last episode boundary within b tokens) per
  trace style.
A JSON summary goes to --out.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF folder of the warm start, tokenizer included.")
config_flags.DEFINE_config_file("config", "configs/compare.py", "The comparison's config (task, MRT budget and "
                                "meta-prover).", lock_config=False)
flags.DEFINE_integer("questions", 256, "Training questions.")
flags.DEFINE_integer("samples", 8, "Traces per question at T = 1.")
flags.DEFINE_enum("estimator", None, ["mc", "likelihood"], "J estimator (default: the config's).")
flags.DEFINE_list("budgets", None, "Token budgets of the accuracy curve (default: the config's eval.forced_budgets).")
flags.DEFINE_float("zero", 0.02, "|progress| below this is zero progress.")
flags.DEFINE_integer("seed", 0, "Sampling key.")
flags.DEFINE_string("out", None, "Write the summary JSON here.")
flags.mark_flag_as_required("model")


def style_of(kinds: list[str], search: bool) -> str:
    """A trace's style from its episode kinds: search traces `wasteful` (checks after the find),
    `stops` (ends its checks at the find) or `no find`; chain traces terse / slip / restate / worked."""
    if search:
        return "wasteful" if "after" in kinds or "recheck" in kinds else "stops" if "found" in kinds else "no find"
    for style in ("terse", "slip", "restate"):
        if style in kinds or (style == "slip" and "fix" in kinds):
            return style
    return "worked"


def summarise(traces, episodes, j_values, examples, tokenizer, budget: int, budgets: list[int], zero: float) -> dict:
    """The per-kind progress, the three properties and the per-style budget curves of one set
    of traces (question index, ids), their episodes and J at every prefix."""
    import numpy as np

    from latro_jax.data.synthetic import episode_kinds, is_search
    progress, styles, half, empty, cut = {}, {}, [], [], {}
    for (q, ids), e, values in zip(traces, episodes, j_values):
        kinds = episode_kinds(examples[q].question, e.episode_texts(tokenizer))
        for kind, p in zip(kinds, np.diff(values)):
            progress.setdefault(kind, []).append(float(p))
        style = style_of(kinds, is_search(examples[q].question))
        styles.setdefault(style, []).append((e, values))
        half.append(values[e.count // 2])
        empty.append(values[0])
        cut.setdefault(style, []).append(len(ids) > budget)
    every = np.array([p for ps in progress.values() for p in ps])
    out = {"traces": len(traces), "episodes": len(every),
           "zero_share": float(np.mean(np.abs(every) < zero)), "negative_share": float(np.mean(every <= -zero)),
           "j_empty": float(np.mean(empty)), "j_half": float(np.mean(half)),
           "cut_share": {k: float(np.mean(v)) for k, v in cut.items()}, "cut_count": {k: len(v) for k, v in cut.items()},
           "progress": {k: {"count": len(v), "mean": float(np.mean(v)),
                            "zero_share": float(np.mean(np.abs(v) < zero)),
                            "negative_share": float(np.mean(np.array(v) <= -zero))} for k, v in progress.items()},
           "budget_accuracy": {}}
    for style, rows in sorted(styles.items()):
        curve = [float(np.mean([values[sum(1 for x in e.ends if x <= b)] for e, values in rows])) for b in budgets]
        out["budget_accuracy"][style] = {"traces": len(rows), **{str(b): c for b, c in zip(budgets, curve)}}
    return out


def report(name: str, s: dict, budget: int, budgets: list[int]) -> None:
    print(f"\n== {name}: {s['traces']} traces, {s['episodes']} episodes")
    print(f"{'episode kind':<14}{'count':>8}{'mean progress':>16}{'share ~0':>10}{'share < 0':>11}")
    for kind, row in sorted(s["progress"].items(), key=lambda kv: -kv[1]["count"]):
        print(f"{kind:<14}{row['count']:>8}{row['mean']:>16.3f}{row['zero_share']:>10.3f}{row['negative_share']:>11.3f}")
    print(f"(1) zero-progress episodes: {s['zero_share']:.3f} (negative: {s['negative_share']:.3f})")
    print(f"(2) J after half the episodes {s['j_half']:.3f} against J(empty) {s['j_empty']:.3f}")
    print(f"(3) traces longer than L = {budget}: " + ", ".join(
        f"{k} {v:.3f} of {s['cut_count'][k]}" for k, v in s["cut_share"].items()))
    print(f"{'style':<10}{'traces':>8}" + "".join(f"{'J@' + str(b):>8}" for b in budgets))
    for style, row in s["budget_accuracy"].items():
        print(f"{style:<10}{row['traces']:>8}" + "".join(f"{row[str(b)]:>8.3f}" for b in budgets))


def main(_):
    import dataclasses

    import jax
    from transformers import AutoTokenizer

    from latro_jax import job_config, models
    from latro_jax.algorithms import Context, Learner, Sft, SftConfig
    from latro_jax.data import PromptFormatter, get_task, load_examples
    from latro_jax.episodes import make_segmenter
    from latro_jax.meta_prover import MetaProver
    from latro_jax.sampling import SamplingParams
    from latro_jax.train import OptimConfig

    config = FLAGS.config
    config.stages = "mrt"
    job = job_config.parse(config)
    mrt = job.stages[0].config
    forcing = dataclasses.replace(mrt.forcing, estimator=FLAGS.estimator or mrt.forcing.estimator)
    task = get_task(job.task.name)
    examples = load_examples(task, "synthetic", "train", synthetic=dataclasses.asdict(job.task.synthetic))
    examples = examples[-FLAGS.questions:]
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(FLAGS.model))
    model = models.load_hf(FLAGS.model)
    prover = MetaProver(forcing, task, fmt)
    segment = make_segmenter(mrt.segment, fmt)
    policies = Learner(Sft(SftConfig(), Context(task, fmt)), model, OptimConfig(total_steps=1)).policies()
    budget, budgets = mrt.rollout.max_tokens, [int(b) for b in FLAGS.budgets or job.eval.forced_budgets]
    key = jax.random.key(FLAGS.seed)
    prompts = [fmt.prompt_ids(e.question) for e in examples]
    summary = {"estimator": forcing.estimator, "budget": budget}
    for name, temperature, samples in (("T=1", 1.0, FLAGS.samples), ("greedy", 0.0, 1)):
        key, k_sample, k_j = jax.random.split(key, 3)
        out = policies.sampler.complete(model, prompts, max_new_tokens=job.eval.max_new_tokens,
                                        sampling_params=SamplingParams(temperature), num_samples=samples,
                                        stops=fmt.stops.ends_only(), key=k_sample, progress=True)
        traces = [(r // samples, t) for r, t in enumerate(out.ids)]
        episodes = [segment(t) for _, t in traces]
        items = [(i, j) for i, e in enumerate(episodes) for j in range(e.count + 1)]
        j = prover.estimate(policies.sampler, policies.scorer, policies.params, [prompts[traces[i][0]] for i, _ in items],
                            [episodes[i].prefix(k) for i, k in items], [examples[traces[i][0]].gold for i, _ in items],
                            k_j).j
        j_values, start = [], 0
        for e in episodes:
            j_values.append(j[start:start + e.count + 1])
            start += e.count + 1
        summary[name] = summarise(traces, episodes, j_values, examples, fmt.tokenizer, budget, budgets, FLAGS.zero)
        report(f"{name} (J by {forcing.estimator})", summary[name], budget, budgets)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    app.run(main)
