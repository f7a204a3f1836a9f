"""Supervised fine-tuning on completions (the paper's SFT baseline, and the demo's warm start):
rows [x | completion], loss = mean token NLL over completion tokens of the whole batch."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from latro_jax import objectives, sampling
from latro_jax.models import Transformer
from latro_jax.train import OptimConfig, Trainer


def _loss(chunk: int):
    def loss(model: Transformer, mb: dict, scalars: dict):
        logp = objectives.token_logprobs(model, mb["tokens"], mb["valid"], chunk_size=chunk)
        # sft_loss of this micro-batch, re-weighted to its share of the batch's completion tokens
        share = mb["completion_mask"].sum() / scalars["completion_tokens"]
        return objectives.sft_loss(logp, mb["completion_mask"]) * share, {}
    return loss


class SftTrainer:
    def __init__(self, model: Transformer, optim: OptimConfig, *, microbatches: int = 1,
                 pad_id: int = 0, mesh=None, logprob_chunk: int = 128):
        self.pad_id = pad_id
        self.trainer = Trainer(model, optim, _loss(logprob_chunk), microbatches=microbatches, mesh=mesh)

    def update(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> dict[str, float]:
        """One step on (prompt, completion) token-id pairs; only completion tokens are targets."""
        width = sampling.bucket(max(map(len, prompts)), sampling.MIN_PROMPT_BUCKET)
        length = sampling.bucket(width + max(map(len, completions)))
        rows = objectives.assemble_rows(prompts, [[]] * len(prompts), completions,
                                        prompt_width=width, length=length, pad_id=self.pad_id)
        batch = dict(tokens=rows.tokens, valid=rows.valid, completion_mask=rows.answer_mask)
        metrics = self.trainer.step(batch, {"completion_tokens": float(rows.answer_mask.sum())})
        return {**metrics, "completion_tokens": float(rows.answer_mask.sum())}
