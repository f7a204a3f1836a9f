"""The likelihood-reward family (SPEC 3.1; objectives.py, algorithms/likelihood.py): SPEC 3.3's
H1 hand values for VeriFree and JEPO, NumPy transcriptions on random inputs, JEPO's weights as
the gradient of its bound (finite differences), and both algorithms on a real LaTRO rollout:
the batch they learn from and the loss the step differentiates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from latro_jax import job as jobs, objectives, run
from latro_jax.algorithms import Learner

H1_L = np.array([[-0.5, -2.0, -1.2, -4.0]])
H1_S = np.array([[-10.0, -14.0, -12.0, -9.0]])
H1_FINISHED = np.array([[True, True, True, False]])


def np_rloo(v):
    K = v.shape[-1]
    return np.stack([v[:, k] - np.delete(v, k, axis=1).mean(1) for k in range(K)], axis=1)


def np_jepo_multi(l):
    """SPEC 3.1 written out: L = log(1/K sum e^l), A_k = L - log(1/(K-1) sum_{j!=k} e^l_j), w = softmax(l)."""
    K = l.shape[-1]
    bound = np.log(np.exp(l).mean(1))
    A = np.stack([bound - np.log(np.exp(np.delete(l, k, axis=1)).sum(1) / (K - 1)) for k in range(K)], axis=1)
    return bound, A, np.exp(l) / np.exp(l).sum(1, keepdims=True)


def _loss(A, w, s=H1_S, l=H1_L):
    return float(objectives.latro_loss(jnp.asarray(s), jnp.asarray(l), jnp.asarray(A), sft_coef=jnp.asarray(w)))


def test_verifree_hand_values():
    with jax.enable_x64(True):
        R = objectives.verifree_rewards(H1_L, H1_FINISHED)
        np.testing.assert_allclose(R, [[0.6065307, 0.1353353, 0.3011942, 0.0]], atol=1e-7)
        A = objectives.rloo_advantages(R)
        np.testing.assert_allclose(A, [[0.4610208, -0.1672397, 0.05390556, -0.3476867]], atol=1e-7)
        assert _loss(A, R) == pytest.approx(0.1804770, abs=1e-7)
        np.testing.assert_allclose(objectives.verifree_rewards(H1_L, H1_FINISHED, "logprob"), [[-0.5, -2, -1.2, 0]])


def test_jepo_hand_values():
    with jax.enable_x64(True):
        A = objectives.rloo_advantages(H1_L)  # single: all 4 rows scored
        np.testing.assert_allclose(A, [[1.9, -0.1, 0.9666667, -2.766667]], atol=1e-6)
        assert _loss(A, np.ones_like(A)) == pytest.approx(3.0, abs=1e-7)
        A, w = objectives.jepo_multi(H1_L)
        bound, _, _ = np_jepo_multi(H1_L)
        assert bound[0] == pytest.approx(-1.326728, abs=1e-6)
        np.testing.assert_allclose(A, [[0.5596822, -0.1512788, 0.04608186, -0.2702749]], atol=1e-7)
        np.testing.assert_allclose(w, [[0.5714570, 0.1275093, 0.2837772, 0.01725651]], atol=1e-7)
        assert 4 * _loss(A, w) == pytest.approx(2.549733, abs=1e-6)  # 1/N sum_k = K x the row mean


@pytest.mark.parametrize("seed", range(4))
def test_estimators_match_numpy_on_random_inputs(seed):
    rng = np.random.RandomState(seed)
    N, K = rng.randint(1, 5), rng.randint(2, 9)
    l = -rng.exponential(3.0, (N, K))
    l[0, 1] = l[0, 0]  # a tie
    finished = rng.rand(N, K) > 0.3
    np.testing.assert_allclose(objectives.verifree_rewards(l, finished), np.where(finished, np.exp(l), 0))
    A, w = objectives.jepo_multi(l)
    _, want_A, want_w = np_jepo_multi(l)
    np.testing.assert_allclose(A, want_A, atol=1e-12)
    np.testing.assert_allclose(w, want_w, atol=1e-12)
    far = l.copy()
    far[:, 0] -= 800.0  # e^-800 underflows: the estimator stays finite where the formula does not
    assert np.isfinite(objectives.jepo_multi(far)[0]).all()


def test_jepos_weights_are_the_gradient_of_its_bound():
    l = np.array([[-0.5, -2.0, -1.2, -4.0, -0.7]])
    bound = lambda x: np.log(np.exp(x).mean())
    h = 1e-6
    fd = [(bound(l[0] + h * e) - bound(l[0] - h * e)) / (2 * h) for e in np.eye(5)]
    np.testing.assert_allclose(objectives.jepo_multi(l)[1][0], fd, atol=1e-8)


@pytest.fixture(scope="module")
def tiny_stage():
    def build(name, **fields):
        config = get_config()
        config.stages = name
        config[name].update(fields)
        job = jobs.build(config)
        (stage,) = job.stages
        return job, stage
    return build


@pytest.mark.parametrize("name,fields", [("verifree", dict(answer_weight="reward")), ("jepo", dict(mode="multi")),
                                         ("jepo", dict(mode="single"))])
@pytest.mark.slow
def test_the_batch_and_the_loss_on_a_real_rollout(tiny_stage, name, fields):
    """VeriFree and JEPO on a LaTRO rollout of the tiny model (some rationales marked finished
    so that VeriFree's rewards are not all 0): the scored advantages and answer weights are the
    NumPy estimators of the rows' answer log-likelihoods, no reference pass runs, and the loss
    the step differentiates equals mean(-A log pi(z|x) - w log pi(y|x+z)) with the policy's
    own scores of the rows."""
    job, stage = tiny_stage(name, **fields)
    algorithm = stage.algorithm
    learner = Learner(algorithm, job.model, stage.config.stage.optim)
    assert learner.reference is None
    policies = learner.policies()
    ro = algorithm.rollout(policies, stage.examples[:2], run.rollout_key(0, name, 0))
    ro.finished[::2] = True
    scored = algorithm.score(policies, ro)
    l, K = scored.details["y_logp"].astype(np.float64), 4
    if name == "verifree":
        R = np.where(ro.finished.reshape(-1, K), np.exp(l), 0.0)
        want_A, want_w = np_rloo(R), R
        assert (R > 0).any() and (R == 0).any()
    elif fields["mode"] == "multi":
        _, A, w = np_jepo_multi(l)
        want_A, want_w = K * A, K * w
    else:
        want_A, want_w = np_rloo(l), np.ones_like(l)
    np.testing.assert_allclose(scored.arrays["advantages"], want_A.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored.arrays["answer_weight"], want_w.reshape(-1), rtol=1e-5, atol=1e-6)
    assert "ref_z_logp" not in scored.details and "kl" not in scored.metrics
    arrays = {k: jnp.asarray(v) for k, v in scored.arrays.items()}
    loss, _ = algorithm.loss(learner.model(), arrays, scored.scalars, scored.layout)
    z = scored.details["z_logp"].reshape(-1)
    want = np.mean(-want_A.reshape(-1) * z - want_w.reshape(-1) * l.reshape(-1))
    assert float(loss) == pytest.approx(want, rel=1e-4)
