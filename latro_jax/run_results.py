"""The run's evaluations as results.json records them: one per stage (and "init"), each with the
settings it ran with (eval/<name>/settings.json), run again when its stage trained further or its
settings changed; the results table the job prints."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from latro_jax import run_dir
from latro_jax.evaluate import evaluate
from latro_jax.job import Job, say
from latro_jax.job_config import JobConfig


class Evaluations:
    """The evaluations of a run, as results.json records them: one per stage (and "init"), each
    with its settings in eval/<name>/settings.json. An evaluation is run when its stage trained
    (redo), when results.json lacks it, or when its recorded settings differ from the config's.
    `stop` (a callable) is asked between evaluation batches: EvaluationStopped when it says so."""

    def __init__(self, job: Job, workdir: str, results: dict, stop):
        self.job, self.workdir, self.results, self.stop = job, workdir, results, stop
        self.settings = _eval_settings(job.config)

    def ensure(self, name: str, model, redo: bool, **extra) -> None:
        settings_path = os.path.join(self.workdir, "eval", name, "settings.json")
        recorded = run_dir.read_json(settings_path, "delete it to evaluate this stage again.")
        if not redo and name in self.results and recorded == self.settings:
            return
        if name in self.results and not redo:
            say(f"{name}: evaluating again, with the config's evaluation settings")
        summary = evaluate_stage(self.job, model, self.workdir, name, stop=self.stop)
        run_dir.write_json(settings_path, self.settings)
        self.results[name] = {**summary, **extra}
        run_dir.write_json(os.path.join(self.workdir, "results.json"), self.results)


def _eval_settings(c: JobConfig) -> dict:
    """What an evaluation's result depends on: the eval section (but its validation cadence)
    and the evaluation data, as JSON values."""
    settings = {k: v for k, v in dataclasses.asdict(c.eval).items() if k != "every"}
    settings["data"] = {"task": c.task.name, "source": c.task.eval_source or c.task.source,
                        "split": c.task.eval_split}
    return json.loads(json.dumps(settings, default=str))


def evaluate_stage(job: Job, model, workdir: str, name: str, examples=None, stop=None) -> dict[str, float]:
    """Greedy and maj@k accuracy of `model` on the evaluation split (or `examples`), its mean
    greedy output tokens, and (when configured) sampled pass@1, forced-answer accuracy by budget and regret,
    with the per-example records in workdir/eval/<name>. Raises EvaluationStopped when `stop()`
    turns true between batches."""
    summary = evaluate(model, job.task, job.eval_examples if examples is None else examples,
                       job.fmt, job.config.eval, mesh=job.mesh, out_dir=os.path.join(workdir, "eval", name),
                       desc=f"eval {name}", progress=jax.process_index() == 0, stop=stop)
    return {k: v for k, v in summary.items()
            if k in ("greedy", f"maj@{job.config.eval.maj_k}", "pass@1", "greedy_tokens")
            or k.startswith(("forced@", "regret@"))}


def results_table(results: dict[str, Any]) -> str:
    keys = sorted({k for r in results.values() for k in r})
    widths = [max(10, len(k) + 2) for k in keys]
    first = max(8, *(len(s) + 1 for s in results))
    lines = [f"{'stage':<{first}}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))]
    for stage, r in results.items():
        lines.append(f"{stage:<{first}}" + "".join(f"{r.get(k, float('nan')):>{w}.3f}" for k, w in zip(keys, widths)))
    return "\n".join(lines)
