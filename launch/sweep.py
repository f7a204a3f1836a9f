r"""Grid sweep over config overrides: one workdir per point, run one after another, then a
summary table of each point's results.json.

    python launch/sweep.py --config=configs/demo.py --root=/tmp/sweep \
        --grid=latro.beta=0.05,0.25 --grid=latro.optim.learning_rate=1e-5,3e-5 \
        [--extra=--config.latro.steps=50]

Every point is run again on a re-run; a point that already ran resumes from its latest
checkpoint and keeps the evaluations in its results.json, so a sweep can be re-run after an
interruption. The table goes to stdout and <root>/summary.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grid_points(grid: list[str]) -> list[dict[str, str]]:
    axes = []
    for spec in grid:
        if "=" not in spec:
            raise SystemExit(f"--grid {spec!r}: expected field=v1,v2,...")
        field, values = spec.split("=", 1)
        axes.append([(field, v) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)]


def point_name(point: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "default"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True, help="one workdir per point under this folder")
    parser.add_argument("--grid", action="append", default=[], help="field=v1,v2,... (repeatable)")
    parser.add_argument("--extra", action="append", default=[], help="extra flag for every run")
    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)  # the runs start in the repository root
    rows = []
    for point in grid_points(args.grid):
        workdir = os.path.join(args.root, point_name(point))
        cmd = [sys.executable, "-m", "latro_jax.main", f"--config={args.config}",
               f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in point.items()], *args.extra]
        print("==>", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=ROOT)
        results_path = os.path.join(workdir, "results.json")
        results = json.load(open(results_path)) if os.path.exists(results_path) else {}
        rows.append({"point": point, "exit": code, "results": results})
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(summary_table(rows))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def summary_table(rows) -> str:
    columns = sorted({f"{stage}/{k}" for r in rows for stage, res in r["results"].items() for k in res})
    lines = ["\t".join(["point", "exit", *columns])]
    for r in rows:
        cells = []
        for col in columns:
            stage, key = col.split("/")
            value = r["results"].get(stage, {}).get(key)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append("\t".join([point_name(r["point"]), str(r["exit"]), *cells]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
