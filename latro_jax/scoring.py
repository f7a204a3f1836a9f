"""Log-probabilities of rows under any parameters: the one place every algorithm scores tokens.

    scorer = Scorer(graphdef, model.config, microbatches=8, mesh=mesh)
    z_logp, y_logp = scorer.span_logprobs(params, rows.arrays(), ("rationale_mask", "answer_mask"))
    ref_z_logp, = scorer.span_logprobs(reference_params, rows.arrays(), ("rationale_mask",))

`Scorer` runs logprobs.token_logprobs (the pure function a loss differentiates) without
gradients over a batch of host rows, micro-batch by micro-batch, each micro-batch's rows split
over the mesh's data axes, for the policy, the reference or an old policy alike.
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import jax
import numpy as np
from flax import nnx

from latro_jax import sampling, sharding
from latro_jax.logprobs import span_logprob, token_logprobs
from latro_jax.models import ModelConfig, Transformer
from latro_jax.usage import Usage

if TYPE_CHECKING:  # rows are built in rollout.py, above this module
    from latro_jax.rollout import Rows


def prefix_sharing(config: ModelConfig, rows: Rows, samples: int, *, microbatches: int = 1,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[int, int] | None:
    """token_logprobs' shared_prefix (W, g) for rows whose first W = rows.prompt_width columns
    repeat in runs of `samples` consecutive rows (sharing_group's rule). Raises ValueError when
    the prompt columns do not repeat."""
    width, tokens = rows.prompt_width, rows.tokens
    shared = sharing_group(config, width, samples, len(tokens), microbatches=microbatches, mesh=mesh)
    if shared is None:
        return None
    for name in ("tokens", "valid"):
        prompts = getattr(rows, name)[:, :width].reshape(-1, samples, width)
        if not (prompts == prompts[:, :1]).all():
            raise ValueError(f"prefix_sharing: the rows' first {width} {name} columns are not the same "
                             f"within each run of {samples} rows")
    return shared


def sharing_group(config: ModelConfig, width: int, samples: int, rows: int, *, microbatches: int = 1,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[int, int] | None:
    """(W, g) for `rows` rows whose first `width` columns repeat in runs of `samples`, split into
    `microbatches` and each over the mesh's data axes: g is the largest divisor of `samples`
    whose groups each device's rows hold whole. None when nothing would be shared (g = 1) or the
    model uses LongRoPE (its rotary factors depend on each whole row)."""
    group = math.gcd(samples, rows // microbatches // sharding.data_shards(mesh))
    if group < 2 or width < 1 or config.rope_scaling.rope_type == "longrope":
        return None
    return width, group


def padded_rows(rows: int, microbatches: int = 1, mesh: jax.sharding.Mesh | None = None) -> int:
    """`rows` rounded up to a multiple of micro-batches x data shards and of 8: the count a
    scorer pads any number of rows to, so few shapes compile."""
    multiple = math.lcm(microbatches * sharding.data_shards(mesh), sampling.BATCH_MULTIPLE)
    return sampling.round_up(rows, multiple)


class Scorer:
    """Scores host rows (dicts of [B, S] arrays holding at least `tokens` and `valid`) under
    given parameters of one model graph (of `config`), without gradients. Each call's seconds
    and real tokens go to `usage` (with_usage gives a scorer sharing the compiled programs that
    records into another)."""

    def __init__(self, graphdef: Any, config: ModelConfig, *, microbatches: int = 1,
                 mesh: jax.sharding.Mesh | None = None, chunk_size: int = 128, usage: Usage | None = None):
        self.graphdef, self.config, self.microbatches, self.mesh = graphdef, config, microbatches, mesh
        self.usage = usage or Usage()

        def tokens_fn(params, tokens, valid, *, temperature, shared_prefix=None):
            return token_logprobs(nnx.merge(graphdef, params), tokens, valid, chunk_size=chunk_size,
                                  temperature=temperature, shared_prefix=shared_prefix)

        def spans_fn(params, tokens, valid, masks, *, temperature, shared_prefix):
            logp = tokens_fn(params, tokens, valid, temperature=temperature, shared_prefix=shared_prefix)
            return tuple(span_logprob(logp, m) for m in masks)

        self._tokens = jax.jit(tokens_fn, static_argnames=("temperature", "shared_prefix"))
        self._spans = jax.jit(spans_fn, static_argnames=("temperature", "shared_prefix"))

    def with_usage(self, usage: Usage) -> "Scorer":
        other = copy.copy(self)
        other.usage = usage
        return other

    def model(self, params: Any) -> Transformer:
        """The model of this scorer's graph with `params`."""
        return nnx.merge(self.graphdef, params)

    def _microbatches(self, arrays: dict[str, np.ndarray], names: Sequence[str]):
        placed = sharding.split_microbatches({k: arrays[k] for k in names}, self.microbatches, self.mesh)
        return [{k: v[m] for k, v in placed.items()} for m in range(self.microbatches)]

    def padded(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows padded (with empty rows) to padded_rows's count, so any number of rows scores in
        few compiled shapes (the first rows of the result are the given ones)."""
        n = len(arrays["tokens"])
        target = padded_rows(n, self.microbatches, self.mesh)
        return {k: np.concatenate([v, np.zeros((target - n, *v.shape[1:]), v.dtype)]) for k, v in arrays.items()}

    def prefix_sharing(self, rows: Rows, samples: int) -> tuple[int, int] | None:
        """prefix_sharing for rows split as this scorer (and the step, under the same Context)
        splits them."""
        return prefix_sharing(self.config, rows, samples, microbatches=self.microbatches, mesh=self.mesh)

    def token_logprobs(self, params, arrays: dict[str, np.ndarray], *, temperature: float = 1.0,
                       shared_prefix: tuple[int, int] | None = None) -> np.ndarray:
        """[B, S] float32: log-probability of every token given the tokens before it (0 in the
        shared prompt columns with shared_prefix)."""
        started = time.perf_counter()
        parts = [self._tokens(params, mb["tokens"], mb["valid"], temperature=float(temperature),
                              shared_prefix=shared_prefix)
                 for mb in self._microbatches(arrays, ("tokens", "valid"))]
        out = np.concatenate([sharding.to_host(p) for p in parts])
        self.usage.scored(started, np.asarray(arrays["valid"]).sum())
        return out

    def span_logprobs(self, params, arrays: dict[str, np.ndarray], masks: Sequence[str], *,
                      temperature: float = 1.0, shared_prefix: tuple[int, int] | None = None
                      ) -> tuple[np.ndarray, ...]:
        """One [B] array per mask name: the sum of each row's token log-probabilities under it
        (e.g. masks=("rationale_mask", "answer_mask") gives log pi(z|x), log pi(y|x+z)).
        shared_prefix (prefix_sharing's): the rows' shared prompt columns run once per group
        (the masks must be 0 there)."""
        started = time.perf_counter()
        parts = [self._spans(params, mb["tokens"], mb["valid"], tuple(mb[m] for m in masks),
                             temperature=float(temperature), shared_prefix=shared_prefix)
                 for mb in self._microbatches(arrays, ("tokens", "valid", *masks))]
        out = tuple(np.concatenate([sharding.to_host(p[i]) for p in parts]) for i in range(len(masks)))
        self.usage.scored(started, np.asarray(arrays["valid"]).sum())
        return out
