"""Jitted KV-cache generation: one prefill per prompt shared by its samples, then a
`lax.while_loop` decode that exits early once every row has stopped.

    out = generate(model, prompts, max_new_tokens=128, sampling=SamplingParams(1.0), num_samples=4,
                   stops=Stops(ids=(eos,), phrases=(answer_is_ids,)))
    out.tokens[i][k]    # generated ids of sample k of prompt i, cut after the first stop
    out.logprobs[i][k]  # their log-probabilities under the sampling distribution

Shapes are static: prompts are left-padded to a length bucket (`bucket`: at most 25% padding),
the batch to a multiple of 8 (and of the data-parallel shards), generation to a bucketed buffer;
the true max_new_tokens is a traced value. A run therefore compiles one program per (prompt bucket,
batch bucket, generation bucket, sampling settings).

LongRoPE models (Phi-3) switch a row to the long factors once it reaches
original_max_position_embeddings; the keys and values of every earlier token change then, so at
that step the cache is rebuilt from the token history (as transformers does), inside the loop --
in programs whose rows can reach that length (prompt bucket + generation bucket), the others
hold no second cache for it.

Sampling distribution of each step: logits / T, then top-k (keep logits >= the k-th largest),
then top-p (keep the most likely tokens until their cumulative probability reaches p; the top
token always stays), renormalised. Greedy (T = 0) takes the argmax and reports its log-probability
under softmax(logits). Rows are keyed by (key, row, step), so a row's draw does not depend on
the rest of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from latro_jax import sharding
from latro_jax.logprobs import target_logprobs
from latro_jax.models import KVCache, ModelConfig, Transformer
from latro_jax.models.rope import longrope_limit
from latro_jax.stops import Stops

MIN_PROMPT_BUCKET = 16
BATCH_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")


@dataclasses.dataclass
class GenerateOutput:
    """Per prompt, per sample lists (cut after the first stop) and the padded arrays
    ([num_prompts * num_samples, max_new_tokens], row n*K + k = sample k of prompt n)."""

    tokens: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    token_array: np.ndarray  # int32, pad_id after a row stops
    logprob_array: np.ndarray  # float32, 0 after a row stops
    lengths: np.ndarray  # int32, generated tokens up to and including the stop
    finished: np.ndarray  # bool, the row hit a stop id or stop sequence
    # with reserve_slots > 0: the final KV cache (device arrays, rows padded as the sampler ran
    # them), the prompt width P (prompts in slots [0, P), generated token t in slot P + t) and
    # the free slots reserved after the generated ones, for continuation_logprobs
    cache: KVCache | None = None
    prompt_width: int = 0
    reserved: int = 0


def bucket(n: int, minimum: int = 1) -> int:
    """Round max(n, minimum) up to a quarter-octave bucket: a multiple of 2^(k-2) for
    2^k < n <= 2^(k+1) (..., 40, 48, 56, 64, 80, 96, 112, 128, 160, ...): at most 25% padding and
    four programs per doubling of the length."""
    n = max(n, minimum)
    if n <= 8:
        return 1 << (n - 1).bit_length()
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_columns(longest: int, width: int = 0) -> int:
    """The prompt columns of a sampler call (or rows) whose longest prompt has `longest` tokens:
    a fixed `width` (a stage's longest prompt) when it holds them, rounded up to a multiple of
    MIN_PROMPT_BUCKET or to its bucket, whichever is less, so that one program serves every
    batch with little padding (201 -> 208, 267 -> 272, 20 -> 20); else the bucket of `longest`."""
    if width >= longest:
        return min(round_up(width, MIN_PROMPT_BUCKET), bucket(width, MIN_PROMPT_BUCKET))
    return bucket(longest, MIN_PROMPT_BUCKET)


def cache_dtype(dtype, mesh: jax.sharding.Mesh | None = None) -> str:
    """The KV cache's dtype on the devices the sampler runs on (the mesh's, else the default
    backend's): the compute dtype `dtype`, except float32 on CPU, where XLA computes a bf16 cache
    update in f32 and so copies the whole cache every step (measured: 0.3 s of a 2.4 s
    benchmark run); attention over the cache is a small share of the CPU step."""
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    return jnp.dtype(jnp.float32 if platform == "cpu" else dtype).name


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [B, V] -> the (unnormalised) log-weights of the sampling distribution, with
    removed tokens at -inf."""
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < params.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams):
    """One token per row and its log-probability under the sampling distribution.

    Sampling is by inversion: with u ~ U(0, 1] per row and c the cumulative (unnormalised)
    probabilities, the token is #{j : c_j < u * c_V}. One uniform per row instead of one Gumbel
    per vocabulary entry (which costs two logarithms each on a CPU)."""
    if params.temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        logp = jax.nn.log_softmax(process_logits(logits, params), axis=-1)
        cdf = jnp.cumsum(jnp.exp(logp), axis=-1)
        u = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
        tokens = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1, dtype=jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _stop_matrix(stops: Stops):
    """Stops as a right-aligned [S, W] int32 matrix (-1 = wildcard) for window matching."""
    seqs = [[int(t)] for t in stops.ids] + [list(map(int, s)) for s in stops.phrases if len(s)]
    if not seqs:
        return np.full((1, 1), -2, np.int32)  # matches nothing (tokens are >= 0)
    width = max(map(len, seqs))
    return np.array([[-1] * (width - len(s)) + s for s in seqs], np.int32)


def _row_keys(seed_key: jax.Array, rows: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(seed_key, r), step))(rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "gen_bucket", "params",
                                             "pad_id", "progress", "reserve", "cache_dt"))
def _generate_core(graphdef, state, prompts, prompt_valid, row_ids, row_live, stops, max_new,
                   key_data, bar_id, *, num_samples, gen_bucket, params, pad_id, progress, reserve, cache_dt):
    """prompts [N, P] left-padded -> (tokens, logprobs [N*K, G], lengths, finished [N*K], the
    final cache (with `reserve` free slots after the generated ones) or None when reserve = 0)."""
    model = nnx.merge(graphdef, state)
    layers = model.unstack_layers()  # sliced once, outside the decode loop
    N, P = prompts.shape
    cache = KVCache.zeros(model.config, N, P + gen_bucket + reserve, dtype=cache_dt)
    hidden, cache = model.hidden_states(prompts, valid=prompt_valid, cache=cache, layers=layers)
    logits = model.logits(hidden[:, -1])
    cache = cache.repeat(num_samples)
    logits = jnp.repeat(logits, num_samples, axis=0)
    B = N * num_samples
    seed_key = jax.random.wrap_key_data(key_data)
    width = stops.shape[1]

    def emit(step, logits, tok_buf, logp_buf, done, lengths):
        token, logp = sample_tokens(logits, _row_keys(seed_key, row_ids, step), params)
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        tok_buf = jax.lax.dynamic_update_slice(tok_buf, token[:, None], (0, width - 1 + step))
        logp_buf = jax.lax.dynamic_update_slice(logp_buf, logp[:, None], (0, step))
        window = jax.lax.dynamic_slice(tok_buf, (0, step), (B, width))
        hit = jnp.any(jnp.all((window[:, None, :] == stops[None]) | (stops[None] == -1), -1), -1)
        lengths = lengths + (~done).astype(jnp.int32)
        if progress:
            jax.debug.callback(_PROGRESS.tick, bar_id, step, ordered=True)
        return token, tok_buf, logp_buf, done | hit, lengths

    tok_buf = jnp.full((B, width - 1 + gen_bucket), -1, jnp.int32)
    logp_buf = jnp.zeros((B, gen_bucket), jnp.float32)
    done = ~row_live  # padding rows start done; a live row is done once it hits a stop
    lengths = jnp.zeros((B,), jnp.int32)
    token, tok_buf, logp_buf, done, lengths = emit(0, logits, tok_buf, logp_buf, done, lengths)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def decode(step, token, cache, tok_buf):
        hidden, cache = model.hidden_states(token[:, None], cache=cache, layers=layers)
        return model.logits(hidden[:, 0]), cache

    def rebuild(step, token, cache, tok_buf):
        """Forward over the whole history (prompt + tokens 0..step-1) into a fresh cache."""
        generated = tok_buf[:, width - 1:]
        history = jnp.concatenate([jnp.repeat(prompts, num_samples, axis=0),
                                   jnp.where(generated < 0, pad_id, generated)], axis=1)
        valid = jnp.concatenate([jnp.repeat(prompt_valid, num_samples, axis=0),
                                 jnp.broadcast_to(jnp.arange(gen_bucket) < step, (B, gen_bucket))], axis=1)
        fresh = KVCache.zeros(model.config, B, P + gen_bucket + reserve, dtype=cache_dt)
        hidden, fresh = model.hidden_states(history, valid=valid, cache=fresh, layers=layers)
        logits = model.logits(jax.lax.dynamic_index_in_dim(hidden, P + step - 1, 1, keepdims=False))
        return logits, fresh.replace(index=P + step)

    def body(carry):
        step, token, cache, tok_buf, logp_buf, done, lengths = carry
        if model.config.rope_scaling.rope_type == "longrope" and P + gen_bucket > longrope_limit(model.config):
            crossing = jnp.any(cache.lengths == longrope_limit(model.config))
            logits, cache = jax.lax.cond(crossing, rebuild, decode, step, token, cache, tok_buf)
        else:
            logits, cache = decode(step, token, cache, tok_buf)
        token, tok_buf, logp_buf, done, lengths = emit(step, logits, tok_buf, logp_buf, done, lengths)
        return step + 1, token, cache, tok_buf, logp_buf, done, lengths

    carry = (jnp.int32(1), token, cache, tok_buf, logp_buf, done, lengths)
    _, _, cache, tok_buf, logp_buf, done, lengths = jax.lax.while_loop(cond, body, carry)
    tokens = tok_buf[:, width - 1:]
    tokens = jnp.where(tokens < 0, pad_id, tokens)
    return tokens, logp_buf, lengths, done & row_live, cache if reserve else None


def _rows_on_mesh(arrays: list[np.ndarray], mesh: jax.sharding.Mesh | None) -> list:
    """Host arrays with a leading row axis, split over the mesh's data axes (as they are without one)."""
    if mesh is None:
        return arrays
    return [sharding.put_global(a, sharding.batch_sharding(mesh, a.ndim)) for a in arrays]


class _ProgressBars:
    """Open tqdm bars of generate calls, by id. The compiled decode loop reports each step to
    `tick` with its call's bar id (a traced argument, so one program serves every call)."""

    def __init__(self):
        self._bars: dict[int, tqdm] = {}
        self._next = 0

    def open(self, total: int) -> int:
        self._next += 1
        self._bars[self._next] = tqdm(total=total, desc="generate", unit="tok", leave=False)
        return self._next

    def tick(self, bar_id, step) -> None:
        bar = self._bars.get(int(bar_id))
        if bar is not None:
            bar.update(int(step) + 1 - bar.n)

    def close(self, bar_id: int) -> None:
        self._bars.pop(bar_id).close()


_PROGRESS = _ProgressBars()


def prompts_per_call(prompts: int, samples: int, rows_per_call: int) -> int:
    """The prompts one sampler call of `generate` takes when it may hold rows_per_call rows
    (0: every prompt in one call), `samples` rows per prompt: whole prompts, at least one."""
    return min(prompts, max(1, rows_per_call // samples)) if rows_per_call > 0 else prompts


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: SamplingParams = SamplingParams(), num_samples: int = 1, stops: Stops = Stops(),
             seed: int = 0, key: jax.Array | None = None, pad_id: int = 0,
             mesh: jax.sharding.Mesh | None = None, progress: bool = False,
             reserve_slots: int = 0, rows_per_call: int = 0, prompt_width: int = 0) -> GenerateOutput:
    """Sample `num_samples` continuations of each prompt (ragged token-id lists).

    Rows are drawn from `sampling` (default greedy) and stop after a token in stops.ids or after
    the last token of a stop phrase (a token-id subsequence); the stop is included in the returned
    tokens. The draws depend on `key` (a jax.random key; default jax.random.key(seed)) and each
    row's index. With `mesh`, rows are split over its data axes and parameters stay as the model's
    partition rules place them; in multi-process runs every process passes the same prompts and
    gets the full result. With reserve_slots > 0 the output keeps the final KV cache, with that
    many free slots, for `continuation_logprobs`.
    rows_per_call > 0 bounds the rows one sampler program holds (its KV cache): the prompts run
    in consecutive calls of rows_per_call // num_samples prompts (at least one; padded, as one
    call's are, to a multiple of 8 and of the data shards, so a multiple of 8 x num_samples
    wastes no row) of one compiled shape, and since draws are keyed by row index, the samples
    are those of one call. Not with reserve_slots, whose cache must hold every row.
    Prompts are left-padded to prompt_columns: the bucket of the longest, or prompt_width
    when that holds them (a stage's fixed width: one program whatever a batch's prompts).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    n, G = len(prompts), num_samples
    per_call = prompts_per_call(n, G, rows_per_call)
    if per_call < n and reserve_slots:
        raise ValueError(f"reserve_slots keeps the KV cache of all {n * G} rows for continuation_logprobs, "
                         f"but rows_per_call={rows_per_call} splits them over calls: pass one or the other")
    n_pad = round_up(per_call, np.lcm(BATCH_MULTIPLE, sharding.data_shards(mesh)))
    p_len = prompt_columns(max(map(len, prompts)), prompt_width)  # over all prompts: every call one program
    stop_matrix = _stop_matrix(stops)
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed) if key is None else key))
    graphdef, state = nnx.split(model)
    parts = []
    for first in range(0, n, per_call):
        call = prompts[first:first + per_call]
        tokens = np.full((n_pad, p_len), pad_id, np.int32)
        valid = np.zeros((n_pad, p_len), bool)
        for i, p in enumerate(call):
            tokens[i, p_len - len(p):] = p
            valid[i, p_len - len(p):] = True
        local = np.arange(n_pad * G, dtype=np.int32)
        args = _rows_on_mesh([tokens, valid, first * G + local, local < len(call) * G], mesh)
        bar_id = _PROGRESS.open(max_new_tokens) if progress else 0
        try:
            out = _generate_core(graphdef, state, *args, stop_matrix, np.int32(max_new_tokens), key_data,
                                 np.int32(bar_id), num_samples=G, gen_bucket=bucket(max_new_tokens),
                                 params=sampling, pad_id=pad_id, progress=progress, reserve=int(reserve_slots),
                                 cache_dt=cache_dtype(model.dtype, mesh))
        finally:
            if progress:
                _PROGRESS.close(bar_id)
        live = len(call) * G
        tok, logp, lengths, finished = (sharding.to_host(x)[:live] for x in out[:4])
        parts.append((tok[:, :max_new_tokens], logp[:, :max_new_tokens], lengths, finished))
    tok, logp, lengths, finished = (np.concatenate(arrays) for arrays in zip(*parts))
    per_row_tokens = [tok[r, :lengths[r]].tolist() for r in range(n * G)]
    per_row_logp = [logp[r, :lengths[r]].tolist() for r in range(n * G)]
    group = lambda xs: [xs[i * G:(i + 1) * G] for i in range(n)]
    return GenerateOutput(tokens=group(per_row_tokens), logprobs=group(per_row_logp),
                          token_array=tok, logprob_array=logp, lengths=lengths,
                          finished=finished, cache=out[4], prompt_width=p_len,
                          reserved=int(reserve_slots))


def logprobs_are_the_policys(config: ModelConfig, params: SamplingParams) -> bool:
    """Whether the sampler's log-probabilities and cache serve as the policy's own: sampling at
    T = 1 with top-k and top-p off (the sampling distribution is pi itself), and a model (of
    `config`) whose cached keys do not depend on where a token sits in the cache (no sliding
    window, which masks by slot distance) or on the row's length (no LongRoPE, which switches
    tables)."""
    return (params == SamplingParams(1.0) and config.sliding_window is None
            and config.rope_scaling.rope_type != "longrope")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _continuation_core(graphdef, state, cache, keep, lengths, tokens, valid):
    """Forward of `tokens` [B, W] after each row's first `keep` cache slots (its `lengths` real
    tokens); -> [B] sum over t >= 1 with valid of log pi(tokens[t] | what precedes it)."""
    model = nnx.merge(graphdef, state)
    slots = jnp.arange(cache.valid.shape[1])
    kept = cache.replace(valid=cache.valid & (slots[None, :] < keep[:, None]), lengths=lengths)
    hidden, _ = model.hidden_states(tokens, valid=valid, cache=kept)

    def position(xs):  # one position at a time: never [B, W, V] logits
        h, t = xs
        return target_logprobs(model.logits(h), t)

    logp = jax.lax.map(position, (hidden[:, :-1].swapaxes(0, 1), tokens[:, 1:].swapaxes(0, 1)))
    return jnp.sum(logp.T * valid[:, 1:], axis=1)


def continuation_logprobs(model: Transformer, out: GenerateOutput, prompts: Sequence[Sequence[int]],
                          kept: Sequence[int], continuations: Sequence[Sequence[int]], *,
                          pad_id: int = 0, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """[rows] float32: log pi(continuation_r | prompt ⊕ the first kept[r] tokens row r generated),
    for rows r = n * num_samples + k of `out` (a `generate(..., reserve_slots=W)` output of
    `prompts`), from the sampler's cache: no forward over the prompt and the kept tokens again.

    The row's last kept token (the prompt's last when kept[r] = 0) is fed again with the
    continuation, its old slot and every slot after it masked out, so the first continuation
    token is predicted from it; keys depend on a token's position, not its slot, so this is the
    forward over [prompt | kept | continuation] (up to float rounding)."""
    if out.cache is None:
        raise ValueError("continuation_logprobs needs generate(..., reserve_slots=W) output (it has no cache)")
    rows, samples, width = len(kept), len(out.lengths) // len(prompts), out.reserved
    B = out.cache.valid.shape[0]
    longest = max(map(len, continuations)) + 1
    if longest > width:
        raise ValueError(f"a continuation of {longest - 1} tokens needs reserve_slots >= {longest}; "
                         f"generate reserved {width}")
    tokens = np.full((B, width), pad_id, np.int32)
    valid = np.zeros((B, width), bool)
    keep = np.zeros(B, np.int32)
    lengths = np.zeros(B, np.int32)
    for r, (n, cont) in enumerate(zip(kept, continuations)):
        prompt = prompts[r // samples]
        if not 0 <= n <= out.lengths[r]:
            raise ValueError(f"row {r}: kept={n} is outside the {out.lengths[r]} generated tokens")
        last = out.token_array[r, n - 1] if n else prompt[-1]
        tokens[r, :1 + len(cont)] = [last, *cont]
        valid[r, :1 + len(cont)] = True
        keep[r] = out.prompt_width + n - 1
        lengths[r] = len(prompt) + n - 1
    graphdef, state = nnx.split(model)
    args = _rows_on_mesh([keep, lengths, tokens, valid], mesh)
    return sharding.to_host(_continuation_core(graphdef, state, out.cache, *args))[:rows]
