"""Building models: abstract (shapes and shardings only), randomly initialised, or from arrays."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latro_jax import sharding
from latro_jax.models.config import ConfigError, ModelConfig
from latro_jax.models.transformer import Remat, Transformer


def _construct(config: ModelConfig, dtype, param_dtype, remat: Remat, seed: int | jax.Array) -> Transformer:
    # Partition annotations are metadata only; placement happens through jit / device_put.
    with nnx.use_eager_sharding(False):
        return Transformer(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                           remat=remat, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, *, dtype="float32", param_dtype="float32",
                   remat: Remat = "none"):
    """(graphdef, abstract state): shapes, dtypes and partition annotations, no memory."""
    model = nnx.eval_shape(lambda: _construct(config, dtype, param_dtype, remat, 0))
    return nnx.split(model)


def init_model(config: ModelConfig, *, seed: int = 0, dtype="float32", param_dtype="float32",
               remat: Remat = "none", mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """A randomly initialised model (normal(initializer_range) weights, unit norms), its
    parameters sharded over `mesh` when given."""
    graphdef, initialise = _initializer(config, jnp.dtype(dtype).name, jnp.dtype(param_dtype).name, remat, mesh)
    model = nnx.merge(graphdef, initialise(jax.random.key(seed)))
    model.shard_batch(mesh)
    return model


@functools.lru_cache(maxsize=8)
def _initializer(config: ModelConfig, dtype: str, param_dtype: str, remat: Remat,
                 mesh: jax.sharding.Mesh | None):
    """(graphdef, jitted PRNG key -> parameters placed on mesh): compiled once per model shape, so
    models differing only in their seed (tests, sweeps over seeds) reuse the program."""
    graphdef, abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    shardings = None if mesh is None else sharding.param_shardings(abstract, mesh)
    return graphdef, jax.jit(lambda key: nnx.state(_construct(config, dtype, param_dtype, remat, key)),
                             out_shardings=shardings)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter, keyed by its '/'-joined path."""
    _, abstract = abstract_model(config)
    return {"/".join(str(p) for p in path): tuple(var.shape)
            for path, var in nnx.to_flat_state(abstract)}


def model_from_arrays(config: ModelConfig, get_array: Callable[[str], np.ndarray], *,
                      dtype="float32", param_dtype="float32", remat: Remat = "none",
                      mesh: jax.sharding.Mesh | None = None, source: str = "") -> Transformer:
    """A model whose parameters come from host arrays, `get_array(path)` with paths as in
    hf_mapping ('layers/attn/q_proj/kernel'), checked against the expected shapes and placed on
    `mesh` shard by shard (each process transfers only what its devices hold)."""
    graphdef, abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    shardings = None if mesh is None else sharding.param_shardings(abstract, mesh)
    flat_abstract = dict(nnx.to_flat_state(abstract))
    flat_shardings = None if shardings is None else dict(nnx.to_flat_state(shardings))
    leaves = {}
    for path, var in flat_abstract.items():
        name = "/".join(str(p) for p in path)
        arr = get_array(name)
        if tuple(arr.shape) != tuple(var.shape):
            raise ConfigError(f"{source}: parameter {name} has shape {tuple(arr.shape)}, the config "
                             f"implies {tuple(var.shape)}; config.json and the weights disagree.")
        arr = np.asarray(arr).astype(var.dtype, copy=False)
        if flat_shardings is None:
            leaves[path] = var.replace(jax.device_put(arr))
        else:
            sh = flat_shardings[path].get_value()
            leaves[path] = var.replace(
                jax.make_array_from_callback(arr.shape, sh, lambda idx, a=arr: a[idx]))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.shard_batch(mesh)
    return model


def param_arrays(model: Transformer) -> dict[str, np.ndarray]:
    """Every parameter as a host NumPy array, keyed by its '/'-joined path."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(p) for p in path): sharding.to_host(var.get_value()) for path, var in flat}
