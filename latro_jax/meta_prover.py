"""The meta-prover μ(·|x, c) and J(c), the chance that an answer forced after a prefix is right
(SPEC 2.3): the same model, stopped after the prefix c by a termination suffix and made to
answer at once.

    prover = MetaProver(ForcingConfig(suffix=" The answer is", estimator="mc", samples=8), task, fmt)
    result = prover.estimate(sampler, scorer, params, prompts, prefixes, golds, key)
    result.j           # [n] J of each (prompt, prefix)
    result.outcomes    # [n, m] 0/1 scores of the m forced answers (mc)

- `mc` (the paper): m forced answers sampled from μ (one prefill per prefix shared by its m
  samples, all prefixes in one batch), each graded by the task on suffix + answer (never on
  the prefix); J = their mean.
- `likelihood` (ours): J = π(t | x ⊕ c ⊕ suffix) with t the gold answer's tokens after the
  suffix (" {gold}." and the end token), one forward pass; the suffix is context, not scored.
A prefix that is the whole thinking is ended by `final_suffix` when one is set (R1: "\n</think>",
the model then answers on its own), any other by `suffix` ("Time is up. ..." for R1).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from latro_jax import rollout, sampling
from latro_jax.data.prompts import continuation_ids
from latro_jax.rollout import Sampler
from latro_jax.sampling import SamplingParams
from latro_jax.scoring import Scorer
from latro_jax.update_plan import Generation

R1_SUFFIX = ("Time is up.\n\nGiven the time I've spent and the approaches I've tried, I should stop "
             "thinking and formulate a final answer based on what I already have.\n</think>\n\n"
             "**Step-by-Step Explanation and Answer:**\n\n1. **")
ANSWER_SUFFIX = " The answer is"
ESTIMATORS = ("mc", "likelihood")
ROWS_PER_CALL = 4096  # the most rows (prefixes x m) one mc sampler call decodes


@dataclasses.dataclass(frozen=True)
class ForcingConfig:
    """suffix: the termination text appended after a prefix (an empty prefix gets it without
    leading whitespace); final_suffix: the text that ends the WHOLE thinking instead ("" = suffix;
    R1 recipe: "\n</think>", after which the model answers on its own, SPEC 2.3); estimator:
    mc | likelihood; samples: m forced answers per prefix (mc); sampling: how they are drawn
    (analysis code: T 0.6, top-p 0.95; temperature 0 = greedy, then one answer); answer_tokens:
    the most tokens a forced answer may take."""

    suffix: str = ANSWER_SUFFIX
    final_suffix: str = ""
    estimator: str = "mc"
    samples: int = 8
    sampling: SamplingParams = SamplingParams(temperature=0.6, top_p=0.95)
    answer_tokens: int = 16

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"forcing.estimator={self.estimator!r}: choose one of {ESTIMATORS}")
        if self.samples < 1:
            raise ValueError(f"forcing.samples={self.samples}: m must be >= 1")
        if self.answer_tokens < 1:
            raise ValueError(f"forcing.answer_tokens={self.answer_tokens} must be >= 1")
        if not self.suffix.strip():
            raise ValueError("forcing.suffix is empty; give the text that makes the model answer")


@dataclasses.dataclass
class Forced:
    """J per (prompt, prefix); with mc also each forced answer's 0/1 outcome [n, m], its text
    (suffix + answer, what was graded) and ids (the answer's tokens, stop included)."""

    j: np.ndarray
    outcomes: np.ndarray | None = None
    texts: list[list[str]] | None = None
    answer_ids: list[list[list[int]]] | None = None


class MetaProver:
    """Forced answers after prefixes, for one task and prompt formatter."""

    def __init__(self, cfg: ForcingConfig, task, fmt):
        self.cfg, self.task, self.fmt = cfg, task, fmt
        if not self.suffix_ids([]) or not continuation_ids(fmt.tokenizer, "x.", cfg.suffix):
            raise ValueError(f"forcing.suffix={cfg.suffix!r} tokenises to nothing")

    @property
    def greedy(self) -> bool:
        return self.cfg.sampling.temperature == 0.0

    def forced_tokens(self) -> int:
        """The most tokens a forced answer adds after a prefix: the longer suffix (as it
        tokenises at the start of the turn, plus 4 for tokenising differently after text) and
        the answer."""
        tok = self.fmt.tokenizer
        longest = max(len(tok(s.lstrip(), add_special_tokens=False).input_ids) for s in self._suffixes())
        return longest + 4 + self.cfg.answer_tokens

    def plan(self, name: str, prefixes: int, tokens: int) -> Generation:
        """The sampler calls of `mc` for `prefixes` prompts of at most `tokens` tokens (prompt
        and prefix) before the suffix, as shapes (compile_check)."""
        m = 1 if self.greedy else self.cfg.samples
        per_call = min(prefixes, max(1, ROWS_PER_CALL // m))
        width = sampling.bucket(tokens + self.forced_tokens() - self.cfg.answer_tokens, sampling.MIN_PROMPT_BUCKET)
        return Generation(name, per_call, width, m, self.cfg.answer_tokens, self.cfg.sampling,
                          calls=-(-prefixes // per_call))

    def _suffixes(self) -> tuple[str, ...]:
        return (self.cfg.suffix, self.cfg.final_suffix) if self.cfg.final_suffix else (self.cfg.suffix,)

    def suffix_text(self, final: bool = False) -> str:
        """The suffix after a prefix; `final`: after the whole thinking."""
        return self.cfg.final_suffix if final and self.cfg.final_suffix else self.cfg.suffix

    def suffix_ids(self, prefix: Sequence[int], final: bool = False) -> list[int]:
        """The suffix as it tokenises after the prefix's text (at the start of the turn when the
        prefix is empty); `final`: the prefix is the whole thinking (final_suffix)."""
        tok, text = self.fmt.tokenizer, self.suffix_text(final)
        if not prefix:
            return tok(text.lstrip(), add_special_tokens=False).input_ids
        return continuation_ids(tok, tok.decode(list(prefix)), text)

    def forced_prompts(self, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]],
                       final: Sequence[bool] | None = None) -> list[list[int]]:
        """x ⊕ c ⊕ suffix for each pair (the final suffix where `final` says c is the whole thinking)."""
        final = final or [False] * len(prefixes)
        return [list(x) + list(c) + self.suffix_ids(c, f) for x, c, f in zip(prompts, prefixes, final)]

    def mc(self, sampler: Sampler, model, prompts, prefixes, golds: Sequence[str], key: jax.Array,
           samples: int | None = None, rows_per_call: int = ROWS_PER_CALL,
           final: Sequence[bool] | None = None) -> Forced:
        """m forced answers per (prompt, prefix) from `model`, graded by the task; J = their mean
        score. The prefixes are decoded in calls of at most rows_per_call rows (prefixes x m),
        each with its own key folded from `key`."""
        m = 1 if self.greedy else (samples or self.cfg.samples)
        final = final or [False] * len(prefixes)
        forced = self.forced_prompts(prompts, prefixes, final)
        step = max(1, rows_per_call // m)
        answers, texts = [], []
        for n, start in enumerate(range(0, len(forced), step)):
            out = sampler.complete(model, forced[start:start + step], max_new_tokens=self.cfg.answer_tokens,
                                   sampling_params=self.cfg.sampling, num_samples=m, stops=self.fmt.stops.ends_only(),
                                   key=jax.random.fold_in(key, n) if n else key)
            answers += out.by_prompt(out.ids)
            texts += out.texts(self.fmt, [self.suffix_text(f).lstrip() for f in final[start:start + step]])
        outcomes = rollout.grade(self.task, texts, golds).astype(np.float32)
        return Forced(j=outcomes.mean(axis=1), outcomes=outcomes, texts=texts, answer_ids=answers)

    def likelihood(self, scorer: Scorer, params, prompts, prefixes, golds: Sequence[str],
                   rows_per_call: int = 1024, final: Sequence[bool] | None = None) -> Forced:
        """J = exp log π(t | x ⊕ c ⊕ suffix), t = " {gold}." + end token, under `params`, scored
        in calls of at most rows_per_call rows."""
        final = final or [False] * len(prefixes)
        if len(prompts) > rows_per_call:
            parts = [self.likelihood(scorer, params, prompts[i:i + rows_per_call], prefixes[i:i + rows_per_call],
                                     golds[i:i + rows_per_call], rows_per_call, final[i:i + rows_per_call])
                     for i in range(0, len(prompts), rows_per_call)]
            return Forced(j=np.concatenate([f.j for f in parts]))
        fmt = self.fmt
        contexts = [list(c) + self.suffix_ids(c, f) for c, f in zip(prefixes, final)]
        suffix_texts = [fmt.tokenizer.decode(c) for c in contexts]
        targets = [continuation_ids(fmt.tokenizer, text, f" {gold}.") + [fmt.end_id]
                   for text, gold in zip(suffix_texts, golds)]
        width, length = rollout.row_widths(max(map(len, prompts)), max(map(len, contexts)) + max(map(len, targets)))
        rows = rollout.assemble_rows(prompts, contexts, targets, prompt_width=width, length=length,
                                     pad_id=fmt.pad_id)
        (logp,) = scorer.span_logprobs(params, scorer.padded(rows.arrays()), ("answer_mask",))
        return Forced(j=np.exp(logp[:len(prompts)]))

    def estimate(self, sampler: Sampler, scorer: Scorer, params, prompts, prefixes, golds: Sequence[str],
                 key: jax.Array, final: Sequence[bool] | None = None) -> Forced:
        """J by the configured estimator under `params` (of the scorer's model graph); `final`
        marks the prefixes that are a whole thinking (forced with final_suffix)."""
        if self.cfg.estimator == "likelihood":
            return self.likelihood(scorer, params, prompts, prefixes, golds, final=final)
        return self.mc(sampler, scorer.model(params), prompts, prefixes, golds, key, final=final)
