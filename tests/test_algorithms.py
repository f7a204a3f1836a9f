"""Every registered algorithm through the shared pipeline: one rollout -> score -> step on the
tiny config, on one device and on a 2x4 (data x fsdp) mesh of 8 fake devices."""

import dataclasses

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from latro_jax import algorithms, job as jobs, models, run, sharding
from latro_jax.algorithms import Learner

TIMING = ("sample_s", "score_s", "step_s", "sample_tokens_per_s")


def _host_copy(model, mesh=None):
    """The same weights as a new model, unsharded or placed on `mesh`."""
    arrays = models.param_arrays(model)
    return models.model_from_arrays(model.config, arrays.__getitem__, mesh=mesh)


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_every_registered_algorithm_updates_and_8_devices_equal_one(name):
    config = get_config()
    config.stages = name
    job = jobs.build(config)
    (stage,) = job.stages
    examples = stage.examples[:stage.config.stage.batch_size]
    key = run.rollout_key(0, name, 0)
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)  # tiny has one KV head
    # eps = 1e-3 makes Adam's step Lipschitz in the gradient: with 1e-8 the first step is
    # sign(g), and a near-zero gradient's summation-order noise flips it by the learning rate.
    optim = dataclasses.replace(stage.config.stage.optim, eps=1e-3)
    results = []
    for m in (None, mesh):
        algorithm = stage.config.algorithm(stage.config.config, dataclasses.replace(stage.algorithm.ctx, mesh=m))
        learner = Learner(algorithm, _host_copy(job.model, m), optim)
        before = models.param_arrays(learner.model())
        metrics = learner.update(examples, key)
        after = models.param_arrays(learner.model())
        results.append((metrics, before, after, learner))
    (m1, before, p1, one), (m8, _, p8, eight) = results
    assert set(m1) == set(m8) and set(TIMING[:3]) <= set(m1)
    assert all(np.isfinite(v) for v in m1.values())
    for k in m1:
        if k not in TIMING:
            # abs 1e-5: LaTRO's kl at the first update is 0 up to float rounding (the sampler's
            # decode log-probs against the reference's full-row pass), a difference of ~30-nat sums
            assert m1[k] == pytest.approx(m8[k], rel=1e-4, abs=1e-5), k
    for k in p1:
        np.testing.assert_allclose(p1[k], p8[k], atol=1e-6, err_msg=k)
    if "skipped" in m1:  # MRT-STaR kept no trace of the random model: no step, on both meshes
        assert name == "mrt_star" and one.step == eight.step == 0
        assert all(np.array_equal(p1[k], before[k]) for k in p1)
        return
    assert {"loss", "grad_norm"} <= set(m1)
    assert max(np.abs(p1[k] - before[k]).max() for k in p1) > 1e-5  # the step changed the weights
    assert one.step == eight.step == 1
    qkv = eight.trainer.state.params["layers"]["attn"]["qkv_kernel"][...]
    assert qkv.sharding.mesh.size == 8 and isinstance(qkv, jax.Array)


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_no_update_after_the_first_compiles_anything_new(name):
    """Updates 2-4 on the same questions (rows of the widths the first update met, given the
    tiny config's budget) compile no new XLA program: no jit of a fresh closure per update, no
    Python scalar or weak type that changes an argument's signature. Counted with JAX's own
    backend-compile event (which fires on a persistent-cache hit too)."""
    config = get_config()
    config.stages = name
    job = jobs.build(config)
    (stage,) = job.stages
    examples = stage.examples[:stage.config.stage.batch_size]
    learner = Learner(stage.algorithm, _host_copy(job.model), stage.config.stage.optim)
    compiles = []

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    counts = []
    try:
        for _ in range(4):
            before = len(compiles)
            learner.update(examples, run.rollout_key(0, name, 0))
            counts.append(len(compiles) - before)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert counts[0] > 0, "the listener saw no compile at all"
    assert counts[1:] == [0, 0, 0], counts
