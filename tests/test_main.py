"""The training job end to end on configs/tiny.py: bad configs, resume after SIGKILL, SIGTERM,
export loaded by transformers."""

import ast
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from latro_jax import checkpoint

pytestmark = pytest.mark.e2e  # the training job and CLIs as subprocesses: pytest -m 'not e2e' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _cmd(workdir, *overrides, mode="train"):
    return [sys.executable, "-m", "latro_jax.main", "--config=configs/tiny.py",
            f"--workdir={workdir}", f"--mode={mode}", *overrides]


def _tensorboard_scalars(folder):
    """{tag: [(step, value)]} from the event files in `folder`: TFRecords (8-byte length, 4-byte
    CRC, an Event proto, 4-byte CRC) read with tensorboardX's own proto."""
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for name in sorted(os.listdir(folder)):
        data, at = open(os.path.join(folder, name), "rb").read(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _run(workdir, *overrides, env=ENV, **kw):
    return subprocess.run(_cmd(workdir, *overrides, **kw), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full") / "run"
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.mark.parametrize("override,message", [
    ("--config.latro.num_samples=1", "leave-one-out baselines need K >= 2"),
    ("--config.latro.beta=-0.1", "config.latro: beta=-0.1 must be >= 0"),
    ("--config.model.init.family=gpt2", "unknown model family 'gpt2'"),
    ("--config.task.source=/nonexistent/gsm8k.jsonl", "/nonexistent/gsm8k.jsonl: no such data file"),
    ("--config.latro.batch_size=3", "has 12 rows, not divisible by microbatches (1) x data-parallel devices (8)"),
    ("--config.latro.no_such_field=1", "no_such_field"),
    ("--config.tokenizer.build=bpe", "config.tokenizer: build='bpe': choose one of"),
])
def test_bad_config_values_exit_nonzero_with_one_message_and_write_nothing(tmp_path, override, message):
    workdir = tmp_path / "run"
    devices = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = _run(workdir, override, env=devices if "batch_size" in override else ENV)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not workdir.exists()


UNKNOWN_KEYS = [  # (where the key goes, the message's section)
    ("c.bogus = 1", "config"),
    ("c.model.bogus = 1", "config.model"), ("c.model.init.bogus = 1", "config.model.init"),
    ("c.tokenizer.bogus = 1", "config.tokenizer"), ("c.task.bogus = 1", "config.task"),
    ("c.task.synthetic.bogus = 1", "config.task.synthetic"), ("c.mesh.bogus = 1", "config.mesh"),
    ("c.eval.bogus = 1", "config.eval"), ("c.checkpoint.bogus = 1", "config.checkpoint"),
    ("c.export.bogus = 1", "config.export"), ("c.sft.bogus = 1", "config.sft"),
    ("c.latro.bogus = 1", "config.latro"), ("c.latro.optim.bogus = 1", "config.latro.optim"),
    ("c.latro.sampling.bogus = 1", "config.latro.sampling"),
]


@pytest.mark.parametrize("line,section", UNKNOWN_KEYS)
def test_an_unknown_key_in_any_section_is_refused_naming_section_and_key(line, section):
    from configs.tiny import get_config
    from latro_jax import job as jobs, job_config
    c = get_config()
    exec(line, {"c": c})
    with pytest.raises(job_config.ConfigError, match=rf"{section}\b.*'bogus'") as e:
        jobs.build(c)
    assert str(e.value).count("bogus") == 1 and "\n" not in str(e.value)


def test_a_config_file_with_an_unknown_key_exits_with_one_message_and_writes_nothing(tmp_path):
    config = tmp_path / "typo.py"
    config.write_text("from configs.tiny import get_config as tiny\n\n\ndef get_config():\n"
                      "    c = tiny()\n    c.latro.optim.learning_rat = 1e-3\n    return c\n")
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "latro_jax.main", f"--config={config}",
                             f"--workdir={workdir}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2 and not workdir.exists()
    assert result.stderr.strip().splitlines() == [
        "error: config.latro.optim: unknown key 'learning_rat'; the keys of this section are "
        "['b1', 'b2', 'eps', 'grad_clip', 'learning_rate', 'max_nonfinite', 'schedule', 'total_steps', "
        "'warmup_steps', 'weight_decay']."], result.stderr[-2000:]


def test_end_to_end_train_checkpoint_export_reload_with_transformers(full_run):
    workdir, result = full_run
    results = json.load(open(workdir / "results.json"))
    assert set(results) == {"init", "sft", "latro"} and all("greedy" in r for r in results.values())
    assert "stage" in result.stdout and "latro" in result.stdout  # the printed table
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    updates = [r for r in rows if r["stage"] == "latro" and "reward" in r]
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    assert {"reward", "answer_logp", "kl", "finished", "grad_norm"} <= set(updates[-1])
    # validation every 2 updates (eval.every), on the validation split, logged beside the updates
    assert [r["step"] for r in rows if r["stage"] == "latro" and "val_greedy" in r] == [2, 4]
    assert (workdir / "eval" / "latro-val-4" / "summary.json").exists()
    assert (workdir / "training.png").stat().st_size > 10_000
    scalars = _tensorboard_scalars(workdir / "tensorboard")  # TensorBoard got what metrics.jsonl got
    assert scalars["latro/reward"] == [(r["step"], pytest.approx(r["reward"], rel=1e-6)) for r in updates]
    # the export is the final LaTRO checkpoint, and transformers loads it with the tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    ids = tok("Ann has 3 apples. Ann gets 2 more. How many apples?").input_ids
    ours = checkpoint.restore_model(str(workdir / "checkpoints" / "latro"))
    np.testing.assert_allclose(np.asarray(ours(np.array([ids], np.int32))),
                               hf(torch.tensor([ids])).logits.detach().numpy(), atol=1e-4)
    assert f"exported {workdir / 'hf'}" in result.stderr
    # the export is readable by others (mkdtemp makes folders 0700)
    assert os.stat(workdir / "hf").st_mode & 0o755 == 0o755
    assert all(os.stat(workdir / "hf" / f).st_mode & 0o644 == 0o644 for f in os.listdir(workdir / "hf"))


def test_orbax_to_hf_without_a_tokenizer_warns_and_is_quiet(full_run, tmp_path):
    convert = subprocess.run([sys.executable, "-m", "latro_jax.convert", "orbax_to_hf",
                              f"--ckpt={full_run[0] / 'checkpoints' / 'latro'}", f"--out={tmp_path / 'x'}"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert convert.returncode == 0 and "warning: no --tokenizer" in convert.stderr
    assert "INFO" not in convert.stderr and (tmp_path / "x" / "model.safetensors").exists()


def _final_tensors(workdir):
    return load_file(str(workdir / "hf" / "model.safetensors"))


def _wait_for(ready, proc, timeout=300):
    """Poll ready() until it holds; fail if the process exits first or time runs out."""
    start = time.time()
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - start < timeout
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    """SIGTERM (preemption) and Ctrl-C alike: the current update is checkpointed, exit 0 with no
    traceback, and a rerun resumes to the end."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for((workdir / "checkpoints" / "sft" / "2").exists, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    if "stopped by a signal: saved" in err:  # stopped inside a stage: that step was checkpointed
        step = int(err.split("signal: saved ")[1].split()[2])
        stage = err.split("signal: saved ")[1].split()[0]
        assert (workdir / "checkpoints" / stage / str(step)).exists()
    assert not (workdir / "hf").exists() or "stopped by a signal" not in err
    resumed = _run(workdir)
    assert resumed.returncode == 0 and (workdir / "hf" / "model.safetensors").exists()


def test_every_shipped_config_has_valid_sections():
    import glob
    import importlib.util
    from latro_jax import job_config
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert len(paths) >= 21
    for path in paths:
        if path.endswith("base.py"):
            continue
        spec = importlib.util.spec_from_file_location("cfg", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, ROOT)
        spec.loader.exec_module(module)
        c = job_config.parse(module.get_config())
        if "latro_" in path and "smollm2" not in path:  # the paper's recipe: SPEC 1.5
            (stage,) = c.stages
            latro = stage.config
            assert latro.sft_coef == (1.0 if path.endswith("_csft1.py") else 0.0)  # the released code: 0
            assert (latro.num_samples, latro.max_rationale_tokens, stage.stage.batch_size) == (16, 500, 24)
            assert stage.stage.optim.learning_rate == 5e-7 and stage.stage.optim.schedule == "linear"
            assert latro.beta == (0.05 if "gsm8k" in path else 0.25)
            assert latro.sampling.temperature == 1.0 and latro.sampling.top_k == 0 and latro.sampling.top_p == 1.0
        published = {"dapo_": (512, 16, 20480, 0.28, 16), "rlpr_": (768, 8, 3072, 0.27, 4)}  # SPEC 3.2, 3.1
        for prefix, (questions, G, L, eps_high, mu) in published.items():
            if os.path.basename(path).startswith(prefix):
                (stage,) = c.stages
                cfg = stage.config
                assert (stage.stage.batch_size, cfg.rollout.num_samples, cfg.rollout.max_tokens) == (questions, G, L)
                assert (cfg.loss.clip_eps, cfg.loss.clip_eps_high, cfg.loss.updates_per_rollout) == (0.2, eps_high, mu)
                assert cfg.loss.beta == 0 and cfg.advantage_eps == 1e-6 and stage.stage.optim.learning_rate == 1e-6
                assert cfg.rollout.sampling.temperature == 1.0 and cfg.loss.aggregation == "token"
        if os.path.basename(path).startswith("verifree_"):
            (stage,) = c.stages
            cfg = stage.config
            assert (stage.stage.batch_size, cfg.num_samples, cfg.max_rationale_tokens) == (16, 8, 3000)
            assert (cfg.reward, cfg.answer_weight, stage.stage.optim.learning_rate) == ("prob", "reward", 1e-6)


def test_resume_onto_a_different_mesh_shape_ends_as_an_uninterrupted_run(tmp_path):
    """Two LaTRO updates on one device, then the same run continued to four updates on an
    8-device mesh: the second run says it resumes after update 2 (SFT is not retrained), and
    its final weights equal an uninterrupted four-update run's. --mode=export then writes the
    latest checkpoint. (Adam eps 1e-3: with 1e-8 the first steps are sign(g), which the
    summation order of 8 devices can flip for near-zero gradients.)"""
    flags = ("--config.eval.every=0", "--config.latro.optim.schedule=constant", "--config.latro.optim.eps=1e-3")
    whole = _run(tmp_path / "whole", "--config.latro.steps=4", *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]
    workdir = tmp_path / "run"
    first = _run(workdir, "--config.latro.steps=2", *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    second = _run(workdir, "--config.latro.steps=4", *flags, "--allow_config_change", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "latro: resuming after update 2 of 4" in second.stderr
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["stage"] == "latro"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["stage"] == "sft"] == [1, 2, 3, 4]
    assert sorted(os.listdir(workdir / "checkpoints" / "latro")) == ["2", "4"]
    expected, got = _final_tensors(tmp_path / "whole"), _final_tensors(workdir)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)
    shutil.rmtree(workdir / "hf")
    exported = _run(workdir, "--config.latro.steps=4", *flags, mode="export")
    assert exported.returncode == 0 and f"exported {workdir / 'hf'}" in exported.stdout, exported.stderr[-3000:]
    for name, tensor in _final_tensors(workdir).items():  # the same tensors as the run's own export
        np.testing.assert_array_equal(tensor, got[name], err_msg=name)


def test_eval_mode_of_a_bf16_run_reproduces_its_results(tmp_path):
    """--mode=eval restores the last stage's checkpoint with the config's compute dtype: a bf16
    run's evaluation gives the same accuracies and, output for output, the same generations."""
    workdir = tmp_path / "run"
    flags = ("--config.model.dtype=bfloat16", "--config.eval.every=0")
    trained = _run(workdir, *flags)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = _run(workdir, *flags, mode="eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.load(open(workdir / "results.json"))
    assert json.loads(evaluated.stdout) == {k: v for k, v in results["latro"].items() if k != "updates"}
    outputs = lambda name: [(r["greedy"]["output"], r["maj"]["outputs"])
                            for r in map(json.loads, open(workdir / "eval" / name / "examples.jsonl"))]
    assert outputs("latro-latest") == outputs("latro")
    assert len({o for _, sampled in outputs("latro") for o in sampled}) > 8  # varied generations


def test_mrt_resumes_bit_exactly_with_its_refreshed_pi_old(tmp_path):
    """MRT-RL with pi_old refreshed every 2 updates: three updates, then the run continued to
    five, ends with the same weights as five updates in one go. Update 4 samples its prefixes
    from pi_old = the weights before update 3, which only the checkpoint holds."""
    flags = ("--config.stages=sft,mrt", "--config.eval.every=0", "--config.mrt.prefix_refresh=2",
             "--config.mrt.optim.schedule=constant", "--config.checkpoint.every=1")
    whole = _run(tmp_path / "whole", "--config.mrt.steps=5", *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]
    workdir = tmp_path / "run"
    assert _run(workdir, "--config.mrt.steps=3", *flags).returncode == 0
    resumed = _run(workdir, "--config.mrt.steps=5", *flags, "--allow_config_change")
    assert resumed.returncode == 0 and "mrt: resuming after update 3 of 5" in resumed.stderr
    assert os.path.isdir(workdir / "checkpoints" / "mrt" / "5" / "old_params")
    expected, got = _final_tensors(tmp_path / "whole"), _final_tensors(workdir)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


_PROBE = """
import os, resource, sys
from latro_jax import huge_pages
huge_pages.reexec_with_huge_pages()
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2)
x = jnp.ones(2**24)  # each call's output: a fresh 64 MiB buffer, freed before the next
for _ in range(2):
    double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    double(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(repr(os.environ.get("GLIBC_TUNABLES")), os.getpid(), faults)
"""


def _probe(env):
    proc = subprocess.Popen([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    tunables, pid, faults = out.split()
    return ast.literal_eval(tunables), int(pid), int(faults), proc.pid


def test_the_job_logs_to_tensorboard_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it is installed (as it is here); the job's writer hides it:
    ~1 s and ~190 MB less per job, and no second framework beside jax in the process."""
    code = ("import sys; from latro_jax.metrics_log import Logger; log = Logger(sys.argv[1]); "
            "log.log('latro', 3, {'reward': 0.25}); log.close(); "
            "print([m for m in sys.modules if m.split('.')[0] == 'torch'])")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]"]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {"latro/reward": [(3, 0.25)]}


def test_entry_points_run_again_once_with_malloc_on_transparent_huge_pages():
    """huge_pages.reexec_with_huge_pages (main's first call) replaces the process -- same pid, so
    launchers and signals still reach it -- by itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
    where glibc >= 2.35 and transparent huge pages are on; XLA's fresh 64 MiB buffers then fault
    in as huge pages. A GLIBC_TUNABLES the user set, even empty, is kept."""
    from latro_jax import huge_pages
    plain = {k: v for k, v in ENV.items() if k != "GLIBC_TUNABLES"}
    kept, _, faults_4k, _ = _probe({**plain, "GLIBC_TUNABLES": ""})
    assert kept == ""
    tunables, pid, faults, popen_pid = _probe(plain)
    assert pid == popen_pid
    usable = huge_pages.supported()
    assert tunables == (huge_pages.TUNABLE if usable else None)
    if usable and "[madvise]" in open(huge_pages.THP_MODE).read():  # huge pages only where asked for
        assert faults_4k > 8 * 2**26 // 4096 // 2, faults_4k  # ~16384 faults per call in 4 KiB pages
        assert faults < faults_4k / 10, (faults, faults_4k)
