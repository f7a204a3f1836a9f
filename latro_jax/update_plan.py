"""One update as shapes: what an algorithm's `plan` returns and latro_jax.compile_check
compiles for a TPU topology without running anything (its sampler calls, scoring passes and the
rows of its optimizer steps, at the worst case its config allows)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from latro_jax.sampling import SamplingParams, prompts_per_call
from latro_jax.train import RowLayout


@dataclasses.dataclass(frozen=True)
class Lengths:
    """The token counts an update's shapes follow where data sets them (compile_check's
    assumptions): the longest prompt, gold answer y (its longer spelling) and gold rationale."""

    prompt: int
    answer: int = 16
    rationale: int = 256


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampler program of an update (sampling.generate): `prompts` prompts left-padded to
    `width` tokens, `samples` completions each of at most `new_tokens`, drawn at `sampling`, with
    `reserve` cache slots kept after them; run `calls` times per update (at most)."""

    name: str
    prompts: int
    width: int
    samples: int
    new_tokens: int
    sampling: SamplingParams
    reserve: int = 0
    calls: int = 1

    def in_calls_of(self, rows_per_call: int) -> Generation:
        """This generation as a sampler holding at most rows_per_call rows runs it (0: as is):
        calls of sampling.prompts_per_call prompts each."""
        per_call = prompts_per_call(self.prompts, self.samples, rows_per_call)
        return dataclasses.replace(self, prompts=per_call, calls=self.calls * -(-self.prompts // per_call))


@dataclasses.dataclass(frozen=True)
class Scoring:
    """One scoring pass of an update (Scorer): rows [rows, width], split into the stage's
    micro-batches; span sums under `masks`, or per-token log-probs without; at `temperature`,
    with the rows' shared prompt columns; run `calls` times per update."""

    name: str
    rows: int
    width: int
    masks: tuple[str, ...] = ()
    temperature: float = 1.0
    shared_prefix: tuple[int, int] | None = None
    calls: int = 1


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    """One update as shapes, the worst case its config allows: the sampler calls, the scoring
    passes, and the rows of one optimizer step (`batch`, [rows, ...] arrays as the loss reads
    them; `scalars`, the names of its global values; `layout`), `steps` steps per update."""

    generations: tuple[Generation, ...]
    scoring: tuple[Scoring, ...]
    batch: dict[str, jax.ShapeDtypeStruct]
    scalars: tuple[str, ...]
    layout: RowLayout
    steps: int = 1


def row_specs(rows: int, width: int, masks: Sequence[str] = (), per_row: Sequence[str] = ()
              ) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract rows as Rows and scored batches hold them: tokens int32 and valid bool [rows,
    width], each of `masks` float32 [rows, width], each of `per_row` float32 [rows]."""
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, np.dtype(dtype))
    return {"tokens": spec((rows, width), np.int32), "valid": spec((rows, width), bool),
            **{m: spec((rows, width), np.float32) for m in masks},
            **{name: spec((rows,), np.float32) for name in per_row}}
