"""LaTRO / SFT objectives against independent NumPy implementations, finite differences and
the score-function form of the gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import tiny_llama as _tiny_model
from latro_jax import logprobs, objectives, rollout


# ---------------------------------------------------------------- NumPy references
def np_rloo(r):
    N, K = r.shape
    return np.array([[r[i, k] - np.mean(np.delete(r[i], k)) for k in range(K)] for i in range(N)])


def np_rewards(y, z, z_ref, finished, beta, gamma):
    mean_all = y.mean()
    out = np.empty_like(y)
    for idx in np.ndindex(y.shape):
        r = y[idx] if finished[idx] else gamma * mean_all
        out[idx] = r - beta * (z[idx] - z_ref[idx])
    return out


@pytest.mark.parametrize("N,K", [(3, 2), (4, 16), (1, 5)])
def test_rloo_matches_numpy(N, K):
    r = np.random.RandomState(N * K).randn(N, K).astype(np.float32)
    np.testing.assert_allclose(objectives.rloo_advantages(r), np_rloo(r), rtol=1e-5, atol=1e-6)


def test_rloo_refuses_one_sample():
    with pytest.raises(ValueError, match="K >= 2"):
        objectives.rloo_advantages(np.zeros((3, 1), np.float32))


@pytest.mark.parametrize("K", [2, 8])
def test_latro_rewards_match_numpy_with_unfinished_rows(K):
    rng = np.random.RandomState(K)
    y = -rng.rand(5, K).astype(np.float32) * 10
    z, z_ref = -rng.rand(5, K).astype(np.float32) * 50, -rng.rand(5, K).astype(np.float32) * 50
    finished = rng.rand(5, K) > 0.3
    assert (~finished).any() and finished.any()
    got = objectives.latro_rewards(y, z, z_ref, finished, beta=0.05, nonstop_penalty=2.0)
    np.testing.assert_allclose(got, np_rewards(y, z, z_ref, finished, 0.05, 2.0), rtol=1e-5)


def test_latro_loss_matches_numpy():
    rng = np.random.RandomState(0)
    z, y, A = (rng.randn(6, 4).astype(np.float32) for _ in range(3))
    expected = np.mean(-A * z - 0.5 * y)
    np.testing.assert_allclose(objectives.latro_loss(z, y, A, sft_coef=0.5), expected, rtol=1e-6)


def test_sft_loss_matches_numpy():
    rng = np.random.RandomState(1)
    logp, mask = -rng.rand(3, 9).astype(np.float32), (rng.rand(3, 9) > 0.5).astype(np.float32)
    np.testing.assert_allclose(objectives.sft_loss(logp, mask), -(logp * mask).sum() / mask.sum(), rtol=1e-6)


# ---------------------------------------------------------------- gradients
def _rows_and_advantages():
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    rationales = [[20, 21, 22], [23], [24, 25]]
    answers = [[30, 31], [32, 33, 34], [30, 35]]
    rows = rollout.assemble_rows(prompts, rationales, answers, prompt_width=4, length=12)
    advantages = np.array([0.7, -1.2, 0.4], np.float32)
    return rows, advantages


def _loss_of(graphdef, rows, advantages, sft_coef):
    def loss(params):
        model = nnx.merge(graphdef, params)
        logp = logprobs.token_logprobs(model, rows.tokens, rows.valid, chunk_size=4)
        z = logprobs.span_logprob(logp, rows.rationale_mask)
        y = logprobs.span_logprob(logp, rows.answer_mask)
        return objectives.latro_loss(z, y, advantages, sft_coef=sft_coef)
    return loss


@pytest.mark.slow
def test_loss_gradient_matches_finite_differences():
    """In float64 (model, log-probs and loss), so the central difference's own rounding noise
    (~1e-13) is far below the 1e-6 relative tolerance."""
    with jax.enable_x64(True):
        graphdef, params = nnx.split(_tiny_model(seed=1, dtype="float64"))
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float64")}
        rows, A = _rows_and_advantages()
        loss = _loss_of(graphdef, rows, A.astype(np.float64), sft_coef=1.0)
        assert loss(params).dtype == jnp.float64
        grads = jax.grad(loss)(params)
        rng = np.random.RandomState(3)
        for trial in range(3):
            direction = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), p.dtype), params)
            eps = 1e-5
            shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
            fd = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * eps)
            ad = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            assert abs(fd - ad) <= 1e-6 * max(1.0, abs(ad)), (trial, fd, ad)


@pytest.mark.slow
def test_surrogate_gradient_equals_score_function_estimator():
    """grad loss = 1/(NK) * sum_k [ -A_k grad log pi(z_k|x) - c grad log pi(y|x+z_k) ], the
    right side from each row alone, its log-probabilities from the model's full logits
    (log_softmax over the whole vocabulary, no chunking, no masks) and the spans' positions."""
    graphdef, params = nnx.split(_tiny_model(seed=2))
    rows, A = _rows_and_advantages()
    c = 0.6
    got = jax.grad(_loss_of(graphdef, rows, A, sft_coef=c))(params)
    spans = [([5, 6, 7], [20, 21, 22], [30, 31]), ([8, 9], [23], [32, 33, 34]), ([10, 11, 12, 13], [24, 25], [30, 35])]

    def span(params, b, part):
        x, z, y = spans[b]
        seq = np.array([x + z + y], np.int32)
        logp = jax.nn.log_softmax(nnx.merge(graphdef, params)(seq)[0], axis=-1)
        start, end = (len(x), len(x) + len(z)) if part == "z" else (len(x) + len(z), len(seq[0]))
        return sum(logp[t - 1, seq[0, t]] for t in range(start, end))

    expected = jax.tree.map(jnp.zeros_like, params)
    for b in range(3):
        gz, gy = jax.grad(span)(params, b, "z"), jax.grad(span)(params, b, "y")
        expected = jax.tree.map(lambda e, z, y: e + (-A[b] * z - c * y) / 3, expected, gz, gy)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
