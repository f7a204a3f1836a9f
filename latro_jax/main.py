r"""The training job.

    python -m latro_jax.main --config=configs/demo.py --workdir=/tmp/latro_demo
    python -m latro_jax.main --config=configs/latro_gsm8k_phi35.py --workdir=... \
        --config.model.path=/data/Phi-3.5-mini-instruct --config.latro.beta=0.05
    python -m latro_jax.main --mode=eval   --config=... --workdir=...   # evaluate the latest checkpoint
    python -m latro_jax.main --mode=export --config=... --workdir=...   # export it to <workdir>/hf

Every config field can be overridden with --config.a.b=value; the config is validated (and the
model, tokenizer and data are loaded) before anything is written to the workdir. Re-running the
same command resumes from the newest usable checkpoint (a changed config needs
--allow_config_change; later stages of a stage that trains further train again, stages whose
evaluation settings changed are evaluated again); SIGTERM or Ctrl-C saves a checkpoint (or cuts
an evaluation short) and exits cleanly. Eval and export take the workdir's lock and use the run's
own tokenizer. A user error (flags, config, data, workdir, checkpoint, a full disk, non-finite
training) prints one line and exits 2; --verbosity=1 adds the traceback.
Multi-process runs (TPU pods, multi-node GPU): launch the same command on every process with
--multi_process (jax.distributed.initialize reads the cluster from the environment).
"""

from __future__ import annotations

import errno
import json
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, results, export.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
flags.DEFINE_bool("multi_process", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_bool("allow_config_change", False,
                  "Continue a workdir whose run had a config that trains differently.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    import jax
    if FLAGS.multi_process:
        _initialize_distributed(jax)
    from latro_jax import checkpoint, job as jobs, models, run, run_dir, run_results
    from latro_jax.data import DataError
    expected = (jobs.ConfigError, models.ConfigError, DataError, FileNotFoundError, checkpoint.CheckpointError,
                run.NonFiniteError, run_dir.WorkdirError, run.OutputError)
    workdir = os.path.abspath(FLAGS.workdir)
    try:
        job = jobs.build(FLAGS.config, load_model=FLAGS.mode == "train")
        if FLAGS.mode == "train":
            results = run.train(job, workdir, allow_config_change=FLAGS.allow_config_change)
            if jax.process_index() == 0:
                print(run_results.results_table(results))
        else:  # both write into the workdir: not while a run holds it
            lock = run_dir.lock(workdir) if os.path.isdir(workdir) else None
            try:
                model = jobs.restore_final(job, workdir)
                if FLAGS.mode == "eval":
                    print(json.dumps(run.evaluate_final(job, model, workdir), indent=2))
                else:
                    print(f"exported {run.export(model, workdir, job.config.export.peft, job.config.model.path)}")
            finally:
                if lock is not None:
                    lock.close()
    except run.Preempted as e:
        print(str(e), file=sys.stderr)
    except expected as e:
        if FLAGS["verbosity"].present and FLAGS.verbosity >= 1:
            traceback.print_exc()
        else:  # a failed save's writer tasks are reported here, not again as asyncio noise at exit
            std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder turned read-only under a write of the job's own
        if e.errno not in WRITE_FAILURES:
            raise
        print(f"error: writing {e.filename or 'into the workdir'} failed ({e.strerror}); what was written "
              "before it (checkpoints, results) is intact: free disk space or fix the permissions, then "
              "rerun to resume.", file=sys.stderr)
        return 2
    return 0


WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every failure as one line and exit status 2: unknown flags and
    values, a config file that does not load, a --config.<path> override naming no config field
    (with ml_collections' suggestion when it has one)."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises on first use
        return rest
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        message = _override_error(e, argv)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _override_error(error: BaseException, argv: list[str]) -> str:
    """What a failed config load or --config.<path>=value override means, naming the argument."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]  # ml_collections wraps the KeyError that holds the suggestion
    text = str(error.args[0]) if error.args else str(error)
    key = re.search(r"'([^']+)'", text)
    for arg in argv if key else ():
        path = arg.split("=")[0][2:].split(".")
        if arg.startswith("--config.") and key.group(1) in path[1:]:
            section = ".".join(path[:path.index(key.group(1), 1)])
            suggestion = re.search(r'Did you mean "([^"]+)"', text)
            hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
            return f"{arg}: {section} has no field {key.group(1)!r}{hint}; its fields are in the config file."
    return f"--config: {text.replace('config_config', FLAGS['config'].serialize().split('=', 1)[-1])}"


def _initialize_distributed(jax) -> None:
    """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID when set (launch/gpu_multinode.sh, tests), else auto-detected (TPU, SLURM)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs
    if "JAX_NUM_PROCESSES" in os.environ:
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


if __name__ == "__main__":
    from latro_jax.huge_pages import reexec_with_huge_pages
    reexec_with_huge_pages()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
