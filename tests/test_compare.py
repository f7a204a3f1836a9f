"""The comparison driver end to end on configs/compare_tiny.py: every method runs from one SFT
warm start, and the table and the figure are written."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # the training job and CLIs as subprocesses: pytest -m 'not e2e' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_comparison_runs_every_method_and_writes_the_table_and_figure(tmp_path):
    cmd = [sys.executable, "launch/compare.py", f"--root={tmp_path}", "--seeds=0",
           "--config=configs/compare_tiny.py"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.load(open(tmp_path / "table.json"))
    assert set(table) == {"sft", "latro", "grpo", "grpo_length", "mrt", "mrt_episode", "mrt_star", "star",
                          "grpo_matched"}
    for method, row in table.items():
        assert {"greedy", "maj@2", "forced@4", "regret@8", "zero_progress", "after_find_share",
                "tokens_to_grpo"} <= set(row), method
        if method != "sft":
            assert row["updates"][0] >= 1 and row["wall_s"][0] > 0 and row["tokens"][0] > 0, method
    per_update = table["grpo"]["tokens"][0] / table["grpo"]["updates"][0]  # the equal-tokens view
    assert table["grpo_matched"]["updates"][0] == max(1, round(table["mrt"]["tokens"][0] / per_update))
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert "grpo_matched" in result.stdout.splitlines()[-1]
    # every method started from the same warm start: their "init" is the SFT's evaluation
    warm = json.load(open(tmp_path / "s0" / "sft" / "results.json"))["sft"]
    for method in ("latro", "mrt", "star"):
        assert json.load(open(tmp_path / "s0" / method / "results.json"))["init"] == warm
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.load(open(tmp_path / "table.json")) == table  # resumable: nothing reruns


def test_tokens_to_reach_reads_the_forced_curve_linearly_between_budgets():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from compare import tokens_to_reach
    row = {"forced@8": 0.2, "forced@16": 0.5, "forced@32": 0.9, "greedy": 0.9}
    assert tokens_to_reach(row, 0.2) == 8 and tokens_to_reach(row, 0.1) == 8
    assert tokens_to_reach(row, 0.7) == pytest.approx(24.0) and tokens_to_reach(row, 0.5) == 16
    assert tokens_to_reach(row, 0.95) == float("inf")
