"""Supervised fine-tuning on completions (the paper's SFT baseline, and the demo's warm start):
rows [x | completion], loss = mean token NLL over the completion tokens of the whole batch."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from latro_jax import objectives, rollout
from latro_jax.algorithms.core import Context, Policies, ScoredBatch
from latro_jax.data import Example
from latro_jax.logprobs import token_logprobs
from latro_jax.models import ModelConfig, Transformer
from latro_jax.train import RowLayout
from latro_jax.update_plan import Lengths, UpdatePlan, row_specs


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """SFT has no settings of its own (steps, batch, optimizer are the stage's)."""


class Sft:
    """rollout: the gold rationale of each example as a completion row; score: the batch's
    completion-token count; loss: the completion-only NLL."""

    name = "sft"
    Config = SftConfig
    needs_reference = False
    old_policy_refresh = None
    trains_on = "rationales"
    shown = ("loss", "grad_norm")
    curves = ("loss",)

    def __init__(self, cfg: SftConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    def rows(self, questions: int) -> int:
        return questions

    def tokens_after_prompt(self, example: Example) -> int:
        """The most positions a row of `example` takes after its prompt: its completion."""
        return len(self.ctx.fmt.completion_ids(example.rationale or ""))

    def rollout(self, policies: Policies, examples: Sequence[Example], key: jax.Array) -> rollout.Rows:
        fmt = self.ctx.fmt
        return rollout.completion_rows([fmt.prompt_ids(e.question) for e in examples],
                                       [fmt.completion_ids(e.rationale) for e in examples],
                                       pad_id=fmt.pad_id)

    def plan(self, questions: int, lengths: Lengths, model_config: ModelConfig) -> UpdatePlan:
        """No sampling, no scoring pass: one step on rows [x | gold rationale]."""
        return UpdatePlan((), (), row_specs(questions, completion_width(lengths.prompt, lengths.rationale),
                                            ("completion_mask",)), ("completion_tokens",), RowLayout())

    def score(self, policies: Policies, rows: rollout.Rows) -> ScoredBatch:
        tokens = float(rows.answer_mask.sum())
        return ScoredBatch(arrays=dict(tokens=rows.tokens, valid=rows.valid, completion_mask=rows.answer_mask),
                           scalars={"completion_tokens": tokens}, metrics={"completion_tokens": tokens})

    def loss(self, model: Transformer, mb: dict, scalars: dict, layout: RowLayout):
        return completion_loss(model, mb, scalars, self.ctx.logprob_chunk)


def completion_width(prompt: int, completion: int) -> int:
    """The row length of completion rows (rollout.completion_rows) for a prompt and a completion
    of these many tokens."""
    return rollout.row_widths(prompt, completion)[1]


def completion_loss(model: Transformer, mb: dict, scalars: dict, chunk_size: int):
    """The completion-only NLL of a micro-batch (rows tokens / valid / completion_mask),
    weighted by its share of the batch's completion tokens (scalars["completion_tokens"]), so
    micro-batch contributions sum to the batch's sft_loss."""
    logp = token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=chunk_size)
    share = mb["completion_mask"].sum() / scalars["completion_tokens"]
    return objectives.sft_loss(logp, mb["completion_mask"]) * share, {}
