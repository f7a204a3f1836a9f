"""A run's workdir as a record (latro_jax/run_dir.py): reruns redo what a change made stale, a
refused or failed attempt changes nothing, evaluation and export use the run's own tokenizer and
respect the run's lock, damaged records are named."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hf_models import STORIES_HF
from test_main import ENV, ROOT, _cmd, _final_tensors, _run
from test_reliability import _one_line_error

pytestmark = pytest.mark.e2e  # the training job and CLIs as subprocesses: pytest -m 'not e2e' skips them

FAST = ("--config.eval.every=0",)  # no validation: the runs below need only their final evaluations


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (SFT 4 updates, LaTRO 4), copied by each test that changes it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = _run(workdir, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _copy(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns(".lock-*"))
    return workdir


def _meta(workdir, stage, step):
    return json.load(open(workdir / "checkpoints" / stage / str(step) / "meta" / "metadata"))


# ---------------------------------------------------------------- reruns redo what is stale
def test_a_stage_trained_further_restarts_every_later_stage_even_after_a_kill_between(finished, tmp_path):
    """SFT is trained further (4 -> 6 updates) by a run that stops after SFT (as a kill between
    the stages would leave it); the next full run finds LaTRO's finished checkpoints descended
    from the old SFT, sets them aside and trains LaTRO again from the new SFT: its first update
    starts from SFT's step-6 weights, not step 4's."""
    workdir = _copy(finished, tmp_path)
    old_latro = _final_tensors(workdir)
    sft_only = _run(workdir, *FAST, "--config.stages=sft", "--config.sft.steps=6", "--allow_config_change")
    assert sft_only.returncode == 0, sft_only.stderr[-2000:]
    again = _run(workdir, *FAST, "--config.sft.steps=6", "--allow_config_change")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "latro: its checkpoints started from another model" in again.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["latro", "latro.stale", "sft"]
    assert _meta(workdir, "latro", 4)["origin"] != _meta(workdir, "latro.stale", 4)["origin"]
    new_latro = _final_tensors(workdir)
    assert any(not np.array_equal(new_latro[k], old_latro[k]) for k in old_latro)
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["stage"] == "latro"] == [1, 2, 3, 4]  # once, not twice
    results = json.load(open(workdir / "results.json"))
    assert results["sft"]["updates"] == 6
    summary = json.load(open(workdir / "eval" / "latro" / "summary.json"))
    assert results["latro"]["greedy"] == summary["greedy"]  # evaluated again after retraining
    # a third run has nothing left to do: no stage trains, nothing is set aside again
    third = _run(workdir, *FAST, "--config.sft.steps=6", "--allow_config_change")
    assert third.returncode == 0 and "set aside" not in third.stderr and "resuming" not in third.stderr
    np.testing.assert_equal(_final_tensors(workdir), new_latro)


def test_new_evaluation_settings_evaluate_every_stage_again(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    result = _run(workdir, *FAST, "--config.eval.maj_k=3")  # eval settings may change without a flag
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.load(open(workdir / "results.json"))
    for stage in ("init", "sft", "latro"):
        assert "maj@3" in results[stage] and "maj@2" not in results[stage], results[stage]
        assert json.load(open(workdir / "eval" / stage / "settings.json"))["maj_k"] == 3
    assert "resuming" not in result.stderr  # no training


# ---------------------------------------------------------------- a refused or failed attempt changes nothing
def test_an_attempt_that_cannot_start_leaves_the_workdirs_record_as_it_was(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "latro")
    (workdir / "checkpoints" / "latro").write_text("a file where the stage's checkpoints go")
    record = {name: (workdir / name).read_bytes() for name in ("config.json", "config.sha256", "results.json")}
    failed = _run(workdir, *FAST, "--config.latro.steps=5", "--allow_config_change")
    _one_line_error(failed, "cannot write checkpoints to", "checkpoints/latro")
    assert {name: (workdir / name).read_bytes() for name in record} == record
    assert "config changed" not in failed.stderr  # not announced: the run never started
    (workdir / "checkpoints" / "latro").unlink()
    refused = _run(workdir, *FAST, "--config.latro.steps=5")  # still the first run's record
    _one_line_error(refused, "differs in latro.steps")


# ---------------------------------------------------------------- the run's own tokenizer
def test_evaluation_refuses_a_tokenizer_other_than_the_runs(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    for mode in ("eval", "export"):
        result = _run(workdir, "--config.tokenizer.build=char", mode=mode)
        _one_line_error(result, "not the tokenizer this run trained with", "--config.tokenizer")
    assert not (workdir / "eval" / "latro-latest").exists()
    evaluate = [sys.executable, "-m", "latro_jax.evaluate", "--task=synthetic", "--data=synthetic", "--limit=4",
                "--maj_k=0", "--max_new_tokens=6", f"--out={tmp_path / 'out'}"]
    ckpt = f"--ckpt={workdir / 'checkpoints' / 'latro'}"
    other = subprocess.run([*evaluate, ckpt, f"--tokenizer={STORIES_HF}"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    _one_line_error(other, "not the tokenizer this run trained with", "leave --tokenizer out")
    own = subprocess.run([*evaluate, ckpt], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert own.returncode == 0, own.stderr[-2000:]  # a run's checkpoint comes with the run's tokenizer
    assert json.loads(own.stdout[own.stdout.index("{"):])["examples"] == 4


def test_the_evaluate_command_refuses_a_tokenizer_larger_than_the_model():
    phi3 = os.path.join(os.path.dirname(STORIES_HF), "..", "..", "tokenizers", "phi-3-mini")
    result = subprocess.run([sys.executable, "-m", "latro_jax.evaluate", f"--hf={STORIES_HF}",
                             f"--tokenizer={phi3}", "--data=../shared/data/gsm8k", "--limit=2"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    _one_line_error(result, "ids up to 32010", "512 embedding rows")


# ---------------------------------------------------------------- the lock
def test_eval_and_export_wait_for_the_run_that_holds_the_workdir(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(workdir / ".lock-0")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # as a training run holds it
        before = sorted(os.listdir(workdir / "eval")), (workdir / "hf" / "model.safetensors").stat().st_mtime_ns
        for mode in ("eval", "export"):
            _one_line_error(_run(workdir, mode=mode), "is in use by another run")
        after = sorted(os.listdir(workdir / "eval")), (workdir / "hf" / "model.safetensors").stat().st_mtime_ns
        assert after == before
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- damaged records
@pytest.mark.parametrize("name,fix", [("config.json", "it records the config"),
                                      ("results.json", "delete it to evaluate every stage again")])
def test_a_damaged_record_is_named(finished, tmp_path, name, fix):
    workdir = _copy(finished, tmp_path)
    (workdir / name).write_text('{"init": {"greedy": 0.')
    _one_line_error(_run(workdir, *FAST), f"{workdir / name} is damaged", fix)


def test_an_export_to_a_full_disk_leaves_the_previous_export_and_says_so(finished, tmp_path):
    from test_reliability import _no_big_files
    workdir = _copy(finished, tmp_path)
    before = {f: (workdir / "hf" / f).read_bytes() for f in os.listdir(workdir / "hf")}
    result = subprocess.run(_cmd(workdir, mode="export"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300, preexec_fn=_no_big_files(20_000))
    _one_line_error(result, f"exporting the model to {workdir / 'hf'} failed", "File too large",
                    "the run's checkpoints are intact", "--mode=export")
    assert {f: (workdir / "hf" / f).read_bytes() for f in os.listdir(workdir / "hf")} == before
    assert sorted(os.listdir(workdir)) == sorted(os.listdir(finished))  # no half-written folder beside it
