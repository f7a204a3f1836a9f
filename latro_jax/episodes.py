"""Episodes of a reasoning trace (SPEC 2.2): consecutive pieces of the thinking, token-exact.

    segmenter = Segmenter(SegmentConfig(rule="end_tokens", end_texts=(".",)), tokenizer, thinking_end)
    episodes = segmenter(sampled_ids)
    episodes.prefix(j)      # ids of the first j episodes (j = 0: empty)
    episodes.pieces()       # every episode's ids; they concatenate to sampled_ids exactly
    episodes.texts(tok)     # the same as text, for inspection

Two rules:
- `markers` (the authors' analysis code, R1 traces): the thinking text splits at "\\n\\n" into
  paragraphs; a paragraph that starts with a marker ("Wait", "But wait", "Alternatively", ...)
  starts a new episode unless the previous split (the start counts as one) was `gap` or fewer
  paragraphs earlier. At most `max_splits` splits. A boundary is the first character of the
  marker paragraph; it maps to the end of the token holding it.
- `end_tokens` (explicit steps): an episode ends after any of the token sequences of
  `end_texts` ("2+8=10." is one episode of the synthetic task).
Afterwards consecutive episodes may be merged in groups of `group_size`. The thinking is the
trace before `thinking_end` (the answer phrases, or "</think>"); what follows it (the answer)
belongs to no episode and is attached to the last piece.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from latro_jax.stops import Stops, truncate

MARKERS = ("Wait", "But wait", "Alternatively", "Is there another way to think about this?",
           "But let me double-check", "But hold on")
RULES = ("markers", "end_tokens")


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """rule: markers | end_tokens; markers / gap / max_splits: the markers rule (analysis code:
    gap 2, max_splits 99); end_texts: the end_tokens rule's episode ends; group_size: merge
    consecutive episodes in groups (1 = off; the regret analysis used 10); thinking_end: where
    the thinking stops (R1: "</think>"; default: the task's answer phrases and end ids)."""

    rule: str = "end_tokens"
    markers: tuple[str, ...] = MARKERS
    gap: int = 2
    max_splits: int = 99
    end_texts: tuple[str, ...] = (".",)
    group_size: int = 1
    thinking_end: tuple[str, ...] = ()  # texts that end the thinking ("</think>"); (): the answer phrases

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"segment.rule={self.rule!r}: choose one of {RULES}")
        if self.gap < 0 or self.max_splits < 0 or self.group_size < 1:
            raise ValueError(f"segment: gap={self.gap} and max_splits={self.max_splits} must be >= 0, "
                             f"group_size={self.group_size} >= 1")
        if self.rule == "end_tokens" and not self.end_texts:
            raise ValueError("segment.end_texts: the end_tokens rule needs at least one episode end")


def marker_starts(text: str, markers: Sequence[str], gap: int = 2, max_splits: int = 99) -> list[int]:
    """Character offsets where new episodes start (the markers rule on text)."""
    paragraphs = text.split("\n\n")
    offsets, position = [], 0
    for p in paragraphs:
        offsets.append(position)
        position += len(p) + 2
    starts, previous = [], 0
    for i, paragraph in enumerate(paragraphs):
        if len(starts) == max_splits:
            break
        if paragraph.startswith(tuple(markers)) and i - previous > gap:
            starts.append(offsets[i])
            previous = i
    return starts


def sequence_ends(ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> list[int]:
    """Token indices just after each occurrence of any of `sequences` (scanning left to right,
    occurrences do not overlap)."""
    ends, i = [], 0
    while i < len(ids):
        hit = next((len(s) for s in sequences if list(ids[i:i + len(s)]) == list(s)), 0)
        if hit:
            ends.append(i + hit)
            i += hit
        else:
            i += 1
    return ends


def token_ends(ids: Sequence[int], tokenizer, char_offsets: Sequence[int]) -> list[int]:
    """For each character offset of decode(ids), the end of the token holding it: the fewest
    leading tokens whose decoded text reaches the offset (binary search on prefix decodes)."""
    ends = []
    for offset in char_offsets:
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(list(ids[:mid]))) >= offset:
                hi = mid
            else:
                lo = mid + 1
        ends.append(lo)
    return ends


@dataclasses.dataclass(frozen=True)
class Episodes:
    """A trace split into episodes: ids (the whole trace), thinking (tokens of the thinking),
    ends (exclusive end of each episode, increasing, the last == thinking)."""

    ids: tuple[int, ...]
    thinking: int
    ends: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ends)

    def prefix(self, j: int) -> list[int]:
        """The first j episodes (0 <= j <= count)."""
        if not 0 <= j <= self.count:
            raise ValueError(f"prefix of {j} episodes; the trace has {self.count}")
        return list(self.ids[:self.ends[j - 1]]) if j else []

    def pieces(self) -> list[list[int]]:
        """Every episode's ids, the answer part attached to the last one (or alone when the
        thinking is empty): they concatenate to `ids`."""
        bounds = [0, *self.ends[:-1], len(self.ids)] if self.ends else [0, len(self.ids)]
        return [list(self.ids[a:b]) for a, b in zip(bounds, bounds[1:])]

    def texts(self, tokenizer) -> list[str]:
        """The pieces as text (the last one with the answer part)."""
        return [tokenizer.decode(p) for p in self.pieces()]

    def episode_texts(self, tokenizer) -> list[str]:
        """The episodes alone as text (no answer part)."""
        bounds = [0, *self.ends]
        return [tokenizer.decode(list(self.ids[a:b])) for a, b in zip(bounds, bounds[1:])]


class Segmenter:
    """Splits traces (token ids) into Episodes by a SegmentConfig. `thinking_end` says where
    the thinking stops (stops.Stops: end ids and phrases such as "The answer is")."""

    def __init__(self, cfg: SegmentConfig, tokenizer, thinking_end: Stops):
        self.cfg, self.tokenizer, self.thinking_end = cfg, tokenizer, thinking_end
        if cfg.rule == "end_tokens":
            from latro_jax.data.prompts import phrase_variants
            self.end_sequences = sorted({v for t in cfg.end_texts for v in phrase_variants(tokenizer, t)},
                                        key=len, reverse=True)

    def episode_ends(self) -> list[list[int]]:
        """Token sequences that end an episode while sampling: the end_tokens rule's ends, or a
        blank line followed by a marker (that episode then holds the marker's tokens too)."""
        if self.cfg.rule == "end_tokens":
            return [list(s) for s in self.end_sequences]
        from latro_jax.data.prompts import continuation_ids
        return [continuation_ids(self.tokenizer, "x.", "\n\n" + m) for m in self.cfg.markers]

    def __call__(self, ids: Sequence[int]) -> Episodes:
        ids = list(ids)
        thinking, _ = truncate(ids, self.thinking_end)
        head = ids[:thinking]
        if self.cfg.rule == "end_tokens":
            ends = sequence_ends(head, self.end_sequences)
        else:
            text = self.tokenizer.decode(head)
            starts = marker_starts(text, self.cfg.markers, self.cfg.gap, self.cfg.max_splits)
            ends = token_ends(head, self.tokenizer, starts)
        ends = sorted({e for e in ends if 0 < e < thinking} | ({thinking} if thinking else set()))
        if self.cfg.group_size > 1:
            ends = sorted(set(ends[self.cfg.group_size - 1::self.cfg.group_size]) | {ends[-1]}) if ends else []
        return Episodes(tuple(ids), thinking, tuple(ends))


def make_segmenter(cfg: SegmentConfig, fmt) -> Segmenter:
    """A Segmenter for a prompt formatter: the thinking ends at the formatter's stop ids and at
    `cfg.thinking_end` (every spelling) or, by default, at its answer phrases."""
    from latro_jax.data.prompts import phrase_variants
    phrases = (tuple(sorted({v for t in cfg.thinking_end for v in phrase_variants(fmt.tokenizer, t)}))
               if cfg.thinking_end else fmt.stops.phrases)
    return Segmenter(cfg, fmt.tokenizer, Stops(fmt.stops.ids, phrases))
