r"""MRT-RL (termination and per-episode progress), outcome-reward GRPO (plain, with a length
penalty, and given MRT's sampled tokens), MRT-STaR, STaR and LaTRO from one SFT warm start, per seed.

    python launch/compare.py --root=/tmp/compare --seeds=0,1,2 [--config=configs/compare.py] \
        [--methods=latro,grpo,...] [--extra=--config.latro.steps=40 ...]

--methods names the config's stage sections to run (default: METHODS; configs/compare_families.py
holds the likelihood-reward family and the GRPO variants).

For each seed: the SFT warm start once (<root>/s<seed>/sft), then from its export every method
in its own workdir (<root>/s<seed>/<method>), and last a GRPO run whose number of updates gives
it as many sampled + scored tokens as MRT-RL's run (grpo_matched: the equal-tokens view; the
others are at equal updates). Each run is the training job (its log in <workdir>/log.txt), so an
interrupted comparison resumes by running the same command: finished runs are skipped, a killed
one resumes from its checkpoint. The method's "init" evaluation is the warm start's. Writes
<root>/table.json and <root>/table.md (printed: mean and min-max over seeds) and draws
<root>/compare.png (forced-answer accuracy against the token budget per method, the SFT warm
start included, and the shares of zero-progress and after-find episodes in greedy outputs).
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

METHODS = ("latro", "grpo", "grpo_length", "mrt", "mrt_episode", "mrt_star", "star", "grpo_matched")
ZERO = 0.02  # |progress| below this is zero progress


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
    """From eval/<name>/examples.jsonl (greedy outputs and their greedy forced answers): the
    shares of zero-progress (|p| < ZERO) and negative-progress episodes, mean progress per
    episode, and the shares of episode kinds that spend tokens without progress by design
    (data/synthetic.py: restate, slip; a search's checks after the find and rechecks)."""
    from latro_jax.data.synthetic import episode_kinds
    kinds, progress, outputs = [], [], 0
    for line in open(os.path.join(workdir, "eval", name, "examples.jsonl")):
        row, outputs = json.loads(line), outputs + 1
        forced = row.get("forced", {})
        kinds += episode_kinds(row["prompt"], forced.get("pieces", []))
        accuracy = [forced.get("empty", 0.0)] + [a for _, a in forced.get("episodes", [])]
        progress += list(np.diff(accuracy))
    share = lambda *names: sum(kinds.count(k) for k in names) / max(len(kinds), 1)
    progress = np.array(progress)
    return {"zero_progress": float(np.mean(np.abs(progress) < ZERO)) if progress.size else 0.0,
            "negative_progress": float(np.mean(progress <= -ZERO)) if progress.size else 0.0,
            "mean_progress": float(np.mean(progress)) if progress.size else 0.0,
            "after_find_share": share("after", "recheck"), "restate_share": share("restate"),
            "slip_share": share("slip"), "episodes": len(kinds) / max(outputs, 1)}


def tokens_to_reach(row: dict, target: float) -> float:
    """The thinking budget at which the forced-answer curve (forced@b, linear between budgets)
    first reaches `target`; inf where it never does."""
    budgets = sorted(int(k.split("@")[1]) for k in row if k.startswith("forced@"))
    previous = None
    for b in budgets:
        value = row[f"forced@{b}"]
        if value >= target:
            if previous is None:
                return float(b)
            b0, v0 = previous
            return b0 + (b - b0) * (target - v0) / (value - v0)
        previous = (b, value)
    return float("inf")


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
        if "grpo" in rows:  # the budget at which each method reaches the GRPO run's final (greedy) accuracy
            for row in rows.values():
                row["tokens_to_grpo"] = tokens_to_reach(row, rows["grpo"]["greedy"])
        for method, row in rows.items():
            for key, value in row.items():
                table.setdefault(method, {}).setdefault(key, []).append(value)
    return table


def markdown_tables(table: dict) -> str:
    """The table (mean (min-max) over seeds) and the forced-answer curve (means), as Markdown."""
    def sorted_keys(prefix):
        keys = {k for row in table.values() for k in row if k.startswith(prefix)}
        return sorted(keys, key=lambda k: int(k.split("@")[1]))

    keys = ["greedy", *sorted_keys("maj@"), "greedy_tokens", "tokens_to_grpo", *sorted_keys("regret@"),
            "zero_progress", "after_find_share", "negative_progress", "wall_s", "tokens", "updates"]
    cell = lambda v: f"{np.mean(v):.3g} ({np.min(v):.3g}–{np.max(v):.3g})" if v else "–"
    lines = ["| method | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(cell(row.get(k)) for k in keys) + " |" for m, row in table.items()]
    curve = sorted_keys("forced@")
    lines += ["", "| method | " + " | ".join(curve) + " |", "| --- " * (len(curve) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{np.mean(row[k]):.3f}" if k in row else "–" for k in curve) + " |"
              for m, row in table.items()]
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    """Forced-answer accuracy against the budget per method, and per method the shares of the
    greedy outputs' episodes with zero progress and after the find (the warm start's: `sft`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for method, row in table.items():
        budgets = sorted(int(k.split("@")[1]) for k in row if k.startswith("forced@"))
        if budgets:
            ax.plot(budgets, [np.mean(row[f"forced@{b}"]) for b in budgets], marker="o", label=method)
    ax.set_xlabel("token budget (thinking cut, then forced to answer)")
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    names = [m for m in table if table[m].get("zero_progress")]
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "zero_progress", f"|progress| < {ZERO}"),
                               (0.2, "after_find_share", "checks after the find")):
        means = np.array([np.mean(table[m][key]) for m in names])
        spread = [means - [np.min(table[m][key]) for m in names], [np.max(table[m][key]) for m in names] - means]
        bars.bar(x + offset, means, width=0.4, yerr=spread, capsize=2, label=label)
    bars.set_xticks(x, names, rotation=60, fontsize=8)
    bars.set_ylabel("share of greedy outputs' episodes")
    bars.set_ylim(0, 1)
    bars.legend(fontsize=8)
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
        parser.error("--methods: grpo_matched takes its update count (MRT-RL's sampled + scored tokens over "
                     "GRPO's per update) from the grpo and mrt runs before it")
    units = [(seed, stage) for seed in seeds for stage in ("sft", *methods)]
    with tqdm(total=len(units), desc="compare", unit="run") as bar:
        for seed, stage in units:
            bar.set_postfix(seed=seed, run=stage)
            workdir = os.path.join(root, f"s{seed}", stage)
            extra = list(args.extra)
            if stage == "grpo_matched":
                _, _, mrt_tokens = wall_time(os.path.join(root, f"s{seed}", "mrt"), "mrt")
                _, grpo_n, grpo_tokens = wall_time(os.path.join(root, f"s{seed}", "grpo"), "grpo")
                extra.append(f"--config.grpo_matched.steps={max(1, round(mrt_tokens / (grpo_tokens / grpo_n)))}")
            run_job(workdir, args.config, seed, stage, extra)
            bar.update(1)
    table = summarise(root, seeds, methods)
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump(table, f, indent=2)
    plot(table, os.path.join(root, "compare.png"))
    tables = markdown_tables(table)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(tables + "\n")
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
