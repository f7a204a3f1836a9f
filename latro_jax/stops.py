"""How a generation ends: stop ids and stop phrases (token-id sequences), and where a sampled
sequence is cut by them. The formatter gives each algorithm its stops (PromptFormatter.stops:
end ids and the answer phrases; .ends_only(): the end ids), the sampler stops rows on them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Stops:
    """Stop token ids (EOS, end-of-turn, pad) and stop phrases as token-id sequences (e.g. the
    tokens of "The answer is")."""

    ids: tuple[int, ...] = ()
    phrases: tuple[tuple[int, ...], ...] = ()

    def ends_only(self) -> "Stops":
        """The stop ids alone (a completion that runs to its end token)."""
        return Stops(self.ids)


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
