"""The GRPO variants (SPEC 3.2; objectives.py, algorithms/group_rl.py, algorithms/grpo_variants.py):
SPEC 3.3's hand values for DAPO, GSPO, CISPO and RLOO, their losses and gradients against NumPy
transcriptions on random inputs, DAPO's group dropping and RLOO's KL-penalised rewards on real
rollouts, and mu mini-batch updates per rollout (the ratio is 1 on the first, moves and clips on
the next)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from latro_jax import job as jobs, objectives, run
from latro_jax.algorithms import Learner, mrt
from latro_jax.algorithms.group_rl import PolicyLoss


@pytest.fixture
def x64():
    """float64 for the pure-math tests (the hand values to 1e-7, NumPy to 1e-10)."""
    with jax.enable_x64(True):
        yield


def _pad(rows, width):
    return np.array([r + [0.0] * (width - len(r)) for r in rows]), np.array(
        [[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])


def np_loss(logp, old, A, mask, objective, eps_lo, eps_hi, aggregation, rho_max=5.0, cispo_clip="upper"):
    """SPEC 3.2 transcribed in NumPy: (loss, d loss / d log pi) of one batch."""
    rows = len(logp)
    if aggregation == "token":
        w = mask / mask.sum()
    else:  # sequence
        w = mask / mask.sum(1, keepdims=True) / rows
    a = A[:, None]
    if objective in ("gspo", "rloo"):  # GSPO's ratio is length-normalised, RLOO's the plain sum
        n = mask.sum(1) if objective == "gspo" else np.ones(rows)
        s = np.exp(((logp - old) * mask).sum(1) / n)
        un, cl = s * A, np.clip(s, 1 - eps_lo, 1 + eps_hi) * A
        row_loss = -np.minimum(un, cl)
        active = (un <= cl) | ((s > 1 - eps_lo) & (s < 1 + eps_hi))  # min picks the unclipped, or inside
        # the row loss sits on each token with weight w; d s / d logp_t = s / n on the row's tokens
        row_weight = (w.sum(1))
        grad = (-(active * s * A / n) * row_weight)[:, None] * mask
        return float((row_loss * row_weight).sum()), grad
    rho = np.exp(logp - old)
    if objective == "cispo":
        weight = np.minimum(rho, rho_max) if cispo_clip == "upper" else np.clip(rho, 1 - eps_lo, 1 + eps_hi)
        return float((-weight * a * logp * w).sum()), -weight * a * w
    un, cl = rho * a, np.clip(rho, 1 - eps_lo, 1 + eps_hi) * a
    active = (un <= cl) | ((rho > 1 - eps_lo) & (rho < 1 + eps_hi))
    return float((-np.minimum(un, cl) * w).sum()), -(active * rho * a) * w


def jax_loss(logp, old, A, mask, cfg: PolicyLoss):
    def f(lp):
        losses = cfg.token_losses(lp, jnp.asarray(old), None, jnp.asarray(A), jnp.asarray(mask))
        return objectives.aggregate_token_losses(losses, jnp.asarray(mask), cfg.aggregation,
                                                 completion_tokens=mask.sum(), rows=float(len(mask)),
                                                 max_length=float(mask.shape[1]))
    value, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    return float(value), np.asarray(grad)


def moved_policy(policies, seed):
    """The policies with every weight moved by 0.5 of its tensor's std (Gaussian): a policy away
    from its reference, so that KL and prior terms are not 0."""
    leaves, treedef = jax.tree.flatten(policies.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    moved = [x + 0.5 * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return dataclasses.replace(policies, params=jax.tree.unflatten(treedef, moved))


# ---------------------------------------------------------------- SPEC 3.3 hand values
@pytest.mark.slow
def test_dapo_hand_values(x64):
    logp, mask = _pad([[-0.4, -1.1], [-0.9, -0.2, -1.5], [-0.3, -0.7, -0.1, -2], [-1.2, -0.5, -0.8, -0.6]], 4)
    old, _ = _pad([[-0.62, -1], [-0.7, -0.45, -1.5], [-0.3, -0.95, -0.05, -2.1], [-1, -0.5, -1.1, -0.4]], 4)
    acc = np.array([1.0, 0.0, 1.0, 0.0])
    R = 2 * acc - 1 + objectives.overlong_penalty(mask.sum(1), max_length=4, cache=2)
    np.testing.assert_allclose(R, [1, -1.5, 0, -2])
    A = objectives.group_advantages(R[None], "group", eps=1e-6)[0]
    np.testing.assert_allclose(A, [1.180193, -0.6354884, 0.4539203, -0.9986247], atol=1e-6)
    for eps_hi, want in ((0.28, 0.1112868), (0.2, 0.1182632)):
        cfg = PolicyLoss(clip_eps=0.2, clip_eps_high=eps_hi, beta=0.0, aggregation="token")
        got, grad = jax_loss(logp, old, A, mask, cfg)
        np_value, np_grad = np_loss(logp, old, A, mask, "clip", 0.2, eps_hi, "token")
        assert got == pytest.approx(want, abs=1e-7) and np_value == pytest.approx(want, abs=1e-7)
        np.testing.assert_allclose(grad, np_grad, atol=1e-12)


@pytest.mark.slow
def test_gspo_hand_values_and_gradient(x64):
    logp, mask = _pad([[-0.5, -1.2], [-0.8, -0.3, -1.1], [-2, -0.1]], 3)
    old, _ = _pad([[-0.5003, -1.2001], [-0.799, -0.3, -1.1], [-2.0002, -0.1004]], 3)
    A = objectives.group_advantages(np.array([[1.0, 0.0, 1.0]]), eps=1e-4)[0]
    np.testing.assert_allclose(A, [0.5772503, -1.154501, 0.5772503], atol=1e-6)
    s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))
    np.testing.assert_allclose(s, [1.0002, 0.9996667, 1.0003], atol=1e-7)
    cfg = PolicyLoss(objective="gspo", clip_eps=3e-4, clip_eps_high=4e-4, beta=0.0, aggregation="sequence")
    got, grad = jax_loss(logp, old, A, mask, cfg)
    assert got == pytest.approx(-2.116709e-4, abs=1e-10)
    want = np.array([-0.09622762, 0.0, -0.09623725])[:, None] * mask  # row 2 clipped: no gradient
    np.testing.assert_allclose(grad, want, atol=1e-8)
    np_value, np_grad = np_loss(logp, old, A, mask, "gspo", 3e-4, 4e-4, "sequence")
    assert np_value == pytest.approx(got, abs=1e-12)
    np.testing.assert_allclose(np_grad, grad, atol=1e-12)
    clipped = cfg.clipped(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask))
    assert np.asarray(clipped).any(axis=1).tolist() == [False, True, False]


SPEC_LOGP = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, -2.2, -0.9]])
SPEC_OLD = np.array([[-1.3, -1.9, -0.5, 0.0], [-0.3, -0.9, -2.4, -0.9]])
SPEC_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], float)


@pytest.mark.parametrize("clip,want", [("upper", -0.1127710), ("both", -0.1303241)])
def test_cispo_hand_values(clip, want, x64):
    A = objectives.group_advantages(np.array([[1.0, 0.0]]))[0]
    cfg = PolicyLoss(objective="cispo", cispo_clip=clip, clip_eps=0.2, beta=0.0, aggregation="token")
    got, grad = jax_loss(SPEC_LOGP, SPEC_OLD, A, SPEC_MASK, cfg)
    assert got == pytest.approx(want, abs=1e-7)
    np_value, np_grad = np_loss(SPEC_LOGP, SPEC_OLD, A, SPEC_MASK, "cispo", 0.2, 0.2, "token", cispo_clip=clip)
    assert np_value == pytest.approx(want, abs=1e-7)
    np.testing.assert_allclose(grad, np_grad, atol=1e-12)  # the weight is held: d/d log pi = -w A


@pytest.mark.slow
def test_rloo_hand_values(x64):
    """SPEC 3.3 on the 2.5 arrays: rewards (1, 0), the sequences' KL (0.1, -0.1) in the reward
    (beta 0.05), leave-one-out advantages, the clipped plain-sum ratio, the mean over rows."""
    kl = np.array([[0.1, -0.1]])  # sum_t (log pi_old - log pi_ref), given
    A = objectives.rloo_advantages(objectives.kl_penalised_rewards(np.array([[1.0, 0.0]]), kl, 0.05))[0]
    np.testing.assert_allclose(A, [0.99, -0.99], atol=1e-12)
    cfg = PolicyLoss(objective="rloo", clip_eps=0.2, beta=0.0, aggregation="sequence")
    ratio = objectives.sequence_ratio(jnp.asarray(SPEC_LOGP), jnp.asarray(SPEC_OLD), jnp.asarray(SPEC_MASK),
                                      normalised=False)
    np.testing.assert_allclose(ratio, [1.221403, 0.9048374], atol=1e-6)
    got, grad = jax_loss(SPEC_LOGP, SPEC_OLD, A, SPEC_MASK, cfg)
    assert got == pytest.approx(-0.1461055, abs=1e-7)
    np_value, np_grad = np_loss(SPEC_LOGP, SPEC_OLD, A, SPEC_MASK, "rloo", 0.2, 0.2, "sequence")
    assert np_value == pytest.approx(-0.1461055, abs=1e-7)
    np.testing.assert_allclose(grad, np_grad, atol=1e-12)  # row 1 clipped (1.22 > 1.2): no gradient
    assert not grad[0].any() and grad[1, :3].all()


# ---------------------------------------------------------------- random inputs against NumPy
@pytest.mark.parametrize("objective,aggregation,eps", [
    ("clip", "token", (0.2, 0.28)), ("clip", "sequence", (0.2, 0.2)), ("gspo", "sequence", (0.01, 0.02)),
    ("gspo", "token", (0.01, 0.02)), ("cispo", "token", (0.2, 0.28)), ("rloo", "sequence", (0.2, 0.2))])
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_and_gradients_match_numpy_on_random_batches(objective, aggregation, eps, seed, x64):
    rng = np.random.RandomState(seed)
    rows, T = rng.randint(2, 7), rng.randint(3, 9)
    lengths = rng.randint(1, T + 1, rows)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(float)
    logp = -rng.exponential(1.0, (rows, T))
    old = logp + rng.normal(0, 0.3, (rows, T))  # ratios on both sides of the clip range
    A = rng.normal(0, 1, rows)
    A[0] = 0.0  # a row of an all-equal group
    cfg = PolicyLoss(objective=objective, clip_eps=eps[0], clip_eps_high=eps[1], beta=0.0, aggregation=aggregation)
    got, grad = jax_loss(logp, old, A, mask, cfg)
    if objective == "gspo" and aggregation == "token":  # the row loss on each token, weighted by length
        w = mask / mask.sum()
        n = mask.sum(1)
        s = np.exp(((logp - old) * mask).sum(1) / n)
        un, cl = s * A, np.clip(s, 1 - eps[0], 1 + eps[1]) * A
        want = float((-np.minimum(un, cl)[:, None] * w).sum())
        assert got == pytest.approx(want, abs=1e-10)
        return
    want, want_grad = np_loss(logp, old, A, mask, objective, eps[0], eps[1], aggregation)
    assert got == pytest.approx(want, abs=1e-10)
    np.testing.assert_allclose(grad, want_grad, atol=1e-10)
    garbage = np.where(mask > 0, logp, logp - 3.0)  # padded positions change nothing
    assert jax_loss(garbage, old, A, mask, cfg)[0] == pytest.approx(got, abs=1e-10)


def test_overlong_penalty_by_hand():
    np.testing.assert_allclose(objectives.overlong_penalty([10, 16, 17, 20, 24, 30], 24, 8),
                               [0, 0, -1 / 8, -0.5, -1, -1])


# ---------------------------------------------------------------- on the pipeline
def test_dapo_drops_groups_whose_outcomes_are_all_equal_and_keeps_the_shapes():
    """A real DAPO rollout on the tiny config, its outcomes set to one mixed group and one
    all-right group: the all-right group's rows keep their tokens but lose every completion
    token (so they add nothing to the loss or its denominators), their advantages are 0, the
    mixed group's advantages are DAPO's (+-1 rewards, overlong shaping, eps 1e-6); all groups
    uniform: no step."""
    config = get_config()
    config.stages = "dapo"
    config.dapo.drop_uniform_groups = True
    job = jobs.build(config)
    (stage,) = job.stages
    learner = Learner(stage.algorithm, job.model, stage.config.stage.optim)
    policies = learner.policies()
    ro = stage.algorithm.rollout(policies, stage.examples[:2], run.rollout_key(0, "dapo", 0))
    lengths = np.array([[6, 9, 10, 12], [12, 12, 12, 12]])  # the sampled tokens, cut: penalties 0, -1/4, -1/2, -1
    assert all(len(z) == 12 for z in ro.continuations)  # the random model runs to the budget
    cut = [z[:n] for z, n in zip(ro.continuations, lengths.reshape(-1))]
    acc = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ro = dataclasses.replace(ro, continuations=cut, outcomes=dataclasses.replace(ro.outcomes, rewards=acc))
    scored = stage.algorithm.score(policies, ro)
    R = np.array([1.0, -1.25, 0.5, -2.0])  # +-1 plus the overlong shaping (L_max 12, L_c 4)
    want = (R - R.mean()) / (R.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(scored.arrays["advantages"][:4], want, atol=1e-6)
    assert not scored.arrays["advantages"][4:].any()
    mask = scored.arrays["completion_mask"]
    assert mask[:4].sum() == lengths[0].sum() and not mask[4:].any()
    assert scored.arrays["tokens"].shape[0] == 8 and scored.scalars["completion_tokens"] == lengths[0].sum()
    assert scored.metrics["kept_groups"] == 0.5
    uniform = dataclasses.replace(ro, outcomes=dataclasses.replace(ro.outcomes, rewards=np.zeros((2, 4))))
    assert stage.algorithm.score(policies, uniform).skip


def test_grpo_length_penalty_takes_each_completions_tokens_over_the_budget_from_its_reward():
    """GRPO with length_penalty 0.5 on a real rollout of the tiny model, its continuations cut to
    known lengths: the advantages are the group ones of r - 0.5 |z| / 12 (NumPy, TRL's std with
    ddof 1 plus advantage_eps); the same outcomes without the penalty give an all-right group
    nothing to learn, with it the shorter completions win."""
    config = get_config()
    config.stages = "grpo"
    config.grpo.length_penalty = 0.5
    job = jobs.build(config)
    (stage,) = job.stages
    learner = Learner(stage.algorithm, job.model, stage.config.stage.optim)
    policies = learner.policies()
    ro = stage.algorithm.rollout(policies, stage.examples[:2], run.rollout_key(0, "grpo", 0))
    L = config.grpo.rollout.max_tokens
    lengths = np.array([[3, 6, 9, 12], [12, 4, 8, 2]])
    cut = [z[:n] for z, n in zip(ro.continuations, lengths.reshape(-1))]
    assert [len(z) for z in cut] == list(lengths.reshape(-1))
    acc = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ro = dataclasses.replace(ro, continuations=cut, outcomes=dataclasses.replace(ro.outcomes, rewards=acc))
    scored = stage.algorithm.score(policies, ro)
    R = acc - 0.5 * lengths / L
    want = (R - R.mean(1, keepdims=True)) / (R.std(1, ddof=1, keepdims=True) + config.grpo.advantage_eps)
    np.testing.assert_allclose(scored.arrays["advantages"], want.reshape(-1), atol=1e-5)
    assert scored.metrics["reward"] == pytest.approx(R.mean())
    assert np.all(np.diff(scored.arrays["advantages"][4:][np.argsort(lengths[1])]) < 0)  # shorter, better
    with pytest.raises(ValueError, match="length_penalty"):
        mrt.GrpoConfig(length_penalty=-0.1)


@pytest.mark.slow
def test_dapo_refills_the_batch_from_more_questions_until_enough_groups_are_kept(monkeypatch):
    """Dynamic sampling's refill on real rollouts of the tiny model, the grades set per round:
    round 0 keeps 1 of 2 groups, so refill_factor = 2 more batches are drawn and sampled; the
    batch is the first 2 kept groups in sampling order (round 0's question 1, round 1's question
    2), with their rows, continuations and DAPO's advantages. When no round keeps a group, the
    rounds stop at refill_rounds and the update is skipped. Learner.update hands the rollout
    its `more`."""
    from latro_jax import rollout as rollout_module
    config = get_config()
    config.stages = "dapo"
    config.dapo.update(drop_uniform_groups=True, refill_rounds=2, refill_factor=2, overlong_cache=0)
    job = jobs.build(config)
    (stage,) = job.stages
    algorithm = stage.algorithm
    learner = Learner(algorithm, job.model, stage.config.stage.optim)
    policies = learner.policies()
    examples, pool, draws = stage.examples[:2], stage.examples[2:], []

    def more():
        draws.append(pool[2 * len(draws):2 * len(draws) + 2])
        return draws[-1]

    def graded(*grades):
        it = iter(grades)
        monkeypatch.setattr(rollout_module, "grade", lambda *a, **k: np.array(next(it), float))

    graded([[1, 1, 1, 1], [0, 1, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]])
    key = run.rollout_key(0, "dapo", 0)
    ro = algorithm.rollout(policies, examples, key, more=more)
    assert len(draws) == 2 and ro.metrics == {"refill_rounds": 1.0, "sampled_questions": 6.0}
    fmt = algorithm.ctx.fmt
    chosen = [examples[1], pool[2]]
    assert ro.prompts == [fmt.prompt_ids(e.question) for e in chosen for _ in range(4)]
    graded([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]])
    round_1 = mrt.Grpo.rollout(algorithm, policies, pool[:4], jax.random.fold_in(key, 1))
    assert ro.continuations[4:] == round_1.continuations[8:12]
    np.testing.assert_array_equal(ro.outcomes.rewards, [[0, 1, 0, 0], [1, 0, 1, 1]])
    scored = algorithm.score(policies, ro)
    R = np.array([[-1.0, 1, -1, -1], [1, -1, 1, 1]])
    np.testing.assert_allclose(scored.arrays["advantages"], objectives.group_advantages(R, eps=1e-6).reshape(-1),
                               atol=1e-6)
    assert scored.metrics["kept_groups"] == 1.0 and scored.arrays["completion_mask"].sum(1).all()

    draws.clear()
    graded(*[[[1, 1, 1, 1]] * n for n in (2, 4, 4)])
    ro = algorithm.rollout(policies, examples, key, more=more)
    assert len(draws) == 4 and ro.metrics["refill_rounds"] == 2.0 and algorithm.score(policies, ro).skip

    draws.clear()
    graded([[1, 1, 1, 1], [0, 1, 0, 0]], [[0, 1, 0, 0]] * 4)
    metrics = learner.update(examples, key, more=more)
    assert metrics["refill_rounds"] == 1.0 and len(draws) == 2 and metrics["kept_groups"] == 1.0


@pytest.mark.slow
def test_rloo_puts_each_sampled_sequences_kl_to_the_reference_in_its_reward():
    """RLOO on a real rollout of the tiny model whose policy has moved from the reference: the
    advantages are the leave-one-out ones of r - 0.05 sum_t (log pi - log pi_ref), each sum
    over the completion's tokens of log_softmax(logits / T) of the full forward pass of the
    policy and of the reference (no chunking, no shared prompts); the step gets neither pass
    (beta 0 in the loss, one update per rollout)."""
    config = get_config()
    config.stages = "rloo"
    job = jobs.build(config)
    (stage,) = job.stages
    algorithm = stage.algorithm
    learner = Learner(algorithm, job.model, stage.config.stage.optim)
    policies = moved_policy(learner.policies(), seed=7)
    moved = policies.params
    ro = algorithm.rollout(policies, stage.examples[:2], run.rollout_key(0, "rloo", 0))
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    ro = dataclasses.replace(ro, outcomes=dataclasses.replace(ro.outcomes, rewards=rewards))
    scored = algorithm.score(policies, ro)
    T = config.rloo.rollout.sampling.temperature

    def completion_logp(params, prompt, completion):
        seq = jnp.asarray([prompt + completion], jnp.int32)
        logp = jax.nn.log_softmax(policies.model(params)(seq)[0] / T, axis=-1)
        return sum(float(logp[t - 1, seq[0, t]]) for t in range(len(prompt), seq.shape[1]))

    kl = np.array([completion_logp(moved, x, z) - completion_logp(learner.reference, x, z)
                   for x, z in zip(ro.prompts, ro.continuations)]).reshape(2, 4)
    assert np.abs(kl).mean() > 0.1  # the policy has moved: the KL term matters
    r = rewards - 0.05 * kl
    want = r - (r.sum(1, keepdims=True) - r) / 3
    np.testing.assert_allclose(scored.arrays["advantages"], want.reshape(-1), atol=2e-5)
    assert scored.metrics["sequence_kl"] == pytest.approx(kl.mean(), abs=2e-5)
    assert not {"ref_logp", "old_logp"} & set(scored.arrays)


@pytest.mark.slow
def test_mini_batches_start_on_policy_then_the_ratio_moves_and_clips():
    """updates_per_rollout = 2 on GRPO: the batch's groups split in two mini-batches, each one
    optimizer step. The first step's ratio is 1 (pi_old is the policy that sampled, scored by a
    separate pass: equal to float rounding) and its loss is the on-policy loss; the second
    step's ratio is against the same pi_old, so it has moved (lr 2e-3) and a tight clip range
    clips. Refreshing pi_old between the mini-batches would leave the second ratio at 1."""
    config = get_config()
    config.stages = "grpo"
    config.grpo.update(batch_size=4)
    config.grpo.loss.update(updates_per_rollout=2, beta=0.0, clip_eps=1e-3)
    job = jobs.build(config)
    (stage,) = job.stages
    algorithm = stage.algorithm
    learner = Learner(algorithm, job.model, stage.config.stage.optim)
    policies = learner.policies()
    ro = algorithm.rollout(policies, stage.examples[:4], run.rollout_key(0, "grpo", 0))
    rewards = np.array([[1.0, 0.0, 0.0, 1.0]] * 4)  # non-zero advantages for the random model
    ro = dataclasses.replace(ro, outcomes=dataclasses.replace(ro.outcomes, rewards=rewards))
    scored = algorithm.score(policies, ro)
    assert len(scored.scalars) == 2 and "old_logp" in scored.arrays
    first_arrays, first_scalars = scored.minibatches()[0]
    assert first_scalars["completion_tokens"] == first_arrays["completion_mask"].sum() and first_scalars["rows"] == 8
    on_policy = {k: jnp.asarray(v) for k, v in first_arrays.items() if k != "old_logp"}
    on_policy_loss = float(algorithm.loss(learner.model(), on_policy, first_scalars, scored.layout)[0])
    steps, step = [], learner.trainer.step
    learner.trainer.step = lambda *a: steps.append(step(*a)) or steps[-1]
    learner.apply(scored)
    assert len(steps) == 2 and learner.step == 2
    assert steps[0]["ratio_dev"] < 1e-5 and steps[0]["clipped"] == 0
    assert steps[0]["loss"] == pytest.approx(on_policy_loss, abs=1e-6)
    assert steps[1]["ratio_dev"] > 1e-3 and steps[1]["clipped"] > 0.05
