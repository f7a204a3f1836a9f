"""The sweep script runs a grid of the tiny config and tabulates it; the launchers parse."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import sweep  # noqa: E402
import pytest

pytestmark = pytest.mark.e2e  # the training job and CLIs as subprocesses: pytest -m 'not e2e' skips them


def test_grid_points_are_the_cartesian_product():
    points = sweep.grid_points(["latro.beta=0.05,0.25", "seed=0,1,2"])
    assert len(points) == 6 and {"latro.beta": "0.25", "seed": "2"} in points


def test_sweep_runs_one_workdir_per_point_and_summarises(tmp_path):
    """Started from another directory with a relative --root (the runs start in the repository)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"),
                             f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
                             "--root=sweep", "--grid=latro.beta=0.0,0.5",
                             "--extra=--config.latro.steps=2", "--extra=--config.export.hf=false"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(tmp_path / "sweep" / "summary.json"))
    assert [r["point"] for r in summary] == [{"latro.beta": "0.0"}, {"latro.beta": "0.5"}]
    assert all(set(r["results"]) == {"init", "sft", "latro"} for r in summary)
    assert "beta=0.5" in result.stdout.splitlines()[-1]


def test_launchers_refuse_missing_arguments():
    for script in ("launch/tpu_pod.sh", "launch/gpu_multinode.sh"):
        result = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
        assert result.returncode != 0 and result.stderr
