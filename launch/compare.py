r"""LaTRO vs outcome-reward GRPO vs MRT-RL vs MRT-STaR vs STaR from one SFT warm start, per seed.

    python launch/compare.py --root=/tmp/compare --seeds=0,1,2 [--config=configs/compare.py] \
        [--methods=latro,grpo,...] [--extra=--config.latro.steps=40 ...]

--methods names the config's stage sections to run (default: the five above and grpo_matched;
configs/compare_families.py holds the likelihood-reward family and the GRPO variants).

For each seed: the SFT warm start once (<root>/s<seed>/sft), then from its export every method
in its own workdir (<root>/s<seed>/<method>: latro, grpo, mrt, mrt_star, star), and last a GRPO
run whose number of updates matches MRT's wall time (grpo_matched). Each run is the training job
(its log in <workdir>/log.txt), so an interrupted comparison resumes by running the same
command: finished runs are skipped, a killed one resumes from its checkpoint. The method's
"init" evaluation is the warm start's. Writes <root>/table.json, prints the table (mean and
min-max over seeds) and draws <root>/compare.png (forced-answer accuracy against the token
budget per method, the SFT warm start included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("latro", "grpo", "mrt", "mrt_star", "star", "grpo_matched")


def run_job(workdir: str, config: str, seed: int, stage: str, extra: list[str]) -> dict:
    """One training job (skipped when its results.json already holds `stage`)."""
    results_path = os.path.join(workdir, "results.json")
    if os.path.exists(results_path) and stage in json.load(open(results_path)) and \
            os.path.exists(os.path.join(workdir, "hf")):
        return json.load(open(results_path))
    os.makedirs(workdir, exist_ok=True)
    sft = os.path.join(os.path.dirname(workdir), "sft", "hf")
    if stage != "sft" and not os.path.exists(results_path):  # the warm start is evaluated once
        warm = os.path.join(os.path.dirname(workdir), "sft")
        warm_results = json.load(open(os.path.join(warm, "results.json")))
        with open(results_path, "w") as f:
            json.dump({"init": warm_results["sft"]}, f, indent=2)
        os.makedirs(os.path.join(workdir, "eval", "init"), exist_ok=True)  # with the settings it ran with
        shutil.copy(os.path.join(warm, "eval", "sft", "settings.json"), os.path.join(workdir, "eval", "init"))
    warm = [] if stage == "sft" else [f"--config.model.path={sft}", f"--config.tokenizer.path={sft}",
                                      "--config.tokenizer.build="]
    cmd = [sys.executable, "-m", "latro_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.seed={seed}", f"--config.stages={stage}", *warm, *extra]
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=log)
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code}); see {workdir}/log.txt")
    return json.load(open(results_path))


def wall_time(workdir: str, stage: str) -> tuple[float, int, float]:
    """(seconds of the run's updates, updates, sampled + scored tokens) of a run."""
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if r["stage"] == stage and "update_s" in r]
    seconds = sum(r["update_s"] for r in rows)
    tokens = sum(r.get("sampled_tokens", 0) + r.get("scored_tokens", 0) for r in rows)
    return seconds, len(rows), tokens


def episode_stats(workdir: str, name: str) -> dict[str, float]:
    """From eval/<name>/examples.jsonl: shares of restate / slip episodes in the greedy outputs,
    mean progress per episode and the share of negative-progress episodes (forced answers)."""
    from latro_jax.data.synthetic import episode_kind
    kinds, progress = [], []
    for line in open(os.path.join(workdir, "eval", name, "examples.jsonl")):
        forced = json.loads(line).get("forced", {})
        kinds += [episode_kind(t) for t in forced.get("pieces", [])]
        accuracy = [forced.get("empty", 0.0)] + [a for _, a in forced.get("episodes", [])]
        progress += list(np.diff(accuracy))
    share = lambda kind: kinds.count(kind) / max(len(kinds), 1)
    return {"restate_share": share("restate"), "slip_share": share("slip"),
            "mean_progress": float(np.mean(progress)) if progress else 0.0,
            "negative_progress": float(np.mean(np.array(progress) < 0)) if progress else 0.0}


def summarise(root: str, seeds: list[int], methods=METHODS) -> dict:
    table = {}
    for seed in seeds:
        base = os.path.join(root, f"s{seed}")
        sft = json.load(open(os.path.join(base, "sft", "results.json")))["sft"]
        rows = {"sft": {**sft, **episode_stats(os.path.join(base, "sft"), "sft")}}
        for method in methods:
            workdir = os.path.join(base, method)
            result = json.load(open(os.path.join(workdir, "results.json")))[method]
            seconds, updates, tokens = wall_time(workdir, method)
            rows[method] = {**result, **episode_stats(workdir, method), "wall_s": seconds, "updates": updates,
                            "tokens": tokens}
        for method, row in rows.items():
            for key, value in row.items():
                table.setdefault(method, {}).setdefault(key, []).append(value)
    return table


def print_table(table: dict) -> str:
    keys = ["greedy", "maj@4", "greedy_tokens", "regret@16", "regret@24", "regret@32", "restate_share",
            "slip_share", "mean_progress", "negative_progress", "wall_s", "tokens"]
    lines = ["method        " + "".join(f"{k:>22}" for k in keys)]
    for method, row in table.items():
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append(f"{np.mean(v):8.3g} ({np.min(v):.3g}-{np.max(v):.3g})" if v else "-")
        lines.append(f"{method:<14}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, row in table.items():
        budgets = sorted(int(k.split("@")[1]) for k in row if k.startswith("forced@"))
        if budgets:
            ax.plot(budgets, [np.mean(row[f"forced@{b}"]) for b in budgets], marker="o", label=method)
    ax.set_xlabel("token budget (thinking cut, then forced to answer)")
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default="configs/compare.py")
    parser.add_argument("--methods", default=",".join(METHODS), help="the config's stage sections to run, in order")
    parser.add_argument("--extra", action="append", default=[], help="extra flag for every run")
    args = parser.parse_args(argv)
    root, seeds = os.path.abspath(args.root), [int(s) for s in args.seeds.split(",")]
    methods = tuple(args.methods.split(","))
    if "grpo_matched" in methods and not {"grpo", "mrt"} <= set(methods[:methods.index("grpo_matched")]):
        parser.error("--methods: grpo_matched takes its update count from the grpo and mrt runs before it")
    units = [(seed, stage) for seed in seeds for stage in ("sft", *methods)]
    with tqdm(total=len(units), desc="compare", unit="run") as bar:
        for seed, stage in units:
            bar.set_postfix(seed=seed, run=stage)
            workdir = os.path.join(root, f"s{seed}", stage)
            extra = list(args.extra)
            if stage == "grpo_matched":
                mrt_s, _, _ = wall_time(os.path.join(root, f"s{seed}", "mrt"), "mrt")
                grpo_s, grpo_n, _ = wall_time(os.path.join(root, f"s{seed}", "grpo"), "grpo")
                extra.append(f"--config.grpo_matched.steps={max(1, round(mrt_s / (grpo_s / grpo_n)))}")
            run_job(workdir, args.config, seed, stage, extra)
            bar.update(1)
    table = summarise(root, seeds, methods)
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump(table, f, indent=2)
    plot(table, os.path.join(root, "compare.png"))
    print(print_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
