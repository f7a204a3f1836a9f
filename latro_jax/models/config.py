"""Model configuration: one frozen dataclass for every supported family, read from and written
back to a Hugging Face `config.json`.

The dataclass is hashable (it lives in the NNX graphdef, which keys jit caches), so list-valued
HF fields such as LongRoPE factors are stored as tuples.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF `architectures` value -> our family name. Each family has a weight table in hf_mapping.py.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
}
FAMILIES = {family: arch for arch, family in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class ConfigError(ValueError):
    """A model config.json that latro_jax cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_scaling` / `rope_parameters` describe it."""

    rope_type: str = "default"
    factor: float | None = None  # linear, llama3; longrope: max_position / original when None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, longrope
    short_factor: tuple[float, ...] = ()  # longrope
    long_factor: tuple[float, ...] = ()  # longrope
    attention_factor: float | None = None  # longrope


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family transformer."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; supported: {sorted(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_scaling.rope_type!r} is not supported; "
                              f"supported: {ROPE_TYPES}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = hf.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise ConfigError(
                f"{source}: architectures={archs!r} is not supported. latro_jax converts "
                f"{sorted(ARCHITECTURES)}; convert the checkpoint to one of these families first.")
        family = ARCHITECTURES[known[0]]
        if family == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 with use_sliding_window=true (per-layer windows) is "
                              "not supported; set use_sliding_window=false (as Qwen2.5 ships).")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=_rope_from_hf(rope, hf, source),
            partial_rotary_factor=partial,
            attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if family in ("mistral", "phi3") else None,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_hf_file(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON ({e}); re-export the checkpoint.") from e
        try:
            return cls.from_hf_dict(hf, source=path)
        except KeyError as e:
            raise ConfigError(f"{path} lacks the field {e}; it is not a decoder LM config.") from e

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The HF config.json for this model (the old `rope_scaling` layout, read by every
        transformers version)."""
        hf: dict[str, Any] = {
            "architectures": [FAMILIES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_to_hf(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if self.family in ("llama", "mistral"):
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.family in ("mistral", "phi3"):
            hf["sliding_window"] = self.sliding_window
        if self.family == "qwen2":
            hf["use_sliding_window"] = False
        if self.family == "phi3":
            hf["partial_rotary_factor"] = self.partial_rotary_factor
            hf["original_max_position_embeddings"] = (
                self.rope_scaling.original_max_position_embeddings or self.max_position_embeddings)
        return hf


def _rope_from_hf(rope: dict[str, Any], hf: dict[str, Any], source: str) -> RopeScaling:
    if not rope:
        return RopeScaling()
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported; "
                          f"supported: {ROPE_TYPES}")
    original = rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rope["factor"]) if rope.get("factor") is not None else None,
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original is not None else None,
        short_factor=tuple(float(x) for x in rope.get("short_factor") or ()),
        long_factor=tuple(float(x) for x in rope.get("long_factor") or ()),
        attention_factor=(float(rope["attention_factor"])
                          if rope.get("attention_factor") is not None else None),
    )


def _rope_to_hf(rope: RopeScaling) -> dict[str, Any] | None:
    if rope.rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope.rope_type}
    if rope.rope_type in ("linear", "llama3"):
        out["factor"] = rope.factor
    if rope.rope_type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.rope_type == "longrope":
        out.update(short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
        for key in ("factor", "attention_factor"):
            if getattr(rope, key) is not None:
                out[key] = getattr(rope, key)
    return out


def read_config(model_dir: str) -> ModelConfig:
    """The ModelConfig of an HF model folder, with a clear error when config.json is missing.
    Its eos_token_id holds every end id of config.json and generation_config.json (Llama-3.1
    lists <|end_of_text|>, <|eom_id|> and <|eot_id|> there)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{model_dir}: no config.json. Point the loader at a Hugging Face model folder "
            "(config.json + *.safetensors) or a hub id.")
    config = ModelConfig.from_hf_file(path)
    generation = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as f:
            eos = json.load(f).get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        merged = tuple(dict.fromkeys(config.eos_token_id + tuple(int(e) for e in eos)))
        config = dataclasses.replace(config, eos_token_id=merged)
    return config
