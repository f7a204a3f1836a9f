"""The benchmarks' model: a randomly initialised Llama (torch seed 0) saved as an HF folder, which
latro_jax and transformers both load (hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1408,
vocab 8192: the bench shape of benchmarks/latro_update.py and benchmarks/step_profile.py)."""

from __future__ import annotations

MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=8192, max_position_embeddings=2048)


def make_model(folder: str, layers: int = MODEL["num_hidden_layers"]) -> None:
    """Write the model, with `layers` decoder layers, to `folder`."""
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**MODEL, "num_hidden_layers": layers})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
