"""LoRA adapters (Hu et al. 2021) as PEFT applies them: a target projection y = x W becomes
y = x W + (alpha / r) (x A) B, with A [in, r] drawn uniform(+-1/sqrt(in)) (PEFT's default,
kaiming-uniform with a = sqrt(5)) and B [r, out] zero, so an adapted model starts equal to its
base. Targets: q, k, v, o (attention), gate, up, down (MLP); B keeps our output layout (q:
[r, KVH, G, D], k and v: [r, KVH, 1, D], gate and up: [r, I]) and both matrices are sharded as
the rows (A) and columns (B) of their base kernel are.

    lora.attach(model, LoRAConfig(rank=8, alpha=16), seed=0)   # adapters added in place
    plain = lora.merged(model)      # W + (alpha / r) A B folded in: a model without adapters

When a model has adapters, only they train (`trainable`): the base is frozen and shared by the
policy, the reference and pi_old (whose own copies are of the adapters alone).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank: r (0: no adapters, every weight trains); alpha: the scale's numerator (scale =
    alpha / r, PEFT's default); targets: the projections that get adapters; dtype: the
    adapters' storage dtype."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    dtype: str = "float32"

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"rank={self.rank} must be >= 0 (0: no adapters, full fine-tuning)")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"targets={self.targets}: choose a non-empty subset of {TARGETS}")
        if self.rank and self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if jnp.dtype(self.dtype).kind != "f":
            raise ValueError(f"dtype={self.dtype!r} must be a float dtype")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAWeight(nnx.Variable):
    """An adapter matrix (A or B). Not an nnx.Param: filters on Param see the base alone."""


class Adapters(nnx.Module):
    """The A and B matrices of one module's targets (stacked over layers like their base)."""

    def __init__(self, scale: float, dtype, weights: dict[str, tuple[LoRAWeight, LoRAWeight]]):
        self.scale = float(scale)
        self.dtype = dtype
        self.targets = tuple(sorted(weights))
        for target, (a, b) in weights.items():
            setattr(self, f"{target}_a", a)
            setattr(self, f"{target}_b", b)

    def delta(self, target: str, x: jax.Array) -> jax.Array | None:
        """scale (x A) B [..., *out] of x [..., in] in the compute dtype (accumulated in float32),
        or None when `target` has no adapter."""
        if target not in self.targets:
            return None
        acc = jnp.promote_types(self.dtype, jnp.float32)
        a, b = getattr(self, f"{target}_a")[...], getattr(self, f"{target}_b")[...]
        h = jnp.einsum("...i,ir->...r", x.astype(self.dtype), a.astype(self.dtype),
                       preferred_element_type=acc).astype(self.dtype)
        y = jnp.tensordot(h, b.astype(self.dtype), axes=1, preferred_element_type=acc)
        return (self.scale * y).astype(self.dtype)


def delta(module, target: str, x: jax.Array) -> jax.Array | None:
    """The adapter term of `target` for input x of an Attention or MLP module (None without one)."""
    found = getattr(module, "lora", None)
    return None if found is None else found.delta(target, x)


def add(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    """y + delta (y unchanged without an adapter), in y's dtype."""
    return y if delta is None else (y + delta).astype(y.dtype)


def shapes(config) -> dict[str, dict[str, tuple]]:
    """Per module ("attn", "mlp") of a model of `config` (a ModelConfig): target -> (in dim, out
    shape, in axis name, out axis names), the axis names those of the base kernel's rows and
    columns."""
    c = config
    G = c.num_heads // c.num_kv_heads
    return {"attn": {"q": (c.hidden_size, (c.num_kv_heads, G, c.head_dim), "fsdp", ("tensor", None, None)),
                     "k": (c.hidden_size, (c.num_kv_heads, 1, c.head_dim), "fsdp", ("tensor", None, None)),
                     "v": (c.hidden_size, (c.num_kv_heads, 1, c.head_dim), "fsdp", ("tensor", None, None)),
                     "o": (c.num_heads * c.head_dim, (c.hidden_size,), "tensor", ("fsdp",))},
            "mlp": {"gate": (c.hidden_size, (c.intermediate_size,), "fsdp", ("tensor",)),
                    "up": (c.hidden_size, (c.intermediate_size,), "fsdp", ("tensor",)),
                    "down": (c.intermediate_size, (c.hidden_size,), "tensor", ("fsdp",))}}


def attach(model, config: LoRAConfig, seed: int = 0) -> None:
    """Give `model` (a Transformer) adapters for config.targets, in place: A uniform(+-1/sqrt(in))
    from key(seed), B zero, in config.dtype, placed on the model's mesh as their base kernels
    are. The model then computes exactly what it did (B = 0)."""
    if not config.rank:
        return
    if has_adapters(model):
        raise ValueError("the model already has adapters")
    L, r, dtype = model.config.num_layers, config.rank, jnp.dtype(config.dtype)
    mesh = None if model.batch_sharding is None else model.batch_sharding.mesh
    key = jax.random.key(seed)

    def weight(value: np.ndarray, axes: tuple) -> LoRAWeight:
        axes = (None, *axes)  # the stacked layer axis is never sharded
        if mesh is not None:
            value = jax.device_put(value, NamedSharding(mesh, PartitionSpec(*axes)))
        with nnx.use_eager_sharding(False):  # placed above; the annotation is metadata
            return LoRAWeight(jnp.asarray(value, dtype), out_sharding=axes)

    for module, targets in shapes(model.config).items():
        weights = {}
        for target, (din, out, in_axis, out_axes) in targets.items():
            if target not in config.targets:
                continue
            key, sub = jax.random.split(key)
            bound = 1.0 / np.sqrt(din)
            a = np.asarray(jax.random.uniform(sub, (L, din, r), jnp.float32, -bound, bound))
            weights[target] = (weight(a.astype(dtype), (in_axis, None)),
                               weight(np.zeros((L, r, *out), dtype), (None, *out_axes)))
        if weights:
            setattr(getattr(model.layers, module), "lora", Adapters(config.scale, model.dtype, weights))


def adapters(model) -> dict[str, Adapters]:
    """{"attn": ..., "mlp": ...}: the model's adapter modules (empty without LoRA)."""
    return {name: module.lora for name in ("attn", "mlp")
            if isinstance(getattr(module := getattr(model.layers, name), "lora", None), Adapters)}


def has_adapters(model) -> bool:
    return bool(adapters(model))


def trainable(model):
    """The nnx filter of what trains: the adapters when the model has them, else every Param."""
    return LoRAWeight if has_adapters(model) else nnx.Param


def weights(model) -> dict[str, tuple[jax.Array, jax.Array]]:
    """target -> its adapter's (A [L, in, r], B [L, r, *out]) arrays, for every target the model has."""
    return {t: (getattr(module, f"{t}_a")[...], getattr(module, f"{t}_b")[...])
            for module in adapters(model).values() for t in module.targets}


def config_of(model) -> LoRAConfig:
    """The LoRAConfig the model's adapters were attached with (rank 0 without adapters)."""
    found = weights(model)
    if not found:
        return LoRAConfig()
    a = next(iter(found.values()))[0]
    rank, scale = a.shape[-1], next(iter(adapters(model).values())).scale
    return LoRAConfig(rank=rank, alpha=scale * rank, targets=tuple(t for t in TARGETS if t in found), dtype=str(a.dtype))


def kernel_deltas(model) -> dict[str, jax.Array]:
    """scale A B of every adapter in our kernel layouts, stacked over layers: target -> [L, in,
    *out] (float32)."""
    scale = config_of(model).scale
    return {t: scale * jnp.einsum("lir,lr...->li...", a.astype(jnp.float32), b.astype(jnp.float32))
            for t, (a, b) in weights(model).items()}


def merged(model):
    """A model without adapters whose kernels are W + scale A B (in the base's dtype); its other
    parameters are the base's own arrays. `model` unchanged; without adapters, `model` itself."""
    if not has_adapters(model):
        return model
    deltas = kernel_deltas(model)
    plain = nnx.clone(model)  # new Variables over the same arrays
    for name in adapters(plain):
        delattr(getattr(plain.layers, name), "lora")
    attn, mlp = plain.layers.attn, plain.layers.mlp
    G = model.config.num_heads // model.config.num_kv_heads
    parts = {"q": (attn.qkv_kernel, (slice(None),) * 3 + (slice(0, G),)),
             "k": (attn.qkv_kernel, (slice(None),) * 3 + (slice(G, G + 1),)),
             "v": (attn.qkv_kernel, (slice(None),) * 3 + (slice(G + 1, G + 2),)),
             "o": (attn.o_proj.kernel, ()), "gate": (mlp.gate_up_kernel, (slice(None),) * 2 + (0,)),
             "up": (mlp.gate_up_kernel, (slice(None),) * 2 + (1,)), "down": (mlp.down_proj.kernel, ())}
    for target, change in deltas.items():
        kernel, where = parts[target]
        w = kernel[...]
        kernel[...] = w.at[where].set((w[where].astype(jnp.float32) + change).astype(w.dtype))
    return plain
