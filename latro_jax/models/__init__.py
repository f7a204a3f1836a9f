"""Llama-family decoder (Flax NNX) and two-way Hugging Face weight conversion.

    model = models.load_hf("path/to/hf_dir", dtype="float32")
    logits = model(tokens)            # int32 [B, T] -> float32 [B, T, V]
    models.save_hf(model, "out_dir", tokenizer_dir=None)
"""

from latro_jax.models import lora, peft_io
from latro_jax.models.build import abstract_model, init_model, model_from_arrays, param_arrays
from latro_jax.models.config import ConfigError, ModelConfig, RopeScaling, read_config
from latro_jax.models.hf_io import hf_state_dict, load_hf, save_hf
from latro_jax.models.transformer import KVCache, Transformer

__all__ = [
    "ConfigError", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "abstract_model",
    "hf_state_dict", "init_model", "load_hf", "lora", "model_from_arrays", "param_arrays", "peft_io",
    "read_config", "save_hf",
]
