"""The benchmarks' model: a randomly initialised Llama (torch seed 0) saved as an HF folder, which
latro_jax and transformers both load. MODEL is the bench shape (hidden 512, 8 layers, 8 heads,
2 KV heads, intermediate 1408, vocab 8192) of benchmarks/latro_update.py, step_profile.py and
sampling.py's CPU preset."""

from __future__ import annotations

MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=8192, max_position_embeddings=2048)


def make_model(folder: str, dtype: str = "float32", **config) -> None:
    """Write the model to `folder` in `dtype`, MODEL's LlamaConfig fields overridden by `config`
    (e.g. num_hidden_layers=16)."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**MODEL, **config}))
    model.to(getattr(torch, dtype)).save_pretrained(folder)
