"""LaTRO, SFT and their building blocks as pure functions (SPEC section 1).

Notation: x question, z rationale, y answer; N questions x K rationales in consecutive rows;
log pi(.) of a span is the SUM of its token log-probabilities.

Device-side (jax): token log-probabilities in chunks, rewards, advantages, losses.
Host-side (NumPy): rationale truncation on token ids and assembly of [x | z | y] rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latro_jax.models import Transformer


# ---------------------------------------------------------------- log-probabilities
def token_logprobs(model: Transformer, tokens: jax.Array, valid: jax.Array, *,
                   chunk_size: int = 128) -> jax.Array:
    """out[b, t] = log pi(tokens[b, t] | tokens[b, :t]) (0 at t = 0), float32 [B, T].

    The LM head runs over chunks of `chunk_size` positions under `jax.checkpoint`, so neither
    the forward nor the backward pass holds [B, T, V] logits, only [B, chunk, V] at a time.
    """
    hidden, _ = model.hidden_states(tokens, valid=valid)
    B, T, H = hidden.shape
    chunk = min(chunk_size, T - 1)
    n_chunks = -(-(T - 1) // chunk)
    pad = n_chunks * chunk - (T - 1)
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))
    h = h.reshape(B, n_chunks, chunk, H).swapaxes(0, 1)
    targets = targets.reshape(B, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_logp(h_c, t_c):
        logp = jax.nn.log_softmax(model.logits(h_c), axis=-1)
        return jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]

    logp = jax.lax.map(lambda xs: chunk_logp(*xs), (h, targets))
    logp = logp.swapaxes(0, 1).reshape(B, n_chunks * chunk)[:, :T - 1]
    return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), logp], axis=1)


def span_logprob(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """log pi(span) = sum_t mask[t] * token_logp[t], per row."""
    return jnp.sum(token_logp * mask, axis=-1)


# ---------------------------------------------------------------- LaTRO
def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """Leave-one-out baseline over the K samples of each question (no std scaling):
    A_k = r_k - 1/(K-1) * sum_{j != k} r_j, for rewards [N, K]."""
    K = rewards.shape[-1]
    if K < 2:
        raise ValueError(f"RLOO needs K >= 2 samples per question, got K = {K}")
    return rewards - (rewards.sum(axis=-1, keepdims=True) - rewards) / (K - 1)


def latro_rewards(answer_logp: jax.Array, rationale_logp: jax.Array,
                  ref_rationale_logp: jax.Array, finished: jax.Array, *, beta: float,
                  nonstop_penalty: float) -> jax.Array:
    """r = R' - beta * (log pi_theta(z|x) - log pi_0(z|x)), all [N, K].

    R' = log pi_theta(y | x + z) for finished rationales; for unfinished ones (no stop within L)
    R' = nonstop_penalty * mean(answer_logp over the whole batch) (answer_logp <= 0, so this is
    a penalty). Pass global arrays: the mean is over every sample of the global batch.
    """
    penalised = nonstop_penalty * jnp.mean(answer_logp)
    reward = jnp.where(finished, answer_logp, penalised)
    return reward - beta * (rationale_logp - ref_rationale_logp)


def latro_loss(rationale_logp: jax.Array, answer_logp: jax.Array, advantages: jax.Array, *,
               sft_coef: float) -> jax.Array:
    """mean over N*K of  -stop_grad(A) * log pi(z|x)  -  sft_coef * log pi(y|x+z).

    Its gradient is the REINFORCE-with-RLOO estimate of grad E_z[log pi(y|x+z)] - beta KL plus
    sft_coef times the gradient of the answer likelihood (SPEC 1.2)."""
    advantages = jax.lax.stop_gradient(advantages)
    return jnp.mean(-advantages * rationale_logp - sft_coef * answer_logp)


def sft_loss(token_logp: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Completion-only negative log-likelihood per token: -sum(mask * logp) / sum(mask)."""
    return -jnp.sum(token_logp * completion_mask) / jnp.maximum(jnp.sum(completion_mask), 1)


# ---------------------------------------------------------------- host-side rows
def truncate_rationale(tokens: Sequence[int], stop_ids: Sequence[int],
                       stop_phrases: Sequence[Sequence[int]]) -> tuple[int, bool]:
    """(length of z, stopped): z = tokens[:length] ends before the FIRST of a stop id (EOS,
    end-of-turn, pad) or the start of any stop phrase (token-id sequence); the stop itself is
    not part of z. stopped is False when no stop occurs (an unfinished rationale)."""
    tokens = list(tokens)
    stop_ids = set(stop_ids)
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    for phrase in map(list, stop_phrases):
        n = len(phrase)
        cut = next((i for i in range(cut - n + 1) if tokens[i:i + n] == phrase), cut)
    return cut, cut < len(tokens)


@dataclasses.dataclass
class Rows:
    """Token rows [x | z | y | pad] (x left-padded to a fixed width) with their masks.

    tokens, valid: [B, S]; rationale_mask / answer_mask: [B, S] float32 selecting the tokens
    of z and y (as prediction targets: token t is predicted from tokens < t)."""

    tokens: np.ndarray
    valid: np.ndarray
    rationale_mask: np.ndarray
    answer_mask: np.ndarray


def assemble_rows(prompts: Sequence[Sequence[int]], rationales: Sequence[Sequence[int]],
                  answers: Sequence[Sequence[int]], *, prompt_width: int, length: int,
                  pad_id: int = 0) -> Rows:
    """Rows [pad | x | z | y | pad] of `length` tokens; x right-aligned in `prompt_width`
    columns so every z starts at column prompt_width. Rows that do not fit are an error."""
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    valid = np.zeros((B, length), bool)
    z_mask = np.zeros((B, length), np.float32)
    y_mask = np.zeros((B, length), np.float32)
    for b, (x, z, y) in enumerate(zip(prompts, rationales, answers)):
        if len(x) > prompt_width or prompt_width + len(z) + len(y) > length:
            raise ValueError(f"row {b}: prompt {len(x)} + rationale {len(z)} + answer {len(y)} "
                             f"tokens do not fit (prompt width {prompt_width}, row length {length})")
        start = prompt_width - len(x)
        row = list(x) + list(z) + list(y)
        tokens[b, start:start + len(row)] = row
        valid[b, start:start + len(row)] = True
        z_mask[b, prompt_width:prompt_width + len(z)] = 1.0
        y_mask[b, prompt_width + len(z):prompt_width + len(z) + len(y)] = 1.0
    return Rows(tokens, valid, z_mask, y_mask)
