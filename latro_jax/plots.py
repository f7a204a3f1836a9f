"""Training curves and evaluation results of a run as one PNG (workdir/training.png)."""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(path: str) -> list[dict]:
    """The complete JSON rows of metrics.jsonl (a partial or damaged line is skipped)."""
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_run(workdir: str, curves: dict[str, tuple[str, ...]]) -> str:
    """One panel per (stage, metric) of `curves` and of validation found in metrics.jsonl
    (non-finite values marked on the axis); a bar chart of
    results.json's accuracies (greedy, maj@k); and, when evaluated, the forced-answer accuracy
    against the token budget per stage and normalised regret by cutoff."""
    rows = _rows(os.path.join(workdir, "metrics.jsonl"))
    results_path = os.path.join(workdir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    validation = sorted({k for r in rows for k in r if k.startswith("val_")})
    panels = [(stage, key) for stage, keys in curves.items() for key in (*keys, *validation)
              if any(r["stage"] == stage and key in r for r in rows)]
    extra = [name for name, prefix in (("budget", "forced@"), ("regret", "regret@"))
             if any(k.startswith(prefix) for r in results.values() for k in r)]
    n = len(panels) + 1 + len(extra)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    axes = list(axes[0])
    for ax, (stage, key) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage and key in r]
        finite = [(x, y) for x, y in pts if math.isfinite(y)]
        if finite:
            ax.plot(*zip(*finite), marker="o" if key.startswith("val_") else None)
        bad = [x for x, y in pts if not math.isfinite(y)]
        if bad:  # non-finite values: red marks on the axis
            ax.plot(bad, [0] * len(bad), "rx", transform=ax.get_xaxis_transform(), clip_on=False,
                    label="non-finite")
            ax.legend(fontsize=7)
        ax.set_title(f"{stage}: {key}", fontsize=9)
        ax.set_xlabel("update")
    ax = axes[len(panels)]
    metrics = sorted({k for r in results.values() for k in r if k == "greedy" or k.startswith("maj@")})
    width = 0.8 / max(len(metrics), 1)
    for j, m in enumerate(metrics):
        ax.bar([i + j * width for i in range(len(results))], [r.get(m, 0) for r in results.values()],
               width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results))], list(results))
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy", fontsize=9)
    ax.legend(fontsize=7)
    for ax, name in zip(axes[len(panels) + 1:], extra):
        prefix = "forced@" if name == "budget" else "regret@"
        for stage, r in results.items():
            pts = sorted((int(k.split("@")[1]), v) for k, v in r.items() if k.startswith(prefix))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=stage)
        ax.set_xlabel("token budget" if name == "budget" else "cutoff C0 (tokens)")
        ax.set_title("forced-answer accuracy" if name == "budget" else "normalised regret", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, "training.png")
    tmp = path + ".tmp.png"  # a failed write leaves the previous plot
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
