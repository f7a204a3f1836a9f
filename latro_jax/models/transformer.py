"""Flax NNX decoder-only transformer for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5,
Phi-3/3.5): RMSNorm, GQA attention with RoPE, SwiGLU MLP.

Layers are stacked on a leading axis and run with `jax.lax.scan` (one compiled layer however deep
the model). Every forward pass takes explicit token validity (padding) and optional positions;
the KV cache is a fixed-size pytree passed in and returned, written at one shared slot index
(prompts are left-padded, so all rows advance in lockstep).

Parameters carry partition annotations on the mesh axes `fsdp` and `tensor`
(see latro_jax/sharding.py); the stacked layer axis is never sharded.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from latro_jax.models.config import ModelConfig
from latro_jax.models.rope import apply_rope, rope_angles

Remat = Literal["none", "full", "dots"]
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for a batch of rows sharing one write slot.

    k, v:    [layers, batch, size, kv_heads, head_dim]
    valid:   [batch, size] bool, slots holding real (non-pad) tokens
    lengths: [batch] int32, real tokens so far (the next token's position)
    index:   [] int32, the next slot to write (the same for all rows)
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    lengths: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, size), bool), lengths=jnp.zeros((batch,), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times consecutively (one prefill shared by n samples)."""
        rep = lambda x, axis: jnp.repeat(x, n, axis=axis)
        return KVCache(k=rep(self.k, 1), v=rep(self.v, 1), valid=rep(self.valid, 0),
                       lengths=rep(self.lengths, 0), index=self.index)


def _dense(din: int, dout: int, sharding: tuple, *, bias: bool, config: ModelConfig, dtype,
           param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.normal(config.initializer_range)
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(init, sharding),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros, sharding[1:]),
                      rngs=rngs)


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(config=c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _dense(c.hidden_size, c.num_heads * c.head_dim, ("fsdp", "tensor"),
                             bias=c.attention_bias, **kw)
        self.k_proj = _dense(c.hidden_size, c.num_kv_heads * c.head_dim, ("fsdp", "tensor"),
                             bias=c.attention_bias, **kw)
        self.v_proj = _dense(c.hidden_size, c.num_kv_heads * c.head_dim, ("fsdp", "tensor"),
                             bias=c.attention_bias, **kw)
        self.o_proj = _dense(c.num_heads * c.head_dim, c.hidden_size, ("tensor", "fsdp"),
                             bias=False, **kw)
        self.config = config

    def __call__(self, x, cos, sin, mask, cache, layer):
        """x [B, T, hidden]; mask [B, T, S] (True = may attend); cache None or (k_all, v_all,
        index) with k_all [L, B, S, KVH, D]. Returns (out [B, T, hidden], (k_all, v_all))."""
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(B, T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(B, T, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all, index = cache
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(q.dtype)
            cache = (k_all, v_all)
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(B, T, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (c.head_dim ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, c.num_heads * c.head_dim)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(config=c, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _dense(c.hidden_size, c.intermediate_size, ("fsdp", "tensor"), **kw)
        self.up_proj = _dense(c.hidden_size, c.intermediate_size, ("fsdp", "tensor"), **kw)
        self.down_proj = _dense(c.intermediate_size, c.hidden_size, ("tensor", "fsdp"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm decoder layer: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.attn = Attention(config, rngs=rngs, **kw)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask, cache, layer):
        attn_out, cache = self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = x + attn_out
        return h + self.mlp(self.mlp_norm(h)), cache


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens)` -> float32 logits [B, T, V] (causal, no padding)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: Remat = "none", rngs: nnx.Rngs):
        if remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"remat={remat!r}; choose one of 'none', 'full', 'dots'")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        c = config
        self.embed = nnx.Embed(
            c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(c.initializer_range),
                                                 ("tensor", "fsdp")), rngs=rngs)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_layers(rngs):
            return Block(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.hidden_size, c.vocab_size, ("fsdp", "tensor"), bias=False,
                                  config=c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 valid: jax.Array | None = None) -> jax.Array:
        hidden, _ = self.hidden_states(tokens, positions=positions, valid=valid)
        return self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on final hidden states [..., hidden] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                      valid: jax.Array | None = None, cache: KVCache | None = None):
        """Final-normed hidden states [B, T, hidden] and the updated cache (None without one).

        valid [B, T] marks real tokens (default: all); real tokens of a row must be contiguous
        (left or right padding). positions default to the count of real tokens before each one
        (continuing from cache.lengths). Token t may attend to earlier-or-equal real tokens
        (within the sliding window, if the model has one).
        """
        B, T = tokens.shape
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        offset = 0 if cache is None else cache.lengths[:, None]
        if positions is None:
            positions = jnp.maximum(offset + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        if cache is None:
            q_slots, k_slots, k_valid = jnp.arange(T), jnp.arange(T), valid
        else:
            q_slots = cache.index + jnp.arange(T)
            k_slots = jnp.arange(cache.valid.shape[1])
            k_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
        mask = (k_slots[None, :] <= q_slots[:, None])
        if self.config.sliding_window is not None:
            mask &= q_slots[:, None] - k_slots[None, :] < self.config.sliding_window
        mask = mask[None] & k_valid[:, None, :]
        cos, sin = rope_angles(self.config, positions)

        graphdef, layer_params = nnx.split(self.layers)

        def layer_fn(carry, xs):
            h, kv = carry
            params, layer = xs
            block = nnx.merge(graphdef, params)
            cache_in = None if kv is None else (*kv, cache.index)
            h, kv = block(h, cos, sin, mask, cache_in, layer)
            return (h, kv), None

        if self.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=_REMAT_POLICIES[self.remat])
        h = self.embed(tokens)
        kv = None if cache is None else (cache.k, cache.v)
        layer_ids = jnp.arange(self.config.num_layers)
        (h, kv), _ = jax.lax.scan(layer_fn, (h, kv), (layer_params, layer_ids))
        h = self.norm(h)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], valid=k_valid,
                            lengths=cache.lengths + valid.sum(axis=1, dtype=jnp.int32),
                            index=cache.index + T)
        return h, cache
