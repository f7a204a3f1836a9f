"""Sampling for every algorithm: G completions per prompt cut at the caller's stops, graded by
the task, and turned into trainable rows [pad | x | z | y | pad] with their masks (SPEC 1.3).

    sampler = Sampler(pad_id=fmt.pad_id, mesh=mesh, usage=usage)
    out = sampler.complete(model, prompts, num_samples=G, max_new_tokens=L,
                           sampling_params=SamplingParams(1.0), stops=fmt.stops.ends_only(), key=key)
    out.ids[r], out.finished[r]           # row r = n * G + g: completion g of prompt n
    rewards = grade(task, out.texts(fmt), golds, out.by_prompt(out.finished))   # [N, G]
    ro = sample_rows(sampler, model, prompts, answers, num_samples=K, ...)      # LaTRO's [x | z | y]

This is the one module that calls the sampler (sampling.generate). Everything else here is
host-side NumPy; the math on rows lives in objectives.py, the log-probabilities in scoring.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from latro_jax import sampling
from latro_jax.models import ModelConfig, Transformer
from latro_jax.sampling import SamplingParams
from latro_jax.stops import Stops, truncate
from latro_jax.usage import Usage

# A rollout row's columns after its prompt: L + the longest y of the batch, rounded up to this
# (at most 7 padded columns; a new program only when the longest y crosses a multiple of 8).
ROLLOUT_BODY_MULTIPLE = 8
CUTS = ("after", "before")


@dataclasses.dataclass
class Completions:
    """num_samples completions per prompt, rows prompt-major (row n * G + g).

    ids: per row, the kept tokens (cut "after": up to and including the stop, at most the row's
    budget; cut "before": before the first stop id or stop phrase, stops.truncate); finished [R]:
    the row stopped (within its budget); samples: per row what the sampler generated (stop
    included); generated: the sampler's output (its log-probabilities and, with reserve_slots,
    its cache)."""

    ids: list[list[int]]
    finished: np.ndarray
    samples: list[list[int]]
    group: int
    generated: sampling.GenerateOutput

    @property
    def lengths(self) -> np.ndarray:
        """[R] tokens kept per row: len(ids[r])."""
        return np.array([len(z) for z in self.ids])

    @property
    def sampled_tokens(self) -> int:
        """Every token the sampler generated (stops included)."""
        return int(self.generated.lengths.sum())

    def by_prompt(self, values: Sequence) -> list:
        """Per-row values grouped per prompt: [N][G] (an [N, G] array for an array)."""
        if isinstance(values, np.ndarray):
            return values.reshape(-1, self.group)
        return [list(values[i:i + self.group]) for i in range(0, len(values), self.group)]

    def texts(self, fmt, lead: str | Sequence[str] = "") -> list[list[str]]:
        """[N][G] decoded completions, each after `lead` (one per prompt, or one for all)."""
        leads = [lead] * (len(self.ids) // self.group) if isinstance(lead, str) else lead
        return self.by_prompt([leads[r // self.group] + fmt.decode(ids) for r, ids in enumerate(self.ids)])


def grade(task, texts: Sequence[Sequence[str]], golds: Sequence[str],
          finished: np.ndarray | None = None) -> np.ndarray:
    """[N, G] 0/1 grades of texts [N][G] against each prompt's gold: with `finished` [N, G] the
    training reward (Task.reward: the completion finished and states the right answer), without
    it Task.score (a forced answer, graded on what it says)."""
    if finished is None:
        return np.array([[task.score(t, gold) for t in row] for row, gold in zip(texts, golds)], np.float64)
    return np.array([[task.reward(t, gold, bool(f)) for t, f in zip(row, done)]
                     for row, gold, done in zip(texts, golds, finished)], np.float64)


class Sampler:
    """Completions from a model: the rows' pad id and mesh, the Usage each call's seconds and
    generated tokens are recorded in, the rows one sampler program holds at most
    (sampling.generate's rows_per_call; 0: all of a call's rows) and the least prompt columns of
    its calls and of the rows built from them (prompt_width; 0: each call's longest prompt)."""

    def __init__(self, *, pad_id: int = 0, mesh: jax.sharding.Mesh | None = None, usage: Usage | None = None,
                 rows_per_call: int = 0, prompt_width: int = 0):
        self.pad_id, self.mesh, self.usage, self.rows_per_call = pad_id, mesh, usage or Usage(), rows_per_call
        self.prompt_width = prompt_width

    def complete(self, model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling_params: SamplingParams, stops: Stops, key: jax.Array, num_samples: int = 1,
                 budgets: Sequence[int] | None = None, cut: str = "after", reserve_slots: int = 0,
                 progress: bool = False) -> Completions:
        """num_samples completions of each prompt drawn from `sampling_params`, at most
        max_new_tokens each (or budgets[n] for prompt n: generated to the largest, cut to its
        own), stopping on `stops` and cut as `cut` says (Completions)."""
        if cut not in CUTS:
            raise ValueError(f"cut={cut!r}: choose one of {CUTS}")
        G = num_samples
        started = time.perf_counter()
        out = sampling.generate(model, prompts, max(budgets) if budgets else max_new_tokens,
                                sampling=sampling_params, num_samples=G, stops=stops, key=key,
                                pad_id=self.pad_id, mesh=self.mesh, reserve_slots=reserve_slots, progress=progress,
                                rows_per_call=self.rows_per_call, prompt_width=self.prompt_width)
        self.usage.sampled(started, out.lengths.sum())
        samples = [out.token_array[r, :out.lengths[r]].tolist() for r in range(len(out.lengths))]
        if cut == "before":
            kept = [truncate(sample, stops) for sample in samples]
            ids = [sample[:n] for sample, (n, _) in zip(samples, kept)]
            finished = np.array([stopped for _, stopped in kept])
        else:
            limit = [budgets[r // G] if budgets else max_new_tokens for r in range(len(samples))]
            ids = [sample[:n] for sample, n in zip(samples, limit)]
            finished = np.array([bool(done) and len(sample) <= n
                                 for done, sample, n in zip(out.finished, samples, limit)])
        return Completions(ids, finished, samples, G, out)


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


def row_widths(longest_prompt: int, body: int, *, body_multiple: int = 0, prompt_width: int = 0) -> tuple[int, int]:
    """(prompt width, row length) of rows holding prompts of at most `longest_prompt` tokens and
    at most `body` tokens after them, so that a run compiles few programs: the width is
    sampling.prompt_columns (a stage's fixed prompt_width, else bucketed), and the body is
    bucketed, or, with body_multiple, rounded up to that multiple.
    Bucketing the body rather than the whole row keeps a power-of-two budget exact (a 16,384-
    token completion after a 512-token prompt: rows of 16,896 tokens, not 20,480).
    The multiple is for rows whose body is a fixed budget plus a few varying tokens (a rollout's
    L + y) and whose prompt columns run once per question (prefix sharing): every row pays for
    the padding after its prompt, and bucketing could pad that part by 40%."""
    width = sampling.prompt_columns(longest_prompt, prompt_width)
    if body_multiple:
        return width, width + sampling.round_up(body, body_multiple)
    return width, width + sampling.bucket(body)


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
    width, length = row_widths(max(map(len, prompts)), max(map(len, completions)))
    return assemble_rows(prompts, [[]] * len(prompts), completions, prompt_width=width,
                         length=length, pad_id=pad_id)


@dataclasses.dataclass
class Rollout:
    """K sampled rationales per prompt, cut at their stops, as rows [x | z | y].

    rows: Rows [N*K, S]; finished [N*K] bool; lengths [N*K] (tokens of z); samples: per row
    what the sampler generated (stop included); z_logp, y_logp [N*K]: the policy's log pi(z|x)
    and log pi(y|x+z) when the sampler could give them (sample_rows(policy_logprobs=True)),
    else None."""

    rows: Rows
    finished: np.ndarray
    lengths: np.ndarray
    samples: list[list[int]]
    z_logp: np.ndarray | None = None
    y_logp: np.ndarray | None = None


def sampler_gives_policy_logprobs(config: ModelConfig, sampling_params: SamplingParams, prompts: int, samples: int,
                                  rows_per_call: int) -> bool:
    """Whether sample_rows(policy_logprobs=True) gives the policy's log-probs for `prompts`
    prompts x `samples`: the sampler's are the policy's (sampling.logprobs_are_the_policys) and
    one sampler call holds every row (its cache serves y)."""
    return (sampling.logprobs_are_the_policys(config, sampling_params)
            and sampling.prompts_per_call(prompts, samples, rows_per_call) == prompts)


def sample_rows(sampler: Sampler, model: Transformer, prompts: Sequence[Sequence[int]],
                answers: Sequence[Sequence[int]], bare_answers: Sequence[Sequence[int]] | None = None,
                *, num_samples: int, max_new_tokens: int, sampling_params: SamplingParams,
                stops: Stops, key: jax.Array, policy_logprobs: bool = False, body_width: int = 0) -> Rollout:
    """Sample `num_samples` rationales per prompt (at most max_new_tokens each), cut each before
    its first stop, and append the prompt's answer y. A row whose rationale is empty (the model
    answered at once) gets `bare_answers` (y as a whole completion, default `answers`).

    policy_logprobs: also give the policy's log pi(z|x) (the sum of the sampler's own token
    log-probabilities up to the cut) and log pi(y|x+z) (y fed after the cut from the sampler's
    KV cache, a scoring pass in the sampler's usage), when sampler_gives_policy_logprobs; a
    scorer then needs no policy pass over the rows. Rows have at least the sampler's
    prompt_width prompt columns and body_width columns after them (the answer slots the
    sampler reserves for y too), whatever this batch's longest prompt and answer."""
    K = num_samples
    bare_answers = answers if bare_answers is None else bare_answers
    reuse = policy_logprobs and sampler_gives_policy_logprobs(model.config, sampling_params, len(prompts), K,
                                                              sampler.rows_per_call)
    longest_answer = max(max(map(len, [*answers, *bare_answers])), body_width - max_new_tokens)
    reserve = sampling.bucket(1 + longest_answer) if reuse else 0
    out = sampler.complete(model, prompts, max_new_tokens=max_new_tokens, sampling_params=sampling_params,
                           num_samples=K, stops=stops, key=key, cut="before", reserve_slots=reserve)
    row_answers = [bare_answers[r // K] if not z else answers[r // K] for r, z in enumerate(out.ids)]
    lengths = out.lengths
    z_logp = y_logp = None
    if reuse:
        started = time.perf_counter()
        z_logp = np.array([out.generated.logprob_array[r, :n].sum(dtype=np.float32) for r, n in enumerate(lengths)])
        y_logp = sampling.continuation_logprobs(model, out.generated, prompts, lengths, row_answers,
                                                pad_id=sampler.pad_id, mesh=sampler.mesh)
        sampler.usage.scored(started, sum(map(len, row_answers)))
    width, length = row_widths(max(map(len, prompts)), max(body_width, max_new_tokens + max(map(len, row_answers))),
                               body_multiple=ROLLOUT_BODY_MULTIPLE, prompt_width=sampler.prompt_width)
    rows = assemble_rows([p for p in prompts for _ in range(K)], out.ids, row_answers,
                         prompt_width=width, length=length, pad_id=sampler.pad_id)
    return Rollout(rows=rows, finished=out.finished, lengths=lengths, samples=out.samples, z_logp=z_logp,
                   y_logp=y_logp)
