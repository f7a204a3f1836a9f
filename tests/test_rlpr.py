"""RLPR (SPEC 3.1; objectives.py, algorithms/rlpr.py): SPEC 3.3's hand values (rewards, filter,
EMA, loss), the std filter's warm-up and EMA against a NumPy transcription (the gold answer's
tokens under real tokenizers: test_data.py), the rewards on a real rollout of a moved policy against
full-forward log-probabilities, and the filter's state through a checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from latro_jax import checkpoint, job as jobs, objectives, run
from latro_jax.algorithms import Learner
from latro_jax.algorithms.group_rl import PolicyLoss
from latro_jax.algorithms.rlpr import StdEma, StdFilter
from test_grpo_variants import jax_loss, moved_policy

GOLD_LOGP = np.array([[-0.1, -0.3, -0.05], [-1.2, -0.8, -2.0], [-0.4, -0.2, -0.6], [-3.0, -3.0, -3.0]])
PRIOR_LOGP = np.array([[-0.9, -0.7, -1.1]])
FORMATTED = np.array([[True, True, True, False]])


@pytest.mark.slow
def test_rlpr_hand_values():
    """SPEC 3.3: r, r', R, the group's std against the EMA (kept), A, the loss at rho = 1 on
    completions of 7, 9, 6 and 12 tokens, and the EMA after the update."""
    with jax.enable_x64(True):
        mask = np.ones_like(GOLD_LOGP)
        r = objectives.mean_token_probs(GOLD_LOGP, mask)[None]
        np.testing.assert_allclose(np.where(FORMATTED, r, 0), [[0.8656284, 0.2952862, 0.6792875, 0]], atol=1e-7)
        prior = objectives.mean_token_probs(PRIOR_LOGP, np.ones_like(PRIOR_LOGP))
        assert prior[0] == pytest.approx(0.4120087, abs=1e-7)
        R = objectives.rlpr_rewards(r, prior, FORMATTED)
        np.testing.assert_allclose(R, [[0.5082577, 0.1, 0.3405509, 0]], atol=1e-7)
        sigma = R.std(axis=1, ddof=1)
        assert sigma[0] == pytest.approx(0.2303920, abs=1e-7)
        state = StdEma(StdFilter(), updates=11, ema=0.30)
        assert state.step(sigma).tolist() == [True]  # 0.2304 >= 0.5 x 0.30
        assert state.ema == pytest.approx(0.2993039, abs=1e-7)
        assert StdEma(StdFilter(), updates=11, ema=0.47).step(sigma).tolist() == [False]
        A = objectives.group_advantages(R, eps=1e-6)[0]
        np.testing.assert_allclose(A, [1.176492, -0.5955137, 0.4485760, -1.029555], atol=1e-6)
        lengths = np.array([7, 9, 6, 12])
        mask = (np.arange(12)[None] < lengths[:, None]).astype(float)
        logp = -np.ones((4, 12))
        cfg = PolicyLoss(clip_eps=0.2, clip_eps_high=0.27, beta=0.0, aggregation="token")
        assert jax_loss(logp, logp, A, mask, cfg)[0] == pytest.approx(0.1996287, abs=1e-7)


def test_rlpr_rewards_match_numpy_on_random_inputs():
    rng = np.random.RandomState(0)
    probs, prior = rng.uniform(0, 1, (5, 6)), rng.uniform(0, 1, 5)
    formatted = rng.uniform(size=(5, 6)) < 0.7
    want = np.where(formatted, 0.8 * np.maximum(probs - prior[:, None], 0) + 0.2, 0.0)
    np.testing.assert_allclose(objectives.rlpr_rewards(probs, prior, formatted, 0.2), want)


def np_std_filter(sigmas, ratio=0.5, decay=0.99, start=6, end=10):
    """SPEC 3.1's filter written out over updates 1, 2, ...: kept per update, EMA after each."""
    kept, emas, ema, warm = [], [], None, []
    for step, s in enumerate(sigmas, start=1):
        kept.append(s >= ratio * ema if step > end else np.ones(len(s), bool))
        if start <= step <= end:
            warm.append(s.mean())
            ema = np.mean(warm) if step == end else ema
        elif step > end:
            ema = decay * ema + (1 - decay) * s.mean()
        emas.append(-1.0 if ema is None else ema)
    return kept, emas


def test_std_filter_warm_up_and_ema_match_numpy_and_survive_a_round_trip():
    rng = np.random.RandomState(1)
    sigmas = [rng.uniform(0, 0.6, 8) for _ in range(16)]
    want_kept, want_ema = np_std_filter(sigmas)
    state = StdEma(StdFilter())
    for step, s in enumerate(sigmas):
        if step == 12:  # what a checkpoint holds, into a fresh filter
            restored = StdEma(StdFilter())
            restored.load(state.array())
            state = restored
        assert state.step(s).tolist() == want_kept[step].tolist(), step
        assert state.ema == pytest.approx(want_ema[step], rel=1e-6), step
    assert any(not k.all() for k in want_kept[10:]) and all(k.all() for k in want_kept[:10])


def _stage(**fields):
    config = get_config()
    config.stages = "rlpr"
    config.rlpr.update(fields)
    job = jobs.build(config)
    (stage,) = job.stages
    return config, job, stage


@pytest.mark.slow
def test_rewards_on_a_real_rollout_are_the_debiased_gold_probabilities():
    """A real RLPR rollout of the tiny model whose policy has moved from the reference, its
    completions set to: reasoning + answer, reasoning alone (no answer: format 0), the answer
    at once (empty reasoning: the whole-completion spelling), the sampled one; the rewards are
    0.9 max(r - r', 0) + 0.1 with r the mean probability of the gold's tokens after the
    reasoning under the policy and r' the same after the prompt alone under the reference, each
    from log_softmax(logits / T) of a full forward pass; the loss rows are the whole
    completions."""
    config, job, stage = _stage(rollout=dict(sampling=dict(temperature=0.7)))
    algorithm = stage.algorithm
    learner = Learner(algorithm, job.model, stage.config.stage.optim)
    policies = moved_policy(learner.policies(), seed=3)
    moved = policies.params
    examples = stage.examples[:4]
    ro = algorithm.rollout(policies, examples, run.rollout_key(0, "rlpr", 0))
    fmt, T = algorithm.ctx.fmt, config.rlpr.rollout.sampling.temperature
    words = fmt.tokenizer("so we add the two numbers", add_special_tokens=False).input_ids
    completions, reasonings = [], []
    for n, e in enumerate(examples):
        for g, z in enumerate([words[:3 + n], words[:2 + n], [], None]):
            if z is None:
                o, z = ro.continuations[4 * n + g], None
            elif g == 1:
                o = z + [fmt.end_id]
            else:
                o = z + (fmt.answer_ids(e.answer) if z else fmt.completion_ids(e.answer))
            completions.append(o)
            reasonings.append(z)
    ro = dataclasses.replace(ro, continuations=completions)
    scored = algorithm.score(policies, ro)

    def gold_prob(params, prompt, z, answer, gold):
        gold_ids = fmt.tokenizer(" " + gold, add_special_tokens=False).input_ids  # as it follows "is"
        at = max(i for i in range(len(answer)) if answer[i:i + len(gold_ids)] == gold_ids)
        seq = jnp.asarray([prompt + z + answer], jnp.int32)
        logp = jax.nn.log_softmax(policies.model(params)(seq)[0] / T, axis=-1)
        start = len(prompt) + len(z) + at
        return np.mean([np.exp(float(logp[t - 1, seq[0, t]])) for t in range(start, start + len(gold_ids))])

    want = np.zeros((4, 4))
    for n, e in enumerate(examples):
        prompt = fmt.prompt_ids(e.question)
        prior = gold_prob(learner.reference, prompt, [], fmt.completion_ids(e.answer), e.gold)
        for g in range(4):
            z = reasonings[4 * n + g]
            if g in (0, 2):
                answer = fmt.answer_ids(e.answer) if z else fmt.completion_ids(e.answer)
                r = gold_prob(moved, prompt, z, answer, e.gold)
                want[n, g] = 0.9 * max(r - prior, 0) + 0.1
            elif g == 3:  # the sampled completion: the random model states no answer
                assert not any(fmt.answer_ids(e.answer)[:3] == completions[4 * n + g][i:i + 3]
                               for i in range(len(completions[4 * n + g])))
    assert (want[:, 0] > 0.1).any() and (want[:, 0] != want[:, 2]).all()
    np.testing.assert_allclose(scored.details["rewards"], want, atol=2e-6)
    mask = scored.arrays["completion_mask"]
    assert mask.sum(1).tolist() == [len(o) for o in completions]  # the loss acts on whole completions
    assert scored.metrics["formatted"] == 0.5
    assert algorithm.filter.updates == 1 and algorithm.filter.ema == pytest.approx(
        np.mean(want.std(axis=1, ddof=1)), rel=1e-5)  # warm-up 1..1 in the tiny config


@pytest.mark.slow
def test_the_filter_state_goes_through_a_checkpoint(tmp_path):
    _, job, stage = _stage()
    learner = Learner(stage.algorithm, job.model, stage.config.stage.optim)
    stage.algorithm.filter.step(np.array([0.1, 0.4]))
    stage.algorithm.filter.step(np.array([0.3, 0.2]))
    saved = stage.algorithm.filter.array()
    ckpts = checkpoint.TrainCheckpoints(str(tmp_path / "rlpr"))
    ckpts.save(2, learner.model(), learner.state, {"step": 2, "data": {}}, extras=learner.extras())
    _, job2, stage2 = _stage()
    fresh = Learner(stage2.algorithm, job2.model, stage2.config.stage.optim)
    state, _, extras = ckpts.restore_latest(fresh.state, fresh.extras())
    fresh.load_state(state, extras)
    np.testing.assert_array_equal(stage2.algorithm.filter.array(), saved)
    assert stage2.algorithm.filter.updates == 2 and stage2.algorithm.filter.ema > 0
    ckpts.close()
