"""Faults a training job meets, and what it does: non-finite updates, damaged checkpoints, a
tokenizer that does not fit the model, prompts past the context, a changed config, a full disk,
a kill mid-line, bad inputs -- and a run killed and damaged several times that still ends with
the weights of an uninterrupted one."""

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from hf_models import SHARED, STORIES_HF
from latro_jax import checkpoint, job as jobs, run
from latro_jax.algorithms import Learner
from latro_jax.job_config import ConfigError
from test_main import ENV, ROOT, _cmd, _final_tensors, _run, _wait_for

pytestmark = pytest.mark.e2e  # the training job and CLIs as subprocesses: pytest -m 'not e2e' skips them

PHI3_TOKENIZER = os.path.join(SHARED, "tokenizers", "phi-3-mini")


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. non-finite updates
def test_a_diverging_run_stops_keeps_its_good_checkpoints_and_exports_nothing(tmp_path):
    """lr = 1e30: the first LaTRO update overflows the model, every later loss is NaN; those
    updates are not applied, the run stops after optim.max_nonfinite (3) of them with one
    message, no checkpoint is written during the streak, SFT's stay, nothing is exported."""
    workdir = tmp_path / "run"
    result = _run(workdir, "--config.latro.optim.learning_rate=1e30", "--config.eval.every=0",
                  "--config.checkpoint.every=1")
    _one_line_error(result, "3 updates in a row", "non-finite", "latro.optim.learning_rate")
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    latro = [r for r in rows if r["stage"] == "latro"]
    assert [r["nonfinite"] for r in latro] == [0.0, 1.0, 1.0, 1.0]
    assert sorted(os.listdir(workdir / "checkpoints" / "latro")) == ["1"]  # none during the streak
    assert sorted(os.listdir(workdir / "checkpoints" / "sft")) == ["3", "4"]
    assert not (workdir / "hf").exists()


def test_a_nonfinite_loss_leaves_the_state_untouched_and_is_counted():
    config = get_config()
    config.stages = "sft"
    job = jobs.build(config)
    (sft,) = job.stages
    learner = Learner(sft.algorithm, job.model, sft.config.stage.optim)
    scored = sft.algorithm.score(learner.policies(), sft.algorithm.rollout(learner.policies(), sft.examples[:8], None))
    untouched = lambda: [np.asarray(x) for x in jax.tree.leaves(
        (learner.state.step, learner.state.params, learner.state.opt_state.inner_state))]
    before = untouched()
    metrics = learner.apply(scored.__class__(scored.arrays, {"completion_tokens": 0.0}, {}))  # 0/0: NaN loss
    assert metrics["nonfinite"] == 1.0 and not np.isfinite(metrics["loss"])
    assert all((a == b).all() for a, b in zip(before, untouched()))  # params, Adam's moments, step
    assert int(learner.state.opt_state.total_notfinite) == 1  # optax.apply_if_finite counted it
    assert learner.apply(scored)["nonfinite"] == 0.0 and learner.step == 1


# ---------------------------------------------------------------- 2. damaged checkpoints
def _params_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "params" / "ocdbt.process_0" / "d") for f in fs]
    return max(files, key=os.path.getsize)


DAMAGE = {
    "random bytes in a params chunk": lambda d: _overwrite(_params_file(d)),
    "a truncated params file": lambda d: os.truncate(_params_file(d), 10),
    "missing metadata": lambda d: os.remove(d / "meta" / "metadata"),
    "missing params": lambda d: shutil.rmtree(d / "params"),
}


def _overwrite(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(np.random.RandomState(0).bytes(max(size // 3, 16)))


@pytest.fixture(scope="module")
def saved_stage(tmp_path_factory):
    """A tiny SFT learner with checkpoints at steps 1, 2, 3."""
    config = get_config()
    config.stages = "sft"
    job = jobs.build(config)
    (sft,) = job.stages
    learner = Learner(sft.algorithm, job.model, sft.config.stage.optim)
    directory = tmp_path_factory.mktemp("ckpts") / "sft"
    ckpts = checkpoint.TrainCheckpoints(str(directory), keep=5)
    states = {}
    for step in (1, 2, 3):
        learner.update(sft.examples[:8], None)
        ckpts.save(step, learner.model(), learner.state, {"step": step, "data": {}})
        states[step] = [np.asarray(x) for x in jax.tree.leaves(learner.state.params)]
    ckpts.close()
    return learner, directory, states


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(saved_stage, tmp_path, damage):
    learner, directory, states = saved_stage
    copy = tmp_path / "sft"
    shutil.copytree(directory, copy)
    DAMAGE[damage](copy / "3")
    said = []
    ckpts = checkpoint.TrainCheckpoints(str(copy), keep=5, notify=said.append)
    state, meta, _ = ckpts.restore_latest(learner.state)
    assert meta["step"] == 2 and len(said) == 1 and "checkpoint 3" in said[0] and "unusable" in said[0]
    for got, want in zip(jax.tree.leaves(state.params), states[2]):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert sorted(os.listdir(copy)) == ["1", "2", "3.unusable"]  # set aside: step 3 can be written again
    params, meta = ckpts.restore_latest_params(learner.state.params)
    assert meta["step"] == 2
    for step in ("1", "2"):
        DAMAGE["random bytes in a params chunk"](copy / step)
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint in .*step 2: .*step 1: .*Delete"):
        ckpts.restore_latest(learner.state)
    ckpts.close()


# ---------------------------------------------------------------- 3.-4. inputs that do not fit the model
def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_both_sizes():
    config = get_config()
    config.model.path, config.tokenizer.path, config.tokenizer.build = STORIES_HF, PHI3_TOKENIZER, ""
    with pytest.raises(ConfigError, match=r"ids up to 32010 .* has 512 embedding rows"):
        jobs.build(config)


def test_examples_past_the_context_are_refused_or_dropped_with_a_count(capsys):
    config = get_config()
    config.latro.max_rationale_tokens = 219  # prompt + answer take 37 or 38: 256 or 257 positions
    with pytest.raises(ConfigError, match=r"examples of the stage latro need more positions than the "
                                          r"model's max_position_embeddings = 256; the longest, 'train-\d+', needs"):
        jobs.build(config)
    config.task.too_long = "drop"
    job = jobs.build(config)
    kept = len(job.stages[1].examples)
    assert 0 < kept < 48 and f"left out {48 - kept} of 48 examples of the stage latro" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. changed configs, stale results
def test_a_changed_config_is_refused_unless_allowed_and_further_training_is_evaluated_again(tmp_path):
    workdir = tmp_path / "run"
    assert _run(workdir, "--config.eval.every=0").returncode == 0
    assert (workdir / "config.sha256").exists()
    refused = _run(workdir, "--config.eval.every=0", "--config.latro.steps=5", "--config.latro.beta=0.1")
    _one_line_error(refused, "differs in latro.beta, latro.steps", "--allow_config_change")
    harmless = _run(workdir, "--config.eval.every=0", "--config.eval.maj_k=0")  # eval only: allowed
    assert harmless.returncode == 0, harmless.stderr[-2000:]
    before = json.load(open(workdir / "results.json"))
    continued = _run(workdir, "--config.eval.every=0", "--config.eval.maj_k=0", "--config.latro.steps=5",
                     "--allow_config_change")
    assert continued.returncode == 0, continued.stderr[-2000:]
    after = json.load(open(workdir / "results.json"))
    assert before["latro"]["updates"] == 4 and after["latro"]["updates"] == 5
    assert after["sft"] == before["sft"]  # SFT did not train further: kept


# ---------------------------------------------------------------- 6.-8. disk, retention, partial lines
def test_exactly_the_last_keep_checkpoints_and_the_best_are_kept(tmp_path):
    workdir = tmp_path / "run"
    result = _run(workdir, "--config.checkpoint.every=1", "--config.checkpoint.keep=2", "--config.latro.steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    kept = sorted(int(s) for s in os.listdir(workdir / "checkpoints" / "latro"))
    assert {5, 6} <= set(kept) and len(kept) <= 3 and set(kept) <= {2, 4, 5, 6}  # 2 or 4: the best


def _no_big_files(limit):
    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def test_a_failed_write_stops_the_run_at_that_save_with_one_message(tmp_path):
    """Files may not grow past 20 kB (RLIMIT_FSIZE, a full disk as a writer sees it): the first
    checkpoint fails to write and the run stops right there -- no further update -- with one
    message that names the directory and the last good step, and nothing else: the dozens of
    tracebacks Orbax's and TensorStore's writer threads print are held back."""
    workdir = tmp_path / "run"
    result = subprocess.run(_cmd(workdir, "--config.eval.every=0", "--config.checkpoint.every=1"), cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=_no_big_files(20_000))
    _one_line_error(result, "writing checkpoint 1 to", "checkpoints/sft", "the last good checkpoint is none",
                    "File too large")
    assert len([l for l in result.stderr.splitlines() if "%|" not in l and l.strip()]) == 1  # no writer noise
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 1)]  # stopped at the failed save
    assert not (workdir / "hf").exists()


def test_writer_reports_that_come_after_a_failed_save_are_held_too(capfd):
    """A writer thread that reports after the save has raised (Orbax's signalling threads log
    as they unwind) still writes into the held output, not onto the user's stderr."""
    def late_report():
        time.sleep(0.2)
        print("Traceback: a late writer report", file=sys.__stderr__, flush=True)  # fd 2, as in a run
        os.write(2, b"E1207 a late C++ writer report\n")
    with pytest.raises(OSError):
        with checkpoint._writer_noise_held():
            threading.Thread(target=late_report).start()
            raise OSError("write failed")
    time.sleep(0.5)
    assert capfd.readouterr().err == ""


def test_too_little_free_space_for_a_checkpoint_is_refused_before_writing(monkeypatch, tmp_path):
    learner = _sft_learner()
    ckpts = checkpoint.TrainCheckpoints(str(tmp_path / "sft"))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(checkpoint.CheckpointError, match=r"needs about \d+ MiB but the disk has 0 MiB free"):
        ckpts.save(1, learner.model(), learner.state, {"step": 1, "data": {}})
    assert not os.listdir(tmp_path / "sft")


def _sft_learner():
    config = get_config()
    config.stages = "sft"
    job = jobs.build(config)
    (sft,) = job.stages
    return Learner(sft.algorithm, job.model, sft.config.stage.optim)


# ---------------------------------------------------------------- 9. errors as one message
@pytest.mark.parametrize("change,message", [
    (lambda c: c.checkpoint.update(every=0), "config.checkpoint: every=0"),
    (lambda c: c.eval.update(max_new_tokens=0), "config.eval: max_new_tokens=0"),
    (lambda c: c.latro.sampling.update(temperature=-1.0), "config.latro.sampling: temperature=-1.0 must be >= 0"),
    (lambda c: c.latro.update(sample_rows_per_call=-8), "config.latro: sample_rows_per_call=-8 must be >= 0"),
    (lambda c: c.model.update(query_chunk=-1), "config.model: query_chunk=-1 must be >= 0"),
])
def test_bad_values_fail_at_build_before_anything_runs(change, message):
    config = get_config()
    change(config)
    with pytest.raises(ConfigError, match=message):
        jobs.build(config, load_model=False)


def test_bad_inputs_give_one_line_each(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "1\\n#### 1"}\n{"question": "x", "answer": \n')
    damaged = tmp_path / "damaged"
    shutil.copytree(STORIES_HF, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.write(b"garbage!")
    gsm = ("--config.task.name=gsm8k", "--config.tokenizer.build=char")
    cases = [((f"--config.task.source={empty}", *gsm), "the file is empty"),
             ((f"--config.task.source={broken}", *gsm), "line 2 is not valid JSON"),
             ((f"--config.model.path={damaged}", "--config.tokenizer.build="), "The file is damaged"),
             (("--mode=eval",), "no such checkpoint directory")]
    for args, message in cases:
        result = _run(tmp_path / "run", *args)
        _one_line_error(result, message)
    verbose = _run(tmp_path / "run", "--mode=eval", "--verbosity=1")
    assert "Traceback" in verbose.stderr  # the traceback on request


# ---------------------------------------------------------------- 10. the smaller ones
def test_a_second_run_on_the_same_workdir_is_refused_while_the_first_runs(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for((workdir / "metrics.jsonl").exists, first)
        second = _run(workdir)
        _one_line_error(second, "is in use by another run")
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------- fault injection
def _finished_checkpoints(workdir) -> dict[str, list[int]]:
    """{stage: its finished checkpoint steps} (a write a kill interrupted has no step-named folder)."""
    root = workdir / "checkpoints"
    return {stage: sorted(int(s) for s in os.listdir(root / stage) if s.isdigit())
            for stage in (os.listdir(root) if root.exists() else [])}


def test_kills_at_random_points_and_a_damaged_checkpoint_end_as_an_uninterrupted_run(tmp_path):
    """The tiny config killed with SIGKILL three times at random points (fixed seed), then its
    newest checkpoint that has one before it damaged and a partial line left at the end of
    metrics.jsonl, then run to the end: it says which checkpoint it set aside, resumes from the
    one before, and ends with the same final weights, bit for bit, as one uninterrupted run,
    with one metrics row per update (no duplicates of redone updates, no partial line).
    Each kill comes a random 0-4 s after the process wrote a checkpoint of its own (not at a
    wall-clock time, which a loaded machine turns into 'before the first checkpoint')."""
    flags = ("--config.checkpoint.every=1", "--config.eval.every=0")
    whole = _run(tmp_path / "whole", *flags)
    assert whole.returncode == 0, whole.stderr[-2000:]
    workdir = tmp_path / "run"
    rng = random.Random(0)
    for _ in range(3):
        before = _finished_checkpoints(workdir)
        proc = subprocess.Popen(_cmd(workdir, *flags), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = time.time()
        while _finished_checkpoints(workdir) == before and proc.poll() is None:
            assert time.time() - start < 300, "no checkpoint written in 300 s"
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the newest checkpoint with an earlier one of its stage to fall back to (a stage whose
    # only checkpoint is damaged is refused, as test_a_damaged_newest_checkpoint_falls_back_to_the_
    # previous_one checks)
    stage, steps = next((s, steps) for s in ("latro", "sft")
                        if len(steps := _finished_checkpoints(workdir).get(s, [])) >= 2)
    newest = steps[-1]
    _overwrite(_params_file(workdir / "checkpoints" / stage / str(newest)))
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"stage": "latro", "step": 9, "loss": 1.')  # a kill mid-write
    final = _run(workdir, *flags)
    errors = [l for l in final.stderr.splitlines() if l.startswith("error: ")]
    assert final.returncode == 0, "\n".join(errors) or final.stderr[-3000:]
    assert f"checkpoint {newest} in" in final.stderr and "set aside" in final.stderr
    expected, got = _final_tensors(tmp_path / "whole"), _final_tensors(workdir)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    for stage in ("sft", "latro"):
        assert [r["step"] for r in rows if r["stage"] == stage and "loss" in r] == [1, 2, 3, 4]


# ---------------------------------------------------------------- second round
def test_the_runtime_needs_only_requirements_txt():
    """In a process where every installed package outside requirements.txt's dependency closure
    is unimportable (torch and what it brings, jinja2 among them; tests/requirements_only.py):
    every latro_jax module imports, and a job whose tokenizer has a chat template (Phi-3's, the
    paper recipes' kind) builds and formats its prompts with it."""
    code = f"""
import importlib, pkgutil, sys
import latro_jax
for module in pkgutil.walk_packages(latro_jax.__path__, "latro_jax."):
    importlib.import_module(module.name)
from configs.tiny import get_config
from latro_jax import job as jobs
config = get_config()
config.stages = "latro"
config.tokenizer.update(build="", path={os.path.abspath(PHI3_TOKENIZER)!r})
job = jobs.build(config, load_model=False)
assert job.fmt.chat and sys.modules["torch"] is None and sys.modules["jinja2"] is not None
print("prompt", job.fmt.decode(job.fmt.prompt_ids("2 + 2?")).count("2 + 2?"))
"""
    result = subprocess.run([sys.executable, "tests/requirements_only.py", "-c", code], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["prompt", "1"]


def test_a_signal_during_an_evaluation_stops_it_at_once(tmp_path):
    """Ctrl-C once the initial evaluation of 4,000 questions (8 a batch) is under way: it stops
    before its next batch, writes no evaluation, runs no update and exits 0 naming where it
    stopped (before this, it finished all 4,000 questions and one more update first)."""
    workdir = tmp_path / "run"
    log = open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(_cmd(workdir, "--config.task.synthetic.sizes.test=4000", "--config.eval.batch_size=8"),
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=log)
    under_way = re.compile(r"eval init: .*\| *[1-9]\d*/4000")
    try:
        start = time.time()
        while not under_way.search((tmp_path / "stderr").read_text()):
            assert proc.poll() is None and time.time() - start < 300, (tmp_path / "stderr").read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    stopped = re.search(r"stopped by a signal during the evaluation 'eval init' \(after (\d+) of 4000 questions\)", stderr)
    assert stopped and int(stopped.group(1)) < 4000 and "Traceback" not in stderr, stderr[-2000:]
    assert not (workdir / "results.json").exists() and not (workdir / "eval" / "init" / "summary.json").exists()
    assert not os.path.exists(workdir / "metrics.jsonl") or not (workdir / "metrics.jsonl").read_text()


def test_user_errors_anywhere_give_one_line(tmp_path):
    """Command-line typos and unknown values, a workdir that is a file, a data file that is not
    UTF-8: one line each, naming the argument, path or row."""
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"question": "q", "answer": "1\\n#### 1"}\n{"question": "caf\xe9", "answer": "2\\n#### 2"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(("--config.latro.nonstop_penalti=3",), "--config.latro.nonstop_penalti=3: config.latro has no field "
                                                      "'nonstop_penalti' (did you mean 'nonstop_penalty'?)"),
             (("--config.task.name=gsm9k",), "config.task: name='gsm9k': unknown task"),
             (("--config.latro.steps=many",), "--config.latro.steps=many"),
             ((f"--config.task.source={not_utf8}", "--config.task.name=gsm8k", "--config.tokenizer.build=char"),
              f"{not_utf8}: line 2 has bytes that are not UTF-8")]
    for args, message in cases:
        _one_line_error(_run(tmp_path / "run", *args), message)
    _one_line_error(_run(a_file), f"--workdir={a_file} is a file, not a folder")
    assert not (tmp_path / "run").exists()


def test_a_plot_that_cannot_be_written_keeps_the_previous_one_and_says_the_run_finished(monkeypatch, tmp_path):
    from latro_jax import plots
    (tmp_path / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 1.0}\n')
    (tmp_path / "training.png").write_bytes(b"the previous plot")

    def disk_full(path, **kw):
        open(path, "wb").write(b"half a png")
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(plots.plt.Figure, "savefig", lambda self, path, **kw: disk_full(path, **kw))
    job = type("Job", (), {"stages": [type("Stage", (), {"name": "sft", "algorithm": type("A", (), {"curves": ("loss",)})})]})
    with pytest.raises(run.OutputError, match=r"writing the training plot in .* failed \(No space left on device\); "
                                              r"the run finished"):
        run._plot(str(tmp_path), job)
    assert (tmp_path / "training.png").read_bytes() == b"the previous plot"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "training.png"]
