"""Rotary position embeddings with the scalings transformers implements (default, linear,
llama3, longrope), in the rotate-half layout of HF checkpoints.

Frequencies are computed once in NumPy (float64, then float32 like transformers); angles are
computed per call from explicit positions, so padding and KV-cache offsets need no special case.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from latro_jax.models.config import ModelConfig


def base_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """inv_freq_j = 1 / theta^(2j / d) for j < d/2, d = rotary dim."""
    d = config.rotary_dim
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
    return (1.0 / (config.rope_theta ** exponents)).astype(np.float32)


def _llama3_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Llama 3.1 scaling: wavelengths above original/low_freq_factor are divided by `factor`,
    below original/high_freq_factor kept, and smoothly interpolated in between."""
    rope = config.rope_scaling
    inv_freq = base_inverse_frequencies(config)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _longrope_attention_factor(config: ModelConfig) -> float:
    """sqrt(1 + ln(s) / ln(original)) with s = max_position / original (LongRoPE / Phi-3)."""
    rope = config.rope_scaling
    if rope.attention_factor is not None:
        return rope.attention_factor
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else config.max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """(short inv_freq, long inv_freq, attention factor). The long table is used for a row whose
    largest position in a call reaches original_max_position_embeddings (longrope only; for other
    types both tables are equal)."""
    rope = config.rope_scaling
    base = base_inverse_frequencies(config)
    if rope.rope_type == "default":
        return base, base, 1.0
    if rope.rope_type == "linear":
        return base / rope.factor, base / rope.factor, 1.0
    if rope.rope_type == "llama3":
        inv = _llama3_inverse_frequencies(config)
        return inv, inv, 1.0
    # longrope
    half = config.rotary_dim // 2
    for name in ("short_factor", "long_factor"):
        if len(getattr(rope, name)) != half:
            raise ValueError(f"longrope {name} has {len(getattr(rope, name))} entries, "
                             f"expected rotary_dim/2 = {half}")
    short = (base / np.asarray(rope.short_factor, np.float32)).astype(np.float32)
    long = (base / np.asarray(rope.long_factor, np.float32)).astype(np.float32)
    return short, long, _longrope_attention_factor(config)


def longrope_limit(config: ModelConfig) -> int:
    """Sequences longer than this use LongRoPE's long factors."""
    return config.rope_scaling.original_max_position_embeddings or config.max_position_embeddings


def uses_long_factors(config: ModelConfig, positions: jax.Array) -> jax.Array:
    """[B] bool: rows whose largest position reaches the LongRoPE limit. Decided per row, as
    transformers does for a single sequence, so a row's result does not depend on the rest of
    the batch."""
    return jnp.max(positions, axis=1) + 1 > longrope_limit(config)


def rope_angles(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, rotary_dim] (float32) for integer positions [B, T]."""
    short, long, attention_factor = rope_tables(config)
    inv_freq = jnp.asarray(short)[None, None, :]
    if config.rope_scaling.rope_type == "longrope":
        use_long = uses_long_factors(config, positions)
        inv_freq = jnp.where(use_long[:, None, None], jnp.asarray(long), inv_freq)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim]: x_rot * cos + rotate_half(x_rot) * sin on the first rotary_dim
    features; the rest pass through (partial rotary)."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    out = (x_rot.astype(acc) * cos + rotated.astype(acc) * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
