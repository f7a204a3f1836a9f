"""Log-probabilities of rows under any parameters: the one place every algorithm scores tokens.

    scorer = Scorer(graphdef, model.config, microbatches=8, mesh=mesh)
    z_logp, y_logp = scorer.span_logprobs(params, rows.arrays(), ("rationale_mask", "answer_mask"))
    ref_z_logp, = scorer.span_logprobs(reference_params, rows.arrays(), ("rationale_mask",))

`token_logprobs` and `span_logprob` are the pure functions a loss differentiates; `Scorer` runs
them without gradients over a batch of host rows, micro-batch by micro-batch, each micro-batch's
rows split over the mesh's data axes, for the policy, the reference or an old policy alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latro_jax import sharding
from latro_jax.models import ModelConfig, Transformer

if TYPE_CHECKING:  # rollout imports sampling, which imports this module
    from latro_jax.rollout import Rows


def token_logprobs(model: Transformer, tokens: jax.Array, valid: jax.Array, *,
                   chunk_size: int = 128, temperature: float = 1.0,
                   shared_prefix: tuple[int, int] | None = None) -> jax.Array:
    """out[b, t] = log softmax(logits / T)[tokens[b, t]] at position t - 1, i.e. the
    log-probability of token t given tokens < t (0 at t = 0), float32 [B, T] (float64 for a
    float64 model). T = 1 leaves the logits as they are.

    shared_prefix = (W, g): rows share their first W columns in groups of g consecutive rows
    (K samples of one prompt); the prefix runs once per group
    (Transformer.shared_prefix_hidden_states) and out[:, :W] is 0 (not computed), the other
    columns as without it.

    The LM head runs over chunks of `chunk_size` positions under `jax.checkpoint`, so neither
    the forward nor the backward pass holds [B, T, V] logits, only [B, chunk, V] at a time.
    """
    B, T = tokens.shape
    if shared_prefix is None:
        hidden, _ = model.hidden_states(tokens, valid=valid)
        logp = _chunked_target_logprobs(model, hidden[:, :-1], tokens[:, 1:], chunk_size, temperature)
        return jnp.concatenate([jnp.zeros((B, 1), logp.dtype), logp], axis=1)
    width, group = shared_prefix
    h_p, h_s = model.shared_prefix_hidden_states(tokens, valid, width=width, group=group)
    # column W is predicted from the prefix's last position, column t > W from the row's t - 1
    hidden = jnp.concatenate([jnp.repeat(h_p[:, -1:], group, axis=0), h_s[:, :-1]], axis=1)
    logp = _chunked_target_logprobs(model, hidden, tokens[:, width:], chunk_size, temperature)
    return jnp.concatenate([jnp.zeros((B, width), logp.dtype), logp], axis=1)


def _chunked_target_logprobs(model: Transformer, hidden: jax.Array, targets: jax.Array,
                             chunk_size: int, temperature: float) -> jax.Array:
    """[B, T] log-probabilities of targets [B, T] under the LM head on hidden [B, T, H], one
    rematerialised chunk of positions at a time: ceil(T / chunk_size) equal chunks, so fewer
    than one position per chunk is padding (160 positions run as 2 x 80, not 2 x 128)."""
    B, T, H = hidden.shape
    n_chunks = -(-T // chunk_size)
    chunk = -(-T // n_chunks)
    pad = n_chunks * chunk - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n_chunks, chunk, H).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_logp(h_c, t_c):
        logits = model.logits(h_c)
        if temperature != 1.0:
            logits = logits / temperature
        return target_logprobs(logits, t_c)

    logp = jax.lax.map(lambda xs: chunk_logp(*xs), (h, targets))
    return logp.swapaxes(0, 1).reshape(B, n_chunks * chunk)[:, :T]


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """out[...] = log softmax(logits[..., :])[targets[...]]: each target's log-probability under
    its row of logits. Picked by a one-hot sum (exactly the same values as an indexed gather)
    so that the gradient is an elementwise select fused into the softmax's, not a scatter into
    a zero-filled [..., V] buffer."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logp, 0), axis=-1)


def prefix_sharing(config: ModelConfig, rows: Rows, samples: int, *, microbatches: int = 1,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[int, int] | None:
    """token_logprobs' shared_prefix (W, g) for rows whose first W = rows.prompt_width columns
    repeat in runs of `samples` consecutive rows, split into `microbatches` and each over the
    mesh's data axes: g is the largest divisor of `samples` whose groups each device's rows hold
    whole. None when nothing would be shared (g = 1) or the model uses LongRoPE (its rotary
    factors depend on each whole row). Raises ValueError when the prompt columns do not repeat."""
    width, tokens = rows.prompt_width, rows.tokens
    per_device = len(tokens) // microbatches // sharding.data_shards(mesh)
    group = math.gcd(samples, per_device)
    if group < 2 or width < 1 or config.rope_scaling.rope_type == "longrope":
        return None
    for name in ("tokens", "valid"):
        prompts = getattr(rows, name)[:, :width].reshape(-1, samples, width)
        if not (prompts == prompts[:, :1]).all():
            raise ValueError(f"prefix_sharing: the rows' first {width} {name} columns are not the same "
                             f"within each run of {samples} rows")
    return width, group


def span_logprob(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """log pi(span) = sum_t mask[t] * token_logp[t], per row."""
    return jnp.sum(token_logp * mask, axis=-1)


class Scorer:
    """Scores host rows (dicts of [B, S] arrays holding at least `tokens` and `valid`) under
    given parameters of one model graph (of `config`), without gradients."""

    def __init__(self, graphdef: Any, config: ModelConfig, *, microbatches: int = 1,
                 mesh: jax.sharding.Mesh | None = None, chunk_size: int = 128):
        self.config, self.microbatches, self.mesh = config, microbatches, mesh
        self.scored_tokens = 0  # real tokens scored so far (a running count, for throughput)

        def tokens_fn(params, tokens, valid, *, temperature, shared_prefix=None):
            return token_logprobs(nnx.merge(graphdef, params), tokens, valid, chunk_size=chunk_size,
                                  temperature=temperature, shared_prefix=shared_prefix)

        def spans_fn(params, tokens, valid, masks, *, temperature, shared_prefix):
            logp = tokens_fn(params, tokens, valid, temperature=temperature, shared_prefix=shared_prefix)
            return tuple(span_logprob(logp, m) for m in masks)

        self._tokens = jax.jit(tokens_fn, static_argnames=("temperature", "shared_prefix"))
        self._spans = jax.jit(spans_fn, static_argnames=("temperature", "shared_prefix"))

    def _microbatches(self, arrays: dict[str, np.ndarray], names: Sequence[str]):
        self.scored_tokens += int(np.asarray(arrays["valid"]).sum())
        placed = sharding.split_microbatches({k: arrays[k] for k in names}, self.microbatches, self.mesh)
        return [{k: v[m] for k, v in placed.items()} for m in range(self.microbatches)]

    def prefix_sharing(self, rows: Rows, samples: int) -> tuple[int, int] | None:
        """prefix_sharing for rows split as this scorer (and the step, under the same Context)
        splits them."""
        return prefix_sharing(self.config, rows, samples, microbatches=self.microbatches, mesh=self.mesh)

    def token_logprobs(self, params, arrays: dict[str, np.ndarray], *, temperature: float = 1.0,
                       shared_prefix: tuple[int, int] | None = None) -> np.ndarray:
        """[B, S] float32: log-probability of every token given the tokens before it (0 in the
        shared prompt columns with shared_prefix)."""
        parts = [self._tokens(params, mb["tokens"], mb["valid"], temperature=float(temperature),
                              shared_prefix=shared_prefix)
                 for mb in self._microbatches(arrays, ("tokens", "valid"))]
        return np.concatenate([sharding.to_host(p) for p in parts])

    def span_logprobs(self, params, arrays: dict[str, np.ndarray], masks: Sequence[str], *,
                      temperature: float = 1.0, shared_prefix: tuple[int, int] | None = None
                      ) -> tuple[np.ndarray, ...]:
        """One [B] array per mask name: the sum of each row's token log-probabilities under it
        (e.g. masks=("rationale_mask", "answer_mask") gives log pi(z|x), log pi(y|x+z)).
        shared_prefix (prefix_sharing's): the rows' shared prompt columns run once per group
        (the masks must be 0 there)."""
        parts = [self._spans(params, mb["tokens"], mb["valid"], tuple(mb[m] for m in masks),
                             temperature=float(temperature), shared_prefix=shared_prefix)
                 for mb in self._microbatches(arrays, ("tokens", "valid", *masks))]
        return tuple(np.concatenate([sharding.to_host(p[i]) for p in parts]) for i in range(len(masks)))
