"""The log-prob math (logprobs.py) and the scorer's prefix sharing (scoring.py): chunked token
log-probabilities against a full log-softmax, shared prompt columns against per-row passes
(values and gradients), and the groups each device holds whole."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from latro_jax import logprobs, models, objectives, rollout, scoring, sharding
from hf_models import tiny_llama as _tiny_model


@pytest.mark.slow
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
@pytest.mark.slow
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
