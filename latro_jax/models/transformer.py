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

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from latro_jax.models import lora
from latro_jax.models.config import ModelConfig
from latro_jax.sharding import BATCH_AXES, data_shards
from latro_jax.models.rope import apply_rope, rope_angles

Remat = Literal["none", "full", "dots"]
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for a batch of rows sharing one write slot.

    k:       one [batch, kv_heads, head_dim, size] array per layer
    v:       one [batch, kv_heads, size, head_dim] array per layer
             (the layouts the attention matmuls consume, one array per layer so a decode step
             neither transposes nor slices the cache)
    valid:   [batch, size] bool, slots holding real (non-pad) tokens
    lengths: [batch] int32, real tokens so far (the next token's position)
    index:   [] int32, the next slot to write (the same for all rows)
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    lengths: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
        return cls(k=tuple(jnp.zeros((batch, H, D, size), dtype) for _ in range(L)),
                   v=tuple(jnp.zeros((batch, H, size, D), dtype) for _ in range(L)),
                   valid=jnp.zeros((batch, size), bool), lengths=jnp.zeros((batch,), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times consecutively (one prefill shared by n samples)."""
        rep = lambda x: jnp.repeat(x, n, axis=0)
        return KVCache(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)),
                       valid=rep(self.valid), lengths=rep(self.lengths), index=self.index)


def accumulation_dtype(dtype):
    """float32 for 16- and 32-bit compute, float64 for float64 (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def _dense(din: int, dout: int, sharding: tuple, *, config: ModelConfig, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.normal(config.initializer_range)
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      preferred_element_type=accumulation_dtype(dtype),  # callers round to their dtype
                      kernel_init=nnx.with_partitioning(init, sharding), rngs=rngs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split(x: jax.Array, axis: int, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """x cut along `axis` into consecutive pieces of `sizes` (a fused matmul's outputs). Its
    gradient concatenates the pieces' gradients; differentiating slices instead pads each to
    x's shape and adds them, which on XLA:CPU costs a pass over every padded copy."""
    return tuple(jnp.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _split_fwd(x, axis, sizes):
    return split(x, axis, sizes), None


def _split_bwd(axis, sizes, _, cotangents):
    return (jnp.concatenate(cotangents, axis=axis),)


split.defvjp(_split_fwd, _split_bwd)


def _matmul(spec: str, x, kernel: nnx.Param, dtype, out_dtype=None):
    """einsum of x and a kernel in the compute dtype, accumulated in float32 (float64 for a
    float64 model) and rounded to out_dtype (default: the compute dtype), as torch's bf16 Linear
    does. bf16 x bf16 -> f32 is also the fast path of XLA's CPU matmuls (about 2x fp32;
    bf16 -> bf16 is slower than fp32)."""
    y = jnp.einsum(spec, x.astype(dtype), kernel[...].astype(dtype),
                   preferred_element_type=accumulation_dtype(dtype))
    return y.astype(out_dtype or dtype)


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(accumulation_dtype(x.dtype))
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def _param(rngs: nnx.Rngs, shape: tuple, sharding: tuple, std: float, param_dtype) -> nnx.Param:
    init = nnx.initializers.normal(std) if std else nnx.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=sharding)


def by_query_chunks(attend, q, masks, T: int, chunk: int):
    """attend(q, masks, T) -> [B, KVH, G*T, D] computed `chunk` query positions at a time, each
    chunk rematerialised (lax.map of a checkpointed body): the scores of one chunk, [..., chunk,
    S], are all that lives at once, forward and backward, instead of [..., T, S]. q [B, KVH,
    G*T, D] (rows g-major); masks: arrays whose axis -2 is the query axis. Equal to attend(q,
    masks, T): padded query positions (T up to a multiple of chunk) attend to nothing and are
    dropped. chunk 0, or T <= chunk: attend(q, masks, T)."""
    if not chunk or T <= chunk:
        return attend(q, masks, T)
    B, KVH, GT, D = q.shape
    G, n = GT // T, -(-T // chunk)
    pad = n * chunk - T
    q = jnp.pad(q.reshape(B, KVH, G, T, D), ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    qs = q.reshape(B, KVH, G, n, chunk, D).transpose(3, 0, 1, 2, 4, 5).reshape(n, B, KVH, G * chunk, D)

    def split(m):  # [..., T, S] -> [n, ..., chunk, S]
        m = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, pad), (0, 0)])
        return jnp.moveaxis(m.reshape(*m.shape[:-2], n, chunk, m.shape[-1]), -3, 0)

    out = jax.lax.map(jax.checkpoint(lambda args: attend(args[0], args[1], chunk)), (qs, [split(m) for m in masks]))
    out = out.reshape(n, B, KVH, G, chunk, D).transpose(1, 2, 3, 0, 4, 5).reshape(B, KVH, G, n * chunk, D)
    return out[:, :, :, :T].reshape(B, KVH, G * T, D)


class Attention(nnx.Module):
    """GQA attention with one fused, head-grouped projection: qkv kernel [hidden, KVH, G+2, D]
    holds, for each kv head, its G query heads, its key and its value (query head h = kvh*G + g
    uses kv head kvh). One matmul instead of three, and sharding the KVH axis over `tensor`
    keeps every head's q, k and v on one device. query_chunk > 0: attention runs that many
    query positions at a time (by_query_chunks; Transformer.set_query_chunk)."""

    query_chunk: int = 0

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        groups = c.num_heads // c.num_kv_heads
        shape = (c.num_kv_heads, groups + 2, c.head_dim)
        self.qkv_kernel = _param(rngs, (c.hidden_size, *shape), ("fsdp", "tensor", None, None),
                                 c.initializer_range, param_dtype)
        if c.attention_bias:
            self.qkv_bias = _param(rngs, shape, ("tensor", None, None), 0.0, param_dtype)
        self.o_proj = _dense(c.num_heads * c.head_dim, c.hidden_size, ("tensor", "fsdp"),
                             config=c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype

    def __call__(self, x, rope, mask, cache):
        """x [B, T, hidden]; rope (cos, sin) of the new tokens; mask [B, T, S] (True = may
        attend); cache None or this layer's (k, v, index) laid out as KVCache.
        Returns (out [B, T, hidden], (k, v) or None)."""
        B, T, _ = x.shape
        q, k, v = self._project(x, rope)
        if cache is not None:
            k_cache, v_cache, index = cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, index))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
            cache = (k_cache, v_cache)
            k, v, q = k_cache, v_cache, q.astype(k_cache.dtype)
        out = by_query_chunks(lambda q, masks, t: self._attend(q, k, v, t, masks[0][:, None, None]), q, [mask], T,
                              self.query_chunk)
        return self._out(out, B, T), cache

    def shared_prefix(self, x_p, x_s, rope_p, rope_s, mask_p, mask_sp, mask_ss):
        """Attention of rows that share their first W tokens in groups of g consecutive rows,
        the shared part computed once per group: x_p [N, W, hidden] (each group's prefix),
        x_s [N*g, C, hidden] (each row's own tokens after it); mask_p [N, W, W], mask_sp
        [N, C, W] (row's tokens -> its group's prefix), mask_ss [N*g, C, C].
        Returns (out_p [N, W, hidden], out_s [N*g, C, hidden]), equal to attending over each
        full row [prefix | own] (gradients of the prefix sum over its g rows)."""
        N, W, _ = x_p.shape
        B, C, _ = x_s.shape
        g, acc = B // N, accumulation_dtype(self.dtype)
        q_p, k_p, v_p = self._project(x_p, rope_p)
        q_s, k_s, v_s = self._project(x_s, rope_s)
        out_p = by_query_chunks(lambda q, masks, t: self._attend(q, k_p, v_p, t, masks[0][:, None, None]), q_p,
                                [mask_p], W, self.query_chunk)

        def own(q_s, masks, t):
            """a row's queries against its group's prefix keys (no copy of them per row) and its own"""
            q_grouped = q_s.reshape(N, g, *q_s.shape[1:])
            to_prefix = jnp.einsum("ngkqd,nkds->ngkqs", q_grouped, k_p, preferred_element_type=acc)
            to_own = jnp.einsum("bkqd,bkds->bkqs", q_s, k_s, preferred_element_type=acc)
            scores = jnp.concatenate([to_prefix.reshape(B, *to_prefix.shape[2:]), to_own], axis=-1)
            probs = self._probs(scores, t, masks[0][:, None, None]).astype(v_s.dtype)
            out = (jnp.einsum("ngkqs,nksd->ngkqd", probs[..., :W].reshape(N, g, *probs.shape[1:-1], W), v_p,
                              preferred_element_type=acc).reshape(B, *probs.shape[1:-1], -1)
                   + jnp.einsum("bkqs,bksd->bkqd", probs[..., W:], v_s, preferred_element_type=acc))
            return out.astype(v_s.dtype)

        mask = jnp.concatenate([jnp.repeat(mask_sp, g, axis=0), mask_ss], axis=-1)
        out_s = by_query_chunks(own, q_s, [mask], C, self.query_chunk)
        return self._out(out_p, N, W), self._out(out_s, B, C)

    def _project(self, x, rope):
        """q [B, KVH, G*T, D] (rows g-major), k [B, KVH, D, T], v [B, KVH, T, D] of x [B, T, hidden]."""
        c = self.config
        B, T, _ = x.shape
        G = c.num_heads // c.num_kv_heads
        qkv = _matmul("bti,ikgd->btkgd", x, self.qkv_kernel, self.dtype)
        if c.attention_bias:
            qkv = qkv + self.qkv_bias[...].astype(self.dtype)
        q, k, v = split(qkv, 3, (G, 1, 1))
        q, k, v = (lora.add(y, lora.delta(self, t, x)) for t, y in zip("qkv", (q, k, v)))
        q = apply_rope(q.reshape(B, T, c.num_heads, c.head_dim), *rope)
        k = apply_rope(k.squeeze(3), *rope)  # [B, T, KVH, D]
        v = v.squeeze(3)
        q = q.reshape(B, T, c.num_kv_heads, G, c.head_dim).transpose(0, 2, 3, 1, 4)
        return q.reshape(B, c.num_kv_heads, G * T, c.head_dim), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

    def _attend(self, q, k, v, T, mask):
        """softmax(q k / sqrt(D), masked by mask as in _probs) v, in v's dtype, for q [B, KVH, G*T, D],
        k [B, KVH, D, S], v [B, KVH, S, D] -> [B, KVH, G*T, D]."""
        acc = accumulation_dtype(self.dtype)
        probs = self._probs(jnp.einsum("bkqd,bkds->bkqs", q, k, preferred_element_type=acc), T, mask)
        return jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v, preferred_element_type=acc).astype(v.dtype)

    def _probs(self, scores, T, mask):
        """softmax over keys of scaled scores [B, KVH, G*T, S], masked by mask (broadcasting
        against [B, KVH, G, T, S]); same layout out."""
        c = self.config
        B, S = scores.shape[0], scores.shape[-1]
        scores = scores.reshape(B, c.num_kv_heads, -1, T, S) * (c.head_dim ** -0.5)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        return jax.nn.softmax(scores, axis=-1).reshape(B, c.num_kv_heads, -1, S)

    def _out(self, out, B, T):
        """o_proj of attention outputs [B, KVH, G*T, D] -> [B, T, hidden]."""
        c = self.config
        out = out.reshape(B, c.num_kv_heads, -1, T, c.head_dim).transpose(0, 3, 1, 2, 4)
        out = out.reshape(B, T, c.num_heads * c.head_dim)
        return lora.add(self.o_proj(out), lora.delta(self, "o", out)).astype(self.dtype)


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one kernel [hidden, 2, I]."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.gate_up_kernel = _param(rngs, (c.hidden_size, 2, c.intermediate_size),
                                     ("fsdp", None, "tensor"), c.initializer_range, param_dtype)
        self.down_proj = _dense(c.intermediate_size, c.hidden_size, ("tensor", "fsdp"),
                                config=c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x):
        gate, up = split(_matmul("bti,icj->btcj", x, self.gate_up_kernel, self.dtype), 2, (1, 1))
        gate, up = gate.squeeze(2), up.squeeze(2)
        gate, up = lora.add(gate, lora.delta(self, "gate", x)), lora.add(up, lora.delta(self, "up", x))
        h = jax.nn.silu(gate) * up
        return lora.add(self.down_proj(h), lora.delta(self, "down", h)).astype(self.dtype)


class Block(nnx.Module):
    """Pre-norm decoder layer: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.attn = Attention(config, rngs=rngs, **kw)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x, rope, mask, cache=None):
        attn_out, cache = self.attn(self.attn_norm(x), rope, mask, cache)
        h = x + attn_out
        return h + self.mlp(self.mlp_norm(h)), cache

    def shared_prefix(self, x_p, x_s, rope_p, rope_s, mask_p, mask_sp, mask_ss):
        """The layer on prefixes x_p [N, W, hidden] shared by groups of rows and the rows' own
        tokens x_s [N*g, C, hidden] (Attention.shared_prefix)."""
        attn_p, attn_s = self.attn.shared_prefix(self.attn_norm(x_p), self.attn_norm(x_s), rope_p, rope_s,
                                                 mask_p, mask_sp, mask_ss)
        h_p, h_s = x_p + attn_p, x_s + attn_s
        return h_p + self.mlp(self.mlp_norm(h_p)), h_s + self.mlp(self.mlp_norm(h_s))


def _positions(valid: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """[B, T] int32 position of each token: offset + the number of real tokens before it
    (padding takes its next real token's, or 0 before the first)."""
    return jnp.maximum(offset + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens)` -> float32 logits [B, T, V] (causal, no padding)."""

    # lax.scan's unroll of the layer loop; compile_check unrolls small models, whose costs XLA's
    # analysis would otherwise count for one layer (it counts a loop's body once)
    scan_unroll: int | bool = 1
    # where hidden states live (shard_batch): rows over the mesh's batch axes, or None
    batch_sharding: jax.sharding.NamedSharding | None = None

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
            self.lm_head = _dense(c.hidden_size, c.vocab_size, ("fsdp", "tensor"),
                                  config=c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 valid: jax.Array | None = None) -> jax.Array:
        hidden, _ = self.hidden_states(tokens, positions=positions, valid=valid)
        return self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on final hidden states [..., hidden] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            return _matmul("...h,vh->...v", hidden, self.embed.embedding, self.dtype,
                           accumulation_dtype(self.dtype))
        return self.lm_head(hidden)

    def shard_batch(self, mesh: jax.sharding.Mesh | None) -> None:
        """Keep hidden states of more than one position per row split by rows over the mesh's
        batch axes (data, fsdp) at every layer. Without this XLA's propagation may shard them by
        the hidden axis the fsdp-sharded weights contract over, so every chip holds every row's
        activations and all-reduces them after each matmul, instead of gathering one layer's
        weights at a time (FSDP). A decode step (one position per row) is left to XLA, which
        then reduces its small activations rather than gathering every weight per token. The
        builders call it for a model placed on a mesh."""
        self.batch_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def _on_batch(self, h):
        """h (an array or a tuple of them, [rows, positions, ...]) constrained to batch_sharding,
        each array that holds more than one position per row and rows the batch axes divide
        (shared prefixes can be fewer than the devices: those are left to XLA)."""
        if self.batch_sharding is None:
            return h
        shards = data_shards(self.batch_sharding.mesh)
        pin = lambda x: (jax.lax.with_sharding_constraint(x, self.batch_sharding)
                         if x.shape[1] > 1 and x.shape[0] % shards == 0 else x)
        return jax.tree.map(pin, h)

    def set_query_chunk(self, chunk: int) -> None:
        """Attention over `chunk` query positions at a time in every layer (0: all at once): the
        memory of attention scores grows with chunk x row length instead of its square, for the
        same result (by_query_chunks). A static setting: part of the model's graph."""
        if chunk < 0:
            raise ValueError(f"query chunk {chunk} must be >= 0 (0: every query position at once)")
        self.layers.attn.query_chunk = int(chunk)

    def unstack_layers(self) -> tuple[Block, ...]:
        """The stacked layers as one Block per layer (slices of the parameters). Sampling calls
        this once outside its decode loop, so decode steps never slice parameters."""
        graphdef, params = nnx.split(self.layers)
        return tuple(nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], params))
                     for i in range(self.config.num_layers))

    def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                      valid: jax.Array | None = None, cache: KVCache | None = None,
                      layers: tuple[Block, ...] | None = None):
        """Final-normed hidden states [B, T, hidden] and the updated cache (None without one).

        valid [B, T] marks real tokens (default: all); real tokens of a row must be contiguous
        (left or right padding). positions default to the count of real tokens before each one
        (continuing from cache.lengths). Token t may attend to earlier-or-equal real tokens
        (within the sliding window, if the model has one).

        Without a cache the stacked layers run under `lax.scan` (with remat if configured): one
        compiled layer for training. With a cache they run as a loop over per-layer Blocks
        (`layers`, from unstack_layers(), or sliced here) and per-layer cache arrays.
        """
        B, T = tokens.shape
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        offset = 0 if cache is None else cache.lengths[:, None]
        if positions is None:
            positions = _positions(valid, offset)
        if cache is None:
            q_slots, k_slots, k_valid = jnp.arange(T), jnp.arange(T), valid
        else:
            q_slots = cache.index + jnp.arange(T)
            k_slots = jnp.arange(cache.valid.shape[1])
            k_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
        mask = self._allowed(q_slots, k_slots)[None] & k_valid[:, None, :]
        rope = rope_angles(self.config, positions)
        h = self._on_batch(self.embed(tokens))
        if cache is None:
            h = self._scan_layers(h, lambda block, h: block(h, rope, mask)[0])
        else:
            ks, vs = [], []
            for block, k, v in zip(layers or self.unstack_layers(), cache.k, cache.v):
                h, (k, v) = block(h, rope, mask, (k, v, cache.index))
                h = self._on_batch(h)
                ks.append(k)
                vs.append(v)
            cache = KVCache(k=tuple(ks), v=tuple(vs), valid=k_valid,
                            lengths=cache.lengths + valid.sum(axis=1, dtype=jnp.int32),
                            index=cache.index + T)
        return self.norm(h), cache

    def shared_prefix_hidden_states(self, tokens: jax.Array, valid: jax.Array, *, width: int,
                                    group: int) -> tuple[jax.Array, jax.Array]:
        """Final-normed hidden states of rows [B, T] whose first `width` columns (tokens and
        validity) are the same within each group of `group` consecutive rows, the shared
        columns computed once per group: (prefix [B / group, width, hidden], the rows' own
        columns [B, T - width, hidden]). Equal to hidden_states(tokens, valid=valid) at those
        columns, without (group - 1) / group of the prefix's work. Not for LongRoPE models,
        whose rotary table depends on each whole row."""
        if self.config.rope_scaling.rope_type == "longrope":
            raise ValueError("shared_prefix_hidden_states: LongRoPE picks its rotary factors per "
                             "whole row; use hidden_states")
        B, T = tokens.shape
        valid = valid.astype(bool)
        tok_p, valid_p = tokens[::group, :width], valid[::group, :width]
        tok_s, valid_s = tokens[:, width:], valid[:, width:]
        pos_p = _positions(valid_p)
        pos_s = _positions(valid_s, jnp.repeat(valid_p.sum(axis=1, dtype=jnp.int32), group)[:, None])
        slot_p, slot_s = jnp.arange(width), width + jnp.arange(T - width)
        mask_p = self._allowed(slot_p, slot_p)[None] & valid_p[:, None, :]
        mask_sp = self._allowed(slot_s, slot_p)[None] & valid_p[:, None, :]
        mask_ss = self._allowed(slot_s, slot_s)[None] & valid_s[:, None, :]
        rope_p, rope_s = rope_angles(self.config, pos_p), rope_angles(self.config, pos_s)
        h_p, h_s = self._scan_layers(
            self._on_batch((self.embed(tok_p), self.embed(tok_s))),
            lambda block, h: block.shared_prefix(*h, rope_p, rope_s, mask_p, mask_sp, mask_ss))
        return self.norm(h_p), self.norm(h_s)

    def _allowed(self, q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
        """[Tq, Tk] bool: a query at slot q may attend to a key at slot k (causal, within the
        sliding window if the model has one)."""
        allowed = k_slots[None, :] <= q_slots[:, None]
        if self.config.sliding_window is not None:
            allowed &= q_slots[:, None] - k_slots[None, :] < self.config.sliding_window
        return allowed

    def _scan_layers(self, h, apply_layer):
        """h (an array or a tuple of them) through the stacked layers under lax.scan, with remat if
        configured: h = apply_layer(block, h) per layer. One compiled layer for training."""
        graphdef, layer_params = nnx.split(self.layers)

        def layer_fn(h, params):
            return self._on_batch(apply_layer(nnx.merge(graphdef, params), h)), None

        if self.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=_REMAT_POLICIES[self.remat])
        return jax.lax.scan(layer_fn, h, layer_params, unroll=self.scan_unroll)[0]
