"""Rows from samples: truncation at the first stop and [x | z | y] assembly on hand-written ids;
the policy's log-probs from the sampler against a scoring pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import token_context
from latro_jax import models, rollout, sampling
from latro_jax.algorithms import Latro, LatroConfig, Learner
from latro_jax.models import ModelConfig
from latro_jax.stops import Stops
from latro_jax.sampling import SamplingParams
from latro_jax.scoring import Scorer
from latro_jax.stops import truncate
from latro_jax.train import OptimConfig, RowLayout
from latro_jax.update_plan import Lengths


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
    assert truncate(tokens, STOPS) == expected


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
    assert truncate([7, 8, 55, 56, 60, 61, 9], stops) == (2, True)
    assert truncate([7, 8, 55, 56, 60, 61, 9], Stops((2,), stops.phrases[::-1])) == (2, True)
    assert truncate([7, 60, 61, 55, 56, 60, 61], stops) == (1, True)


# ---------------------------------------------------------------- the policy's log-probs from the sampler
TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_id=(2,))


def _scored_both_ways(model, sampling_params, key):
    """The same rollout with and without policy_logprobs, and the scorer's span log-probs of its rows."""
    prompts, answers = [[5, 6, 7], [9, 10, 11, 12, 13, 3], [40]], [[30, 31, 2], [32, 2], [33, 34, 35, 36, 2]]
    kw = dict(num_samples=4, max_new_tokens=10, sampling_params=sampling_params,
              stops=Stops(ids=(2,), phrases=((7, 8), (20,))), key=key)
    fast = rollout.sample_rows(rollout.Sampler(), model, prompts, answers, [[44, 2]] * 3, policy_logprobs=True, **kw)
    plain = rollout.sample_rows(rollout.Sampler(), model, prompts, answers, [[44, 2]] * 3, **kw)
    graphdef, params = nnx.split(model)
    scored = Scorer(graphdef, model.config).span_logprobs(params, plain.rows.arrays(), ("rationale_mask", "answer_mask"))
    return fast, plain, scored


@pytest.mark.slow
def test_sampler_logprobs_and_cache_give_the_scorers_policy_logprobs():
    """At T = 1 (no top-k/top-p) the rollout's log pi(z|x) (the sampler's own token log-probs up
    to the cut) and log pi(y|x+z) (y fed after the cut from the sampler's KV cache) equal a
    policy pass over the assembled rows: ragged prompts, rationales cut at a stop id, at a
    phrase, empty, and unfinished, answers of every length."""
    model = models.init_model(TINY, seed=3)
    fast, plain, (z_logp, y_logp) = _scored_both_ways(model, SamplingParams(1.0), jax.random.key(7))
    np.testing.assert_array_equal(fast.rows.tokens, plain.rows.tokens)  # the same samples
    assert plain.z_logp is None and plain.y_logp is None
    lengths = set(fast.lengths.tolist())
    assert 0 in lengths and fast.finished.any() and not fast.finished.all(), (lengths, fast.finished)
    np.testing.assert_allclose(fast.z_logp, z_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.y_logp, y_logp, rtol=1e-5, atol=1e-5)
    assert np.abs(y_logp).min() > 1.0  # real log-probs, not zeros


@pytest.mark.slow
def test_other_sampling_distributions_leave_the_policy_pass_to_the_scorer():
    """At T != 1, or with top-k / top-p, the sampler's log-probs are not the policy's."""
    model = models.init_model(TINY, seed=3)
    for params in (SamplingParams(0.7), SamplingParams(1.0, top_k=5), SamplingParams(1.0, top_p=0.9)):
        fast, _, _ = _scored_both_ways(model, params, jax.random.key(7))
        assert fast.z_logp is None and fast.y_logp is None, params


@pytest.mark.slow
def test_rollout_rows_pad_only_to_a_multiple_of_8_after_the_prompt():
    """A rollout row is its prompt bucket plus L + the longest y rounded up to 8 columns: every
    row pays for the columns after a shared prompt, and bucketing the whole row padded them by
    up to 40% (the bench shape's 64 + 128 + 8 tokens: 224 columns, now 200). Rows of varying
    bodies (SFT completions, MRT contexts) have their body bucketed."""
    assert rollout.row_widths(64, 128 + 8, body_multiple=8) == (64, 200)
    assert rollout.row_widths(64, 128 + 9, body_multiple=8) == (64, 208)
    assert rollout.row_widths(64, 128 + 8) == (64, 64 + 160)  # the body bucketed
    assert rollout.row_widths(512, 16384) == (512, 16896)  # a power-of-two budget exact
    model = models.init_model(TINY, seed=3)
    ro = rollout.sample_rows(rollout.Sampler(), model, [[5] * 20, [6] * 17], [[30, 31, 2], [32, 2]], num_samples=2,
                             max_new_tokens=10, sampling_params=SamplingParams(1.0), stops=Stops(ids=()),
                             key=jax.random.key(0))
    assert (ro.rows.prompt_width, ro.rows.tokens.shape[1]) == (20, 20 + 16)  # whole-row bucket: 40
    np.testing.assert_array_equal(ro.rows.answer_mask.sum(1), [3, 3, 2, 2])


def _latro_two_ways(configs, microbatches=1, contexts=({}, {})):
    """LaTRO's scored batch and gradient on the same rollout under two LatroConfig variants (and
    Context keywords)."""
    model = models.init_model(TINY, seed=5)
    runs = []
    for cfg, kw in zip(configs, contexts):
        ctx = token_context(Stops(ids=(2,), phrases=((7, 8),)), microbatches=microbatches, **kw)
        latro = Latro(LatroConfig(num_samples=4, max_rationale_tokens=10, **cfg), ctx)
        learner = Learner(latro, model, OptimConfig(total_steps=1))
        policies = learner.policies()
        ro = latro.sample(policies, [[5, 9, 11], [12, 4]], [[30, 31, 2], [32, 2]], None, jax.random.key(3))
        scored = latro.score(policies, ro)
        runs.append((ro, scored, learner.trainer.gradients(scored.arrays, scored.scalars, scored.layout)))
    (_, a, grads_a), (_, b, grads_b) = runs
    for k in ("z_logp", "y_logp", "ref_z_logp", "rewards"):
        np.testing.assert_allclose(a.details[k], b.details[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(a.arrays["advantages"], b.arrays["advantages"], atol=1e-5)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    return runs


@pytest.mark.slow
def test_latro_update_from_the_sampler_equals_the_scoring_pass():
    """LaTRO's rewards, advantages and gradient with reuse_sampler_logprobs on and off."""
    (fast, *_), (plain, *_) = _latro_two_ways([dict(reuse_sampler_logprobs=True), dict(reuse_sampler_logprobs=False)])
    assert fast.z_logp is not None and plain.z_logp is None


@pytest.mark.slow
def test_latro_with_the_sampler_in_calls_of_fewer_rows_equals_one_call():
    """A stage's sample_rows_per_call = 6 (a question's K = 4 rows fit once: 2 calls of one
    question) draws the same rationales as one call (draws keyed by row), so the same scored
    batch and gradient; the policy's log-probs then come from a scoring pass, since no one call's
    cache holds every row, and the plan (what compile_check compiles) says so."""
    (chunked, *_), (whole, *_) = _latro_two_ways([dict(reuse_sampler_logprobs=True)] * 2,
                                                 contexts=(dict(sample_rows_per_call=6), {}))
    np.testing.assert_array_equal(chunked.rows.tokens, whole.rows.tokens)
    assert chunked.z_logp is None and whole.z_logp is not None
    for rows, policy_pass in ((6, True), (0, False)):
        latro = Latro(LatroConfig(num_samples=4, max_rationale_tokens=10), token_context(sample_rows_per_call=rows))
        plan = latro.plan(2, Lengths(3, 3), TINY)
        assert ("policy" in [p.name for p in plan.scoring]) == policy_pass
        (gen,) = [g.in_calls_of(rows) for g in plan.generations]
        assert (gen.prompts, gen.calls) == ((1, 2) if rows else (2, 1))


@pytest.mark.slow
def test_the_frozen_reference_is_kept_in_the_compute_dtype_and_scores_exactly_as_the_weights():
    """bfloat16 compute over float32 parameters: the reference (and pi_old) is a bfloat16 copy,
    half the bytes, whose log-probs equal the float32 weights' bit for bit (the model casts
    every weight to bfloat16 before use); a float32 model keeps a float32 copy; a step on the
    policy leaves the copy unchanged (no shared buffer)."""
    ctx = token_context()
    for dtype, frozen in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        model = models.init_model(TINY, seed=5, dtype=dtype)
        learner = Learner(Latro(LatroConfig(num_samples=2, max_rationale_tokens=4), ctx), model,
                          OptimConfig(learning_rate=1e-2, total_steps=2))
        params, reference = learner.state.params, learner.reference
        assert {x.dtype for x in jax.tree.leaves(reference)} == {jnp.dtype(frozen)}, dtype
        ratio = sum(x.nbytes for x in jax.tree.leaves(reference)) / sum(x.nbytes for x in jax.tree.leaves(params))
        assert ratio == (0.5 if dtype == "bfloat16" else 1.0)
        rows = {"tokens": np.array([[1, 5, 9, 12, 30, 2, 0, 0]] * 8, np.int32), "valid": np.ones((8, 8), bool)}
        before = learner.scorer.token_logprobs(reference, rows)
        np.testing.assert_array_equal(before, learner.scorer.token_logprobs(params, rows))
    batch = dict(rows, rationale_mask=np.ones((8, 8), np.float32), answer_mask=np.ones((8, 8), np.float32),
                 advantages=np.ones(8, np.float32))
    learner.trainer.step(batch, {"rows": 8.0}, RowLayout())  # donates the policy's buffers
    assert not np.array_equal(before, learner.scorer.token_logprobs(learner.state.params, rows))
    np.testing.assert_array_equal(before, learner.scorer.token_logprobs(learner.reference, rows))


@pytest.mark.slow
def test_latro_with_shared_prompts_equals_per_row_passes():
    """share_prompts (each question's prompt run once for its K rows in the scoring passes and
    the step, here 2 micro-batches of one question each) against one pass per row: the same
    log-probs, rewards, advantages and gradient."""
    (ro, shared, _), (_, plain, _) = _latro_two_ways(
        [dict(reuse_sampler_logprobs=False, share_prompts=share) for share in (True, False)], microbatches=2)
    assert shared.layout.shared_prefix == (ro.rows.prompt_width, 4)
    assert plain.layout.shared_prefix is None


@pytest.mark.slow
def test_continuation_needs_the_reserved_slots():
    model = models.init_model(TINY, seed=3)
    out = sampling.generate(model, [[5, 6]], 4, sampling=SamplingParams(1.0), reserve_slots=4)
    with pytest.raises(ValueError, match="reserve_slots >= 5"):
        sampling.continuation_logprobs(model, out, [[5, 6]], [1], [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="generate.*reserve_slots"):
        sampling.continuation_logprobs(model, sampling.generate(model, [[5, 6]], 4), [[5, 6]], [1], [[1]])
