"""Log-probabilities of tokens under a model: the pure functions every loss differentiates and
the sampler and the scorer run. Nothing here knows rows, batches or algorithms.

    logp = token_logprobs(model, tokens, valid)      # [B, T]: log pi(token t | tokens < t)
    z_logp = span_logprob(logp, rationale_mask)      # [B]: log pi(span) = masked sum
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from latro_jax.models import Transformer


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


def span_logprob(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """log pi(span) = sum_t mask[t] * token_logp[t], per row."""
    return jnp.sum(token_logp * mask, axis=-1)
