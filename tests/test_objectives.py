"""LaTRO / SFT objectives against independent NumPy implementations, finite differences and
the score-function form of the gradient; chunked token log-probabilities against a full
log-softmax."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from latro_jax import logprobs, models, objectives, rollout, scoring, sharding


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


# ---------------------------------------------------------------- token log-probs
def _tiny_model(seed=0, dtype="float32"):
    config = models.ModelConfig(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                                initializer_range=0.3)
    return models.init_model(config, seed=seed, dtype=dtype, param_dtype=dtype)


@pytest.mark.parametrize("chunk", [1, 5, 6, 128])  # 16 positions: 16 x 1, 4 x 4, 3 x 6 (2 padded), 1 x 16
def test_chunked_token_logprobs_equal_full_log_softmax(chunk):
    model = _tiny_model()
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, 40, (3, 17)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    valid[1, :4] = False  # left padding
    valid[2, 12:] = False  # right padding
    logits = np.asarray(model(tokens, valid=valid)).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = np.zeros(tokens.shape)
    expected[:, 1:] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    got = np.asarray(logprobs.token_logprobs(model, tokens, valid, chunk_size=chunk))
    np.testing.assert_allclose(got, expected, atol=2e-5)


# ---------------------------------------------------------------- shared prompt columns
def _shared_prompt_rows(K):
    """Two ragged prompts, K rows each: rationales of every length (one empty), two answers."""
    rng = np.random.RandomState(4)
    prompts, answers = [[5, 6, 7], [8, 9]], [[30, 31], [32, 33, 34]]
    rationales = [list(rng.randint(3, 40, n)) for n in rng.randint(0, 7, 2 * K)]
    rationales[1] = []
    return rollout.assemble_rows([p for p in prompts for _ in range(K)], rationales,
                                 [answers[r // K] for r in range(2 * K)], prompt_width=4, length=16)


@pytest.mark.parametrize("variant", [{"sliding_window": 3, "attention_bias": True},
                                     {"num_kv_heads": 4, "tie_word_embeddings": True}],
                         ids=["gqa_window_bias", "mha_tied"])
def test_shared_prompt_columns_give_the_per_row_logprobs_and_gradients(variant):
    """token_logprobs(shared_prefix=(W, g)) runs each group's prompt columns once: in float64 the
    log-probability of every real token after the prompt, and the gradient of a LaTRO loss, equal
    the per-row pass to rounding, for groups of all K rows and of half of them."""
    K = 6
    rows = _shared_prompt_rows(K)
    A = np.linspace(-1, 1, 2 * K)
    with jax.enable_x64(True):
        config = models.ModelConfig(**{**dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                                              initializer_range=0.3), **variant})
        graphdef, params = nnx.split(models.init_model(config, seed=2, dtype="float64", param_dtype="float64"))

        @functools.partial(jax.jit, static_argnums=0)
        def logp_and_grads(shared):
            def loss(params):
                logp = logprobs.token_logprobs(nnx.merge(graphdef, params), rows.tokens, rows.valid,
                                              chunk_size=5, shared_prefix=shared)
                z, y = logprobs.span_logprob(logp, rows.rationale_mask), logprobs.span_logprob(logp, rows.answer_mask)
                return objectives.latro_loss(z, y, A, sft_coef=1.0), logp
            (_, logp), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return logp, grads

        plain, plain_grads = logp_and_grads(None)
        plain = np.asarray(plain)
        targets = rows.valid.copy()
        targets[:, :4] = False
        for group in (K, 3):
            logp, grads = logp_and_grads((4, group))
            logp = np.asarray(logp)
            np.testing.assert_allclose(logp[targets], plain[targets], rtol=1e-12, atol=1e-12)
            assert not logp[:, :4].any()  # the prompt's own columns are not computed
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_prefix_sharing_groups_what_each_device_holds_whole():
    config = _tiny_model().config

    def rows(questions, K, width=8):
        prompts = [[5 + q] * (1 + q % width) for q in range(questions) for _ in range(K)]
        return rollout.assemble_rows(prompts, [[20]] * len(prompts), [[30]] * len(prompts),
                                     prompt_width=width, length=12)

    assert scoring.prefix_sharing(config, rows(4, 16), 16, microbatches=2) == (8, 16)
    assert scoring.prefix_sharing(config, rows(2, 16), 16, microbatches=4) == (8, 8)
    mesh = sharding.make_mesh(data=8)  # 8 fake CPU devices (conftest)
    assert scoring.prefix_sharing(config, rows(2, 16), 16, mesh=mesh) == (8, 4)
    assert scoring.prefix_sharing(config, rows(2, 4), 4, mesh=mesh) is None  # one row per device
    assert scoring.prefix_sharing(config, rows(2, 3), 3, microbatches=3) is None  # 2 rows each: gcd(3, 2) = 1
    longrope = dataclasses.replace(config, rope_scaling=models.RopeScaling(
        rope_type="longrope", short_factor=(1.0, 1.0), long_factor=(2.0, 2.0),
        original_max_position_embeddings=64))
    assert scoring.prefix_sharing(longrope, rows(4, 16), 16) is None
    mixed = rows(4, 4)
    mixed.tokens[1, 7] = 39  # row 1's prompt differs from row 0's
    with pytest.raises(ValueError, match="first 8 tokens columns are not the same within each run of 4"):
        scoring.prefix_sharing(config, mixed, 4)


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
