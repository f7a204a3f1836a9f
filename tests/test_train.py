"""The training step: optax schedules, gradient accumulation, 8-device mesh against one device,
and a real learning signal from LaTRO updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_models import STORIES_HF, token_context
from latro_jax import models, rollout, sharding
from latro_jax.algorithms import Latro, LatroConfig, Learner, Sft, SftConfig
from latro_jax.stops import Stops
from latro_jax.train import OptimConfig, RowLayout, Trainer, make_schedule

TINY = models.ModelConfig(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                          initializer_range=0.3, eos_token_id=(2,))


@pytest.mark.slow
def test_init_model_is_the_seeded_construction_however_its_dtype_is_spelled():
    """init_model's cached, compiled initialiser gives the model built eagerly from the seed
    (nnx.Rngs(seed); equal to float32 rounding: the compiled normal sampler rounds differently),
    the same arrays for dtypes given as names or as jnp types, and another seed differs."""
    from latro_jax.models.build import _construct
    eager = models.param_arrays(_construct(TINY, "bfloat16", "float32", "none", 7))
    named, typed = (models.init_model(TINY, seed=7, dtype=dtype, param_dtype=param_dtype)
                    for dtype, param_dtype in (("bfloat16", "float32"), (jnp.bfloat16, jnp.float32)))
    assert named.dtype == typed.dtype == jnp.bfloat16
    got, got_typed = models.param_arrays(named), models.param_arrays(typed)
    assert got.keys() == got_typed.keys() == eager.keys()
    for name in eager:
        np.testing.assert_array_equal(np.asarray(got_typed[name]), np.asarray(got[name]), err_msg=name)
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(eager[name]), rtol=1e-6, atol=0, err_msg=name)
    other = models.param_arrays(models.init_model(TINY, seed=8, dtype="bfloat16"))
    assert not np.array_equal(np.asarray(other["embed/embedding"]), np.asarray(eager["embed/embedding"]))


@pytest.mark.parametrize("schedule,warmup", [("linear", 0), ("linear", 3), ("cosine", 2), ("constant", 4)])
def test_schedules_follow_their_definitions(schedule, warmup):
    cfg = OptimConfig(learning_rate=1e-3, schedule=schedule, warmup_steps=warmup, total_steps=10)
    lr = make_schedule(cfg)
    for step in range(11):
        if step < warmup:
            expected = 1e-3 * step / warmup
        elif schedule == "linear":
            expected = 1e-3 * (1 - (step - warmup) / (10 - warmup))
        elif schedule == "cosine":
            expected = 1e-3 * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (10 - warmup)))
        else:
            expected = 1e-3
        assert float(lr(step)) == pytest.approx(expected, abs=1e-9), step


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="exp")
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=20, total_steps=10)


def _fixed_latro_batch(rows=8):
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 40, rng.randint(2, 6)).tolist() for _ in range(rows)]
    rationales = [rng.randint(3, 40, rng.randint(0, 5)).tolist() for _ in range(rows)]
    answers = [rng.randint(3, 40, 3).tolist() for _ in range(rows)]
    r = rollout.assemble_rows(prompts, rationales, answers, prompt_width=8, length=16)
    return dict(tokens=r.tokens, valid=r.valid, rationale_mask=r.rationale_mask,
                answer_mask=r.answer_mask, advantages=rng.randn(rows).astype(np.float32))


def _params(trainer):
    return {k: np.asarray(v) for k, v in models.param_arrays(trainer.model()).items()}


def _latro(cfg, stops=Stops(ids=(2,)), mesh=None, microbatches=1):
    return Latro(cfg, token_context(stops, mesh=mesh, microbatches=microbatches))


def _latro_update(learner, prompts, answers, key, bare=None):
    """One LaTRO update on token ids: the algorithm's sample -> score -> the learner's step."""
    policies = learner.policies()
    scored = learner.algorithm.score(policies, learner.algorithm.sample(policies, prompts, answers, bare, key))
    return {**learner.apply(scored), **scored.metrics}


@pytest.mark.slow
def test_gradient_accumulation_over_4_microbatches_equals_one_batch():
    optim = OptimConfig(learning_rate=1e-2, eps=1e-3, total_steps=10, schedule="constant")
    loss = _latro(LatroConfig(num_samples=4)).loss
    batch = _fixed_latro_batch()
    one = Trainer(models.init_model(TINY, seed=1), optim, loss, microbatches=1)
    four = Trainer(models.init_model(TINY, seed=1), optim, loss, microbatches=4)
    for _ in range(2):
        m1 = one.step(batch, {"rows": 8})
        m4 = four.step(batch, {"rows": 8})
        assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
        assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    p1, p4 = _params(one), _params(four)
    for k in p1:  # measured: 1.8e-6 at most on an Intel Xeon (summation order through Adam)
        np.testing.assert_allclose(p1[k], p4[k], atol=5e-6, err_msg=k)


@pytest.mark.slow
def test_gradients_sum_microbatches_and_match_the_step_without_updating():
    """Trainer.gradients over 4 micro-batches equals jax.grad of the whole batch's loss, its norm
    is the step's grad_norm, and the parameters stay as they were."""
    optim = OptimConfig(learning_rate=1e-2, total_steps=10, schedule="constant")
    loss = _latro(LatroConfig(num_samples=4)).loss
    batch = _fixed_latro_batch()
    four = Trainer(models.init_model(TINY, seed=1), optim, loss, microbatches=4)
    before = _params(four)
    grads = four.gradients(batch, {"rows": 8})
    whole = {k: jnp.asarray(v) for k, v in batch.items()}
    want = jax.grad(lambda p: loss(nnx.merge(four.graphdef, p), whole, {"rows": jnp.float32(8)}, RowLayout())[0])(
        four.state.params)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        # measured: 6.1e-7 at most (summation order); a wrong micro-batch weight is off 4x
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(before[k], v) for k, v in _params(four).items())
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
    assert four.step(batch, {"rows": 8})["grad_norm"] == pytest.approx(norm, rel=1e-5)


@pytest.mark.slow
def test_latro_update_on_8_device_mesh_equals_one_device():
    """Sampling, scoring and the step of one update, on a data x fsdp x tensor = 2x2x2 mesh.
    Measured: max |d params| = 7.5e-9 after an update of size 1e-3 (1.6e-7 after three)."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg = LatroConfig(num_samples=4, max_rationale_tokens=6, beta=0.1)
    optim = OptimConfig(learning_rate=1e-3, eps=1e-3, total_steps=10)  # eps: see the SFT test
    stops = Stops(ids=(2,), phrases=((7, 8),))
    prompts, answers = [[5, 9, 11], [12, 4]], [[30, 31, 2], [32, 2]]
    single = Learner(_latro(cfg, stops), models.init_model(TINY, seed=4), optim)
    meshed = Learner(_latro(cfg, stops, mesh=mesh), models.init_model(TINY, seed=4, mesh=mesh), optim)
    before = _params(single.trainer)
    key = jax.random.key(1_000_003)
    m1, m8 = _latro_update(single, prompts, answers, key), _latro_update(meshed, prompts, answers, key)
    for name in ("loss", "reward", "answer_logp", "kl", "finished", "grad_norm"):
        # abs 1e-5: kl at the first update is 0 up to float rounding (sampler against reference)
        assert m1[name] == pytest.approx(m8[name], rel=1e-4, abs=1e-5), name
    p1, p8 = _params(single.trainer), _params(meshed.trainer)
    assert max(np.abs(p1[k] - before[k]).max() for k in p1) > 1e-4  # the update did something
    for k in p1:
        np.testing.assert_allclose(p1[k], p8[k], atol=1e-6, err_msg=k)
    assert meshed.trainer.state.params["layers"]["attn"]["qkv_kernel"][...].sharding.mesh.size == 8


@pytest.mark.slow
def test_rollout_scores_the_bare_answer_after_an_empty_rationale():
    """A rationale that stops at once (the model answered directly) is followed by y as a whole
    completion ("The answer is" with no leading space); any other rationale by y as it follows
    text. With most tokens as stops, both kinds occur among 2 x 8 samples."""
    cfg = LatroConfig(num_samples=8, max_rationale_tokens=4)
    stops = Stops(ids=tuple(range(2, 33)))
    learner = Learner(_latro(cfg, stops), models.init_model(TINY, seed=0), OptimConfig(total_steps=1))
    prompts, answers, bare = [[5, 9, 11], [12, 4]], [[36, 37, 2], [38, 2]], [[39, 2], [35, 34, 2]]
    out = learner.algorithm.sample(learner.policies(), prompts, answers, bare, jax.random.key(3_000_009))
    rows, lengths = out.rows, out.lengths
    assert 0 < (lengths == 0).sum() < len(lengths), lengths
    for r, n in enumerate(lengths):
        want = (bare if n == 0 else answers)[r // 8]
        assert rows.tokens[r][rows.answer_mask[r] > 0].tolist() == want, r
        assert rows.rationale_mask[r].sum() == n


def _stories_task():
    """stories260K questions from story openings, gold y = "The answer is 7." + EOS; rationales
    end at EOS or at a "." token (so most of 16 tokens finish)."""
    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    openings = ["Once upon a time", "One day, a little dog", "Tom and Sue went to", "The sun was"]
    prompts = [tok(o).input_ids for o in openings]
    answer = tok("The answer is 7.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    period = tok.convert_tokens_to_ids(".")
    return tok, prompts, [answer] * 4, Stops(ids=(tok.eos_token_id, period))


@pytest.mark.slow
def test_latro_self_reward_alone_raises_answer_likelihood():
    """c_sft = 0 and beta = 0: only the self-reward's RLOO advantages move the policy. With
    rationales that finish (at "."), 10 updates of 4 questions x 8 rationales raise the mean
    log pi(y | x + z). Measured: -76.5 -> -69.1 (mean of the last 3 updates), finished 0.6."""
    tok, prompts, answers, stops = _stories_task()
    cfg = LatroConfig(num_samples=8, max_rationale_tokens=16, beta=0.0, sft_coef=0.0, nonstop_penalty=1.0)
    learner = Learner(_latro(cfg, stops), models.load_hf(STORIES_HF),
                      OptimConfig(learning_rate=3e-4, schedule="constant", total_steps=100))
    history = [_latro_update(learner, prompts, answers, jax.random.key(step)) for step in range(10)]
    first = history[0]
    last = np.mean([h["answer_logp"] for h in history[-3:]])
    assert 0.3 < first["finished"] < 0.9 and first["advantage_std"] > 0  # the reward reaches A at once
    assert last > first["answer_logp"] + 0.05 * abs(first["answer_logp"]), [h["answer_logp"] for h in history]


def _torch_logps(model, sequence):
    """log pi(sequence[t] | sequence[:t]) for t >= 1, from a transformers model (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(sequence[1:])[:, None])[:, 0]
    return np.concatenate([[0.0], logp.numpy()])


@pytest.mark.slow
def test_latro_update_wiring_against_transformers_scores_and_numpy(tmp_path):
    """One LaTRO update after a first one (so policy != reference), 2 micro-batches, finished
    and unfinished rationales: every row holds [x | z | y] with z the sample before its stop;
    log pi(z|x), log pi(y|x+z) under the policy and log pi_0(z|x) come from transformers; the
    rewards (non-stop penalty = gamma x the GLOBAL batch mean), RLOO advantages and the loss are
    redone in NumPy; the learner's scored batch and step agree."""
    tok, prompts, answers, stops = _stories_task()
    cfg = LatroConfig(num_samples=4, max_rationale_tokens=10, beta=0.1, nonstop_penalty=2.0, sft_coef=0.5)
    learner = Learner(_latro(cfg, stops, microbatches=2), models.load_hf(STORIES_HF),
                      OptimConfig(learning_rate=1e-3, schedule="constant", total_steps=10))
    _latro_update(learner, prompts, answers, jax.random.key(0))
    models.save_hf(learner.model(), str(tmp_path / "policy"))
    policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(STORIES_HF).eval()
    policies = learner.policies()
    out = learner.algorithm.sample(policies, prompts, answers, None, jax.random.key(1))
    scored = learner.algorithm.score(policies, out)
    z_logp, y_logp, ref_z_logp, finished = [], [], [], []
    for r, sample in enumerate(out.samples):
        stop = next((i for i, t in enumerate(sample) if t in stops.ids), None)
        z = sample if stop is None else sample[:stop]
        x, y = prompts[r // 4], answers[r // 4]
        assert out.rows.tokens[r][out.rows.valid[r]].tolist() == x + z + y, r
        lp, ref_lp = _torch_logps(policy, x + z + y), _torch_logps(reference, x + z + y)
        z_logp.append(lp[len(x):len(x) + len(z)].sum())
        ref_z_logp.append(ref_lp[len(x):len(x) + len(z)].sum())
        y_logp.append(lp[len(x) + len(z):].sum())
        finished.append(stop is not None)
    z_logp, y_logp, ref_z_logp, finished = map(np.array, (z_logp, y_logp, ref_z_logp, finished))
    assert 0 < finished.mean() < 1, finished
    answer = np.where(finished, y_logp, 2.0 * y_logp.mean())
    rewards = (answer - 0.1 * (z_logp - ref_z_logp)).reshape(-1, 4)
    advantages = (rewards - (rewards.sum(1, keepdims=True) - rewards) / 3).reshape(-1)
    np.testing.assert_allclose(scored.details["rewards"], rewards, atol=2e-3)
    np.testing.assert_allclose(scored.arrays["advantages"], advantages, atol=2e-3)
    loss = np.mean(-advantages * z_logp - 0.5 * y_logp)
    assert learner.apply(scored)["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-3)


@pytest.mark.slow
def test_sft_steps_lower_completion_nll_and_accumulate_exactly():
    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    prompts = [tok(q).input_ids for q in ("Tom has 3 apples.", "A cat sat.", "Lily ran.", "Max is big.")]
    completions = [tok(c, add_special_tokens=False).input_ids + [2] for c in
                   (" He eats one. The answer is 2.", " The answer is 0.", " The answer is 1.",
                    " The dog barks. The answer is 5.")]
    # eps = 1e-3 makes Adam's step Lipschitz in the gradient; with eps = 1e-8 a near-zero
    # gradient's summation-order noise (~1e-9) flips its step by up to the learning rate.
    optim = OptimConfig(learning_rate=3e-3, eps=1e-3, schedule="constant", total_steps=100)
    sft = lambda microbatches: Learner(Sft(SftConfig(), token_context(microbatches=microbatches)),
                                       models.load_hf(STORIES_HF), optim)
    one, two = sft(1), sft(2)
    rows = rollout.completion_rows(prompts, completions)
    losses = []
    for _ in range(5):
        m1, m2 = (learner.apply(learner.algorithm.score(learner.policies(), rows)) for learner in (one, two))
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
        losses.append(m1["loss"])
    assert losses[-1] < 0.6 * losses[0], losses
    p1, p2 = _params(one.trainer), _params(two.trainer)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], atol=1e-6, err_msg=k)
