"""From sampled tokens to trainable rows: how a rationale ends (stops), cutting before the first
stop, and assembling rows [pad | x | z | y | pad] with their masks (SPEC 1.3).

    rollout = sample_rows(model, prompts, answers, num_samples=K, max_new_tokens=L,
                          sampling=SamplingParams(1.0), stops=stops, key=key)
    rollout.rows.tokens      # [N*K, S]: K consecutive rows per prompt
    rollout.finished         # [N*K]: the rationale hit a stop within L tokens

Everything here is host-side NumPy except the sampler call; the math on rows lives in
objectives.py and the log-probabilities in scoring.py.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from latro_jax import sampling
from latro_jax.models import Transformer

# A rollout row's columns after its prompt: L + the longest y of the batch, rounded up to this
# (at most 7 padded columns; a new program only when the longest y crosses a multiple of 8).
ROLLOUT_BODY_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Stops:
    """How a rationale ends: stop token ids (EOS, end-of-turn, pad) and stop phrases as token-id
    sequences (e.g. the tokens of "The answer is")."""

    ids: tuple[int, ...]
    phrases: tuple[tuple[int, ...], ...] = ()


def truncate(tokens: Sequence[int], stops: Stops) -> tuple[int, bool]:
    """(length of z, stopped): z = tokens[:length] ends before the FIRST of a stop id (EOS,
    end-of-turn, pad) or the START of any stop phrase (token-id sequence) that occurs whole
    before it -- the earliest start over all phrases, so "So, the answer is" is cut before
    "So" although it contains " the answer is" (SPEC 1.3). The stop is not part of z; stopped
    is False when no stop occurs (an unfinished rationale)."""
    tokens = list(tokens)
    stop_ids = set(stops.ids)
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    by_first: dict[int, list[list[int]]] = {}
    for phrase in stops.phrases:
        by_first.setdefault(phrase[0], []).append(list(phrase))
    cut = next((i for i in range(end) for phrase in by_first.get(tokens[i], ())
                if i + len(phrase) <= end and tokens[i:i + len(phrase)] == phrase), end)
    return cut, cut < len(tokens)


@dataclasses.dataclass
class Rows:
    """Token rows [x | z | y | pad] (x left-padded to a fixed width) with their masks.

    tokens, valid: [B, S]; rationale_mask / answer_mask: [B, S] float32 selecting the tokens
    of z and y (as prediction targets: token t is predicted from tokens < t); prompt_width:
    the columns x is right-aligned in (z starts there)."""

    tokens: np.ndarray
    valid: np.ndarray
    rationale_mask: np.ndarray
    answer_mask: np.ndarray
    prompt_width: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The [B, S] arrays by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prompt_width"}


def row_widths(prompts: Sequence[Sequence[int]], body: int, *, body_multiple: int = 0) -> tuple[int, int]:
    """(prompt width, row length) of rows holding `prompts` and at most `body` tokens after
    them, so that a run compiles few programs: the width is bucketed (sampling.bucket), and the
    length too, or, with body_multiple, it is the width plus `body` rounded up to that multiple.
    The second is for rows whose body is a fixed budget plus a few varying tokens (a rollout's
    L + y) and whose prompt columns run once per question (prefix sharing): every row pays for
    the padding after its prompt, and bucketing the whole length could pad that part by 40%."""
    width = sampling.bucket(max(map(len, prompts)), sampling.MIN_PROMPT_BUCKET)
    if body_multiple:
        return width, width + sampling.round_up(body, body_multiple)
    return width, sampling.bucket(width + body)


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
    return Rows(tokens, valid, z_mask, y_mask, prompt_width)


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                    pad_id: int = 0) -> Rows:
    """Rows [x | completion] for supervised targets: the completion is the `answer` span (its
    mask is answer_mask), the rationale span is empty."""
    width, length = row_widths(prompts, max(map(len, completions)))
    return assemble_rows(prompts, [[]] * len(prompts), completions, prompt_width=width,
                         length=length, pad_id=pad_id)


@dataclasses.dataclass
class Rollout:
    """K sampled rationales per prompt, cut at their stops, as rows [x | z | y].

    rows: Rows [N*K, S]; finished [N*K] bool; lengths [N*K] (tokens of z); samples: the ids
    the sampler generated per row (stop included); sampled_tokens: their total, for throughput;
    z_logp, y_logp [N*K]: the policy's log pi(z|x) and log pi(y|x+z) when the sampler could give
    them (sample_rows(policy_logprobs=True)), else None."""

    rows: Rows
    finished: np.ndarray
    lengths: np.ndarray
    samples: list[list[int]]
    sampled_tokens: int
    z_logp: np.ndarray | None = None
    y_logp: np.ndarray | None = None


def sample_rows(model: Transformer, prompts: Sequence[Sequence[int]],
                answers: Sequence[Sequence[int]], bare_answers: Sequence[Sequence[int]] | None = None,
                *, num_samples: int, max_new_tokens: int, sampling_params: sampling.SamplingParams,
                stops: Stops, key: jax.Array, pad_id: int = 0,
                mesh: jax.sharding.Mesh | None = None, policy_logprobs: bool = False) -> Rollout:
    """Sample `num_samples` rationales per prompt (at most max_new_tokens each), cut each before
    its first stop, and append the prompt's answer y. A row whose rationale is empty (the model
    answered at once) gets `bare_answers` (y as a whole completion, default `answers`).

    policy_logprobs: also give the policy's log pi(z|x) (the sum of the sampler's own token
    log-probabilities up to the cut) and log pi(y|x+z) (y fed after the cut from the sampler's
    KV cache), when they are the policy's (sampling.logprobs_are_the_policys); a scorer then
    needs no policy pass over the rows."""
    K = num_samples
    bare_answers = answers if bare_answers is None else bare_answers
    reuse = policy_logprobs and sampling.logprobs_are_the_policys(model, sampling_params)
    reserve = sampling.bucket(1 + max(map(len, [*answers, *bare_answers]))) if reuse else 0
    out = sampling.generate(
        model, prompts, max_new_tokens, temperature=sampling_params.temperature,
        top_k=sampling_params.top_k, top_p=sampling_params.top_p, num_samples=K,
        stop_token_ids=stops.ids, stop_sequences=stops.phrases, key=key, pad_id=pad_id, mesh=mesh,
        reserve_slots=reserve)
    samples = [out.token_array[r, :out.lengths[r]].tolist() for r in range(len(out.lengths))]
    cut = [truncate(sample, stops) for sample in samples]
    rationales = [sample[:n] for sample, (n, _) in zip(samples, cut)]
    row_answers = [bare_answers[r // K] if not z else answers[r // K] for r, z in enumerate(rationales)]
    z_logp = y_logp = None
    if reuse:
        kept = [n for n, _ in cut]
        z_logp = np.array([out.logprob_array[r, :n].sum(dtype=np.float32) for r, n in enumerate(kept)])
        y_logp = sampling.continuation_logprobs(model, out, prompts, kept, row_answers, pad_id=pad_id, mesh=mesh)
    width, length = row_widths(prompts, max_new_tokens + max(map(len, row_answers)),
                               body_multiple=ROLLOUT_BODY_MULTIPLE)
    rows = assemble_rows([p for p in prompts for _ in range(K)], rationales, row_answers,
                         prompt_width=width, length=length, pad_id=pad_id)
    return Rollout(rows=rows, finished=np.array([stopped for _, stopped in cut]),
                   lengths=np.array([n for n, _ in cut]), samples=samples,
                   sampled_tokens=int(out.lengths.sum()), z_logp=z_logp, y_logp=y_logp)
