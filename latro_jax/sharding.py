"""Device mesh, parameter shardings and host transfers.

The mesh always has the three named axes (data, fsdp, tensor); any may have size 1. Parameters
are sharded by the `out_sharding` annotations the model puts on them (axis names fsdp/tensor);
batches are split over (data, fsdp).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (= the rest)."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by fsdp*tensor={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs "
                         f"{int(np.prod(sizes))} devices but {len(devices)} are available; "
                         "set the mesh sizes so their product is the device count (or use -1).")
    # Auto axes: XLA propagates shardings from the annotated parameters and batch inputs.
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def data_shards(mesh: jax.sharding.Mesh | None) -> int:
    """How many ways a batch is split: the product of the BATCH_AXES sizes (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def param_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for an (abstract) NNX state from the parameters' partition annotations."""
    return nnx.get_named_sharding(abstract_state, mesh)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Leading axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def put_global(arr: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (each process places the
    slices its devices own)."""
    arr = np.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def split_microbatches(batch: dict[str, np.ndarray], microbatches: int,
                       mesh: jax.sharding.Mesh | None) -> dict[str, jax.Array]:
    """Host rows [B, ...] -> device arrays [microbatches, B / microbatches, ...], the second
    axis split over the mesh's data axes (B must divide)."""
    out = {}
    for name, arr in batch.items():
        arr = np.asarray(arr)
        if arr.shape[0] % microbatches:
            raise ValueError(f"batch of {arr.shape[0]} rows is not divisible into "
                             f"{microbatches} micro-batches")
        arr = arr.reshape(microbatches, arr.shape[0] // microbatches, *arr.shape[1:])
        if mesh is None:
            out[name] = jax.numpy.asarray(arr)
        else:
            spec = P(None, BATCH_AXES, *([None] * (arr.ndim - 2)))
            out[name] = put_global(arr, NamedSharding(mesh, spec))
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array as a NumPy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
