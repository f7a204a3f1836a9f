"""Every registered algorithm through the shared pipeline: one rollout -> score -> step on the
tiny config, on one device and on a 2x4 (data x fsdp) mesh of 8 fake devices."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs.tiny import get_config
from latro_jax import algorithms, job as jobs, models, run, sampling, sharding
from latro_jax.algorithms import Learner
from latro_jax.models import lora
from latro_jax.job_config import optimizer_steps_per_update
from latro_jax.update_plan import Lengths

TIMING = ("sample_s", "score_s", "step_s", "update_s", "sample_tokens_per_s")


def _host_copy(model, mesh=None):
    """The same weights as a new model, unsharded or placed on `mesh` (LoRA adapters too: the
    job attaches them at its seed, 0)."""
    arrays = models.param_arrays(model)
    copy = models.model_from_arrays(model.config, arrays.__getitem__, mesh=mesh)
    lora.attach(copy, lora.config_of(model), seed=0)
    return copy


def _weights(model) -> dict[str, np.ndarray]:
    """Every parameter, adapters included, as host arrays by path."""
    return {"/".join(map(str, p)): sharding.to_host(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(algorithms.ALGORITHMS), "latro+lora"])
def test_every_registered_algorithm_updates_and_8_devices_equal_one(name):
    config = get_config()
    name, _, with_lora = name.partition("+")
    config.stages = name
    if with_lora:
        config.model.lora = dict(rank=4, alpha=8.0)
    job = jobs.build(config)
    (stage,) = job.stages
    examples = stage.examples[:stage.config.stage.batch_size]
    key = run.rollout_key(0, name, 0)
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)  # tiny has one KV head
    # eps = 1e-3 makes Adam's step Lipschitz in the gradient: with 1e-8 the first step is
    # sign(g), and a near-zero gradient's summation-order noise flips it by the learning rate.
    optim = dataclasses.replace(stage.config.stage.optim, eps=1e-3)
    results, scored, built = [], [], []
    for m in (None, mesh):
        algorithm = stage.config.algorithm(stage.config.config, dataclasses.replace(stage.algorithm.ctx, mesh=m))
        score = algorithm.score
        algorithm.score = lambda *args, score=score: scored.append(score(*args)) or scored[-1]
        built.append(algorithm)
        learner = Learner(algorithm, _host_copy(job.model, m), optim)
        before = _weights(learner.model())
        metrics = learner.update(examples, key)
        after = _weights(learner.model())
        results.append((metrics, before, after, learner))
    for algorithm, batch in zip(built, scored):  # one device (prompts shared in groups of K), 8 (not)
        _plan_bounds_the_update(algorithm, batch, len(examples), stage.examples, job.fmt, job.model.config)
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
    if m1.get("formatted") == 0:  # RLPR: the random model states no answer, so every reward and advantage is 0
        assert name == "rlpr" and m1["advantage_abs"] == 0 and m1["gold_prob"] > 0 and m1["prior_prob"] > 0
        assert all(np.array_equal(p1[k], before[k]) for k in p1)  # (its scoring passes agree on both meshes)
        return
    assert max(np.abs(p1[k] - before[k]).max() for k in p1) > 1e-5  # the step changed the weights
    assert one.step == eight.step == optimizer_steps_per_update(stage.config.config)  # gspo's: 2 mini-batches
    trained = eight.trainer.state.params["layers"]["attn"]
    qkv = (trained["lora"]["q_a"] if with_lora else trained["qkv_kernel"])[...]
    assert qkv.sharding.mesh.size == 8 and isinstance(qkv, jax.Array)
    if with_lora:  # only adapters moved, and B alone (A's gradient is 0 while B = 0)
        assert {k for k in p1 if np.abs(p1[k] - before[k]).max() > 0} == {k for k in p1 if k.endswith("_b")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(algorithms.ALGORITHMS), "latro+lora"])
def test_no_update_after_the_first_compiles_anything_new(name):
    """Updates 2-4 on the same questions (rows of the widths the first update met, given the
    tiny config's budget) compile no new XLA program: no jit of a fresh closure per update, no
    Python scalar or weak type that changes an argument's signature. Counted with JAX's own
    backend-compile event (which fires on a persistent-cache hit too)."""
    config = get_config()
    name, _, with_lora = name.partition("+")
    config.stages = name
    if with_lora:
        config.model.lora = dict(rank=4, alpha=8.0)
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


GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
PHI3_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tokenizers", "phi-3-mini")


@pytest.mark.slow
def test_a_stage_pads_every_batch_to_its_longest_prompt_and_answer_and_compiles_once():
    """LaTRO on GSM8K under Phi-3's tokenizer (prompts of 40-250 tokens, answers of several
    lengths): after an update on the questions with the shortest prompt and answer, one on the
    longest prompt and the longest answer compiles nothing (task.prompt_width = 0, the default: the
    sampler's prompt columns, its answer slots and the rows are the stage's longest); with the
    context's widths at 0 (prompt_width = -1 builds the first) the same two batches do compile
    anew, so they differ in shape."""
    config = get_config()
    config.stages = "latro"
    config.task.update(name="gsm8k", source=GSM8K, val_split="")
    config.tokenizer.update(path=PHI3_TOKENIZER, build="")
    config.eval.update(every=0, limit=8)
    config.model.init.max_position_embeddings = 512
    config.latro.update(batch_size=2, num_samples=4, max_rationale_tokens=4)
    job = jobs.build(config)
    (stage,) = job.stages
    ctx, fmt = stage.algorithm.ctx, job.fmt
    prompt = lambda e: len(fmt.prompt_ids(e.question))
    answer = lambda e: max(len(fmt.answer_ids(e.answer)), len(fmt.completion_ids(e.answer)))
    assert ctx.prompt_width == max(map(prompt, stage.examples)) and ctx.body_width == 4 + max(map(answer, stage.examples))
    short = sorted(stage.examples, key=lambda e: (prompt(e), answer(e)))[:2]
    longest = [max(stage.examples, key=prompt), max(stage.examples, key=answer)]
    assert answer(longest[1]) > max(map(answer, short)) and prompt(longest[0]) > 2 * max(map(prompt, short))
    compiles = []

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for fixed in (True, False):
            algorithm = stage.config.algorithm(stage.config.config, ctx if fixed else
                                               dataclasses.replace(ctx, prompt_width=0, body_width=0))
            score, widths = algorithm.score, []
            algorithm.score = lambda p, ro: widths.append((ro.rows.prompt_width, ro.rows.tokens.shape[1])) or score(p, ro)
            learner = Learner(algorithm, _host_copy(job.model), stage.config.stage.optim)
            learner.update(short, run.rollout_key(0, "latro", 0))
            before = len(compiles)
            learner.update(longest, run.rollout_key(0, "latro", 1))
            if fixed:
                assert len(compiles) == before, "a batch of longer prompts and answers compiled new programs"
                assert widths[0] == widths[1] and widths[0][0] == sampling.round_up(ctx.prompt_width, 16)
            else:
                assert len(compiles) > before and widths[0] != widths[1]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _plan_bounds_the_update(algorithm, scored, questions, examples, fmt, model_config):
    """The algorithm's plan (update_plan.py, what compile_check compiles) for `questions` of the
    stage's longest lengths (its `examples`: rows are padded to them) describes the update that
    ran: the step's arrays by name and dtype, its rows, its scalars and steps, its shared prompt
    columns' group; widths at least the real ones (the plan is the worst case: every completion
    at its budget)."""
    lengths = Lengths(max(len(fmt.prompt_ids(e.question)) for e in examples),
                      max(max(len(fmt.answer_ids(e.answer)), len(fmt.completion_ids(e.answer))) for e in examples),
                      max(len(fmt.completion_ids(e.rationale or "")) for e in examples))
    plan = algorithm.plan(questions, lengths, model_config)
    assert plan.steps == optimizer_steps_per_update(algorithm.cfg)
    if scored.skip:
        return
    arrays, scalars = scored.minibatches()[0]
    assert set(plan.batch) == set(arrays) and set(plan.scalars) == set(scalars)
    for name, spec in plan.batch.items():
        real = arrays[name]
        assert spec.dtype == real.dtype and spec.ndim == real.ndim and spec.shape[0] == real.shape[0], name
        assert spec.shape[1:] >= real.shape[1:], name
    shared, real_shared = plan.layout.shared_prefix, scored.layout.shared_prefix
    assert (shared is None) == (real_shared is None)
    if shared:
        assert shared[1] == real_shared[1] and shared[0] >= real_shared[0]


def _docs_algorithm() -> dict:
    """The REINFORCE algorithm docs/algorithms.md's "Adding an algorithm" shows, executed as written."""
    page = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "algorithms.md")).read()
    section = page[page.index("## Adding an algorithm"):]
    block = section[section.index("```python\n") + 10:section.index("\n```", section.index("```python"))]
    namespace = {}
    exec(compile(block, "docs/algorithms.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_the_docs_algorithm_runs_on_the_pipeline_and_its_gradient_is_reinforce():
    """The docs' REINFORCE on the tiny config: its advantages are RLOO of its 0/1 rewards (NumPy),
    its step's gradient is that of -sum(A * log pi(completion token)) / completion tokens (the
    loss written out with the pure log-prob function), and an update runs with the timing
    columns every algorithm reports."""
    from flax import nnx
    from latro_jax.algorithms.group_rl import GroupSampling
    from latro_jax.logprobs import token_logprobs
    from latro_jax.sampling import SamplingParams
    space = _docs_algorithm()
    config = get_config()
    config.stages = "grpo"
    job = jobs.build(config)
    (stage,) = job.stages
    cfg = space["ReinforceConfig"](GroupSampling(num_samples=4, max_tokens=12, sampling=SamplingParams(1.0)))
    algorithm = space["Reinforce"](cfg, stage.algorithm.ctx)
    learner = Learner(algorithm, _host_copy(job.model), stage.config.stage.optim)
    examples = stage.examples[:2]
    policies = learner.policies()
    ro = algorithm.rollout(policies, examples, jax.random.key(4))
    rewards = ro[2].copy()
    rewards[:, 0] = 1.0  # a random model is never right: make the advantages non-zero
    scored = algorithm.score(policies, (ro[0], ro[1], rewards))
    want = rewards - (rewards.sum(1, keepdims=True) - rewards) / 3
    np.testing.assert_allclose(scored.arrays["advantages"], want.reshape(-1), atol=1e-6)
    grads = learner.trainer.gradients(scored.arrays, scored.scalars, scored.layout)
    batch = {k: jax.numpy.asarray(v) for k, v in scored.arrays.items()}

    def reinforce(params):
        logp = token_logprobs(nnx.merge(learner.trainer.graphdef, params), batch["tokens"], batch["valid"])
        mask = batch["completion_mask"]
        return -jax.numpy.sum(batch["advantages"][:, None] * logp * mask) / mask.sum()

    expected = jax.grad(reinforce)(learner.trainer.state.params)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    metrics = learner.update(examples, jax.random.key(5))
    assert set(TIMING[:3]) <= set(metrics) and np.isfinite(metrics["loss"]) and "reward" in metrics
