"""Rows from samples: truncation at the first stop and [x | z | y] assembly on hand-written ids."""

import numpy as np
import pytest

from latro_jax import rollout
from latro_jax.rollout import Stops


STOPS = Stops(ids=(2, 0), phrases=((50, 51, 52), (60, 61)))


@pytest.mark.parametrize("tokens,expected", [
    ([7, 8, 9, 50, 51, 52, 10], (3, True)),     # phrase spanning three tokens: cut at its start
    ([7, 8, 9, 10, 11], (5, False)),            # no stop at all: unfinished, nothing cut
    ([2, 7, 8], (0, True)),                     # EOS as the first token: empty rationale
    ([50, 51, 52, 7], (0, True)),               # stop phrase at the first token
    ([7, 60, 61, 8, 2], (1, True)),             # phrase before EOS
    ([7, 8, 2, 50, 51, 52], (2, True)),         # EOS before phrase
    ([7, 8, 50, 51], (4, False)),               # phrase cut off by the length limit: unfinished
    ([7, 0, 0, 0], (1, True)),                  # pad ends the rationale
    ([7, 50, 51, 60, 61], (3, True)),           # an incomplete phrase is rationale text
])
def test_truncate_rationale(tokens, expected):
    assert rollout.truncate(tokens, STOPS) == expected


def test_assemble_rows_layout_and_masks():
    rows = rollout.assemble_rows([[5, 6], [7, 8, 9]], [[20, 21], []], [[30], [31, 32]],
                                    prompt_width=3, length=8, pad_id=0)
    np.testing.assert_array_equal(rows.tokens, [[0, 5, 6, 20, 21, 30, 0, 0],
                                                [7, 8, 9, 31, 32, 0, 0, 0]])
    np.testing.assert_array_equal(rows.valid, rows.tokens != 0)
    np.testing.assert_array_equal(rows.rationale_mask, [[0, 0, 0, 1, 1, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(rows.answer_mask, [[0, 0, 0, 0, 0, 1, 0, 0],
                                                     [0, 0, 0, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="do not fit"):
        rollout.assemble_rows([[5]], [[1] * 6], [[2, 3]], prompt_width=3, length=8)


def test_overlapping_phrases_cut_at_the_earliest_start():
    """ " the answer is" (60, 61) sits inside "So, the answer is" (55, 56, 60, 61): the cut is
    before "So", whichever phrase is listed first."""
    stops = Stops(ids=(2,), phrases=((60, 61), (55, 56, 60, 61)))
    assert rollout.truncate([7, 8, 55, 56, 60, 61, 9], stops) == (2, True)
    assert rollout.truncate([7, 8, 55, 56, 60, 61, 9], Stops((2,), stops.phrases[::-1])) == (2, True)
    assert rollout.truncate([7, 60, 61, 55, 56, 60, 61], stops) == (1, True)
