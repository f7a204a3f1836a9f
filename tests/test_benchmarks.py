"""The benchmark scripts run at small shapes and print the measurements their docstrings and
docs/performance.md describe (their figures are taken on the real shapes by hand; here only that they run
and report what they measured)."""

import json
import os
import subprocess
import sys

import numpy as np

from latro_jax import huge_pages
import pytest

pytestmark = pytest.mark.e2e  # the training job and CLIs as subprocesses: pytest -m 'not e2e' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# the scripts re-execute with malloc on transparent huge pages, as the job does (latro_jax.huge_pages)
MALLOC = os.environ.get("GLIBC_TUNABLES", huge_pages.TUNABLE if huge_pages.supported() else None)


def _lines(script, *flags):
    result = subprocess.run([sys.executable, os.path.join("benchmarks", script), *flags], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_latro_update_times_both_implementations_and_reports_their_ratio():
    lines = _lines("latro_update.py", "--questions=2", "--samples=2", "--prompt_tokens=8",
                   "--rationale_tokens=4", "--answer_tokens=2", "--rounds=2", "--layers=2")
    *rounds, summary = lines
    assert [(r["impl"], r["round"]) for r in rounds] == [
        ("latro_jax", 0), ("torch", 0), ("latro_jax", 1), ("torch", 1)]
    shape = dict(N=2, K=2, P=8, L=4, A=2, microbatches=1, layers=2)
    for r in rounds:
        assert {k: r[k] for k in shape} == shape
        parts = [r["sample_s"], r["score_s"], r["step_s"]]
        assert min(parts) > 0 and abs(sum(parts) - r["total_s"]) < 3e-3, r  # each rounded to 1 ms
    totals = {impl: [r["total_s"] for r in rounds if r["impl"] == impl] for impl in ("latro_jax", "torch")}
    assert abs(summary["latro_jax_median_s"] - np.median(totals["latro_jax"])) < 1.5e-3
    ratio = np.median(totals["torch"]) / np.median(totals["latro_jax"])
    assert abs(summary["ratio_torch_over_latro_jax"] - ratio) < 0.02 and summary["peak_rss_gb"] > 0
    assert summary["glibc_tunables"] == MALLOC


def test_step_profile_times_the_step_and_splits_it_by_op_kind():
    lines = _lines("step_profile.py", "--rows=4", "--tokens=16", "--repeats=1", "--group=2",
                   "--prompt_width=8", "--remat=dots", "--top=3")
    forward, backward, kinds, slowest = lines
    assert (forward["call"], backward["call"]) == ("forward", "forward+backward")
    assert forward["shared_prefix"] == [8, 2] and 0 < forward["wall_s"] and 0 < backward["wall_s"]
    assert forward["glibc_tunables"] == backward["glibc_tunables"] == MALLOC
    (by_kind,) = kinds.values()
    assert any(k.startswith("dot") and v > 0 for k, v in by_kind.items()), by_kind
    (top,) = slowest.values()
    assert len(top) == 3
