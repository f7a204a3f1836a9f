"""What one update spends: the seconds and tokens of its generation and of its scoring passes.

    usage = Usage()
    started = time.perf_counter(); out = ...generate...; usage.sampled(started, tokens)
    usage.metrics()   # sample_s, sampled_tokens, score_s, scored_tokens, sample_tokens_per_s

The Learner opens one per update and gives it to the update's Sampler and Scorer, which record
every call that generates or scores, so the columns mean the same for every algorithm: sample_s
is all generation (prefixes, continuations, forced answers), score_s all scoring passes outside
the optimizer step (reference, policy, likelihood J, the sampler-cache answer pass).
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class Usage:
    sample_s: float = 0.0
    sampled_tokens: int = 0
    score_s: float = 0.0
    scored_tokens: int = 0

    def sampled(self, started: float, tokens: int) -> None:
        """Generation that began at perf_counter() = started and produced `tokens`."""
        self.sample_s += time.perf_counter() - started
        self.sampled_tokens += int(tokens)

    def scored(self, started: float, tokens: int) -> None:
        """A scoring pass that began at perf_counter() = started over `tokens` real tokens."""
        self.score_s += time.perf_counter() - started
        self.scored_tokens += int(tokens)

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in dataclasses.asdict(self).items()}
        if self.sample_s:
            out["sample_tokens_per_s"] = self.sampled_tokens / self.sample_s
        return out
