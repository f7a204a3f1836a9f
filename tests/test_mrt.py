"""MRT and outcome-reward GRPO (SPEC section 2) against hand-built traces, NumPy transcriptions
of the SPEC and transformers: episodes, the meta-prover's J, progress and regret, the GRPO
loss, the MRT-RL advantage readings, the MRT-STaR filters and the forced-answer evaluation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_models import STORIES_HF, generated, gpt2_tokenizer, token_context
from latro_jax import models, objectives, rollout
from latro_jax.algorithms import (Context, Grpo, GrpoConfig, Learner, Mrt, MrtConfig, MrtStar,
                                  MrtStarConfig)
from latro_jax.data import Example, PromptFormatter, get_task
from latro_jax.data.synthetic import generate_splits
from latro_jax.data.task_tokenizers import build_word_tokenizer
from latro_jax.episodes import Episodes, SegmentConfig, make_segmenter, marker_starts
from latro_jax.meta_prover import ForcingConfig, MetaProver
from latro_jax.algorithms.group_rl import GroupSampling, PolicyLoss
from latro_jax.sampling import SamplingParams
from latro_jax.train import OptimConfig

TEN_PARAGRAPHS = [
    "Let me add the numbers.",            # 0
    "Wait, that is not right.",           # 1: marker 1 paragraph after the start: ignored
    "So 2 + 3 = 5.",                      # 2
    "Wait, let me check 5 again.",        # 3: split (3 after the start)
    "Hmm, 5 looks fine.",                 # 4: "Hmm" is no marker
    "Alternatively, count on fingers.",   # 5: marker 2 after the last split: ignored
    "One, two, three, four, five.",       # 6
    "But wait, what about zero?",         # 7: split (4 after the last)
    "Zero adds nothing.",                 # 8
    "But hold on, the answer is 5.",      # 9: 2 after the last split: ignored
]


# ---------------------------------------------------------------- episodes
def test_marker_rule_on_ten_paragraphs():
    text = "\n\n".join(TEN_PARAGRAPHS)
    starts = marker_starts(text, SegmentConfig().markers)
    assert [text[s:s + 12] for s in starts] == ["Wait, let me", "But wait, wh"]
    assert marker_starts("Wait first.\n\nA.\n\nB.\n\nWait again.", SegmentConfig().markers) == [
        len("Wait first.\n\nA.\n\nB.\n\n")]  # a marker in the first paragraph never splits
    assert marker_starts(text, SegmentConfig().markers, max_splits=1) == starts[:1]
    assert marker_starts(text, ("Hmm",)) == [text.index("Hmm")]  # markers are configurable


def test_marker_segmentation_is_token_exact_on_a_real_tokenizer():
    """GPT-2 (byte-level BPE): the episodes are the text between the splits (the blank line
    before a marker paragraph ends the previous episode), they concatenate to the ids, and
    group_size 2 merges them pairwise."""
    tok = gpt2_tokenizer()
    fmt = PromptFormatter(tok)
    text = "\n\n".join(TEN_PARAGRAPHS) + "\n\nThe answer is 5."
    ids = tok(text).input_ids
    episodes = make_segmenter(SegmentConfig(rule="markers"), fmt)(ids)
    assert episodes.count == 3
    assert sum(episodes.pieces(), []) == ids
    texts = episodes.texts(tok)
    assert texts[0] == "\n\n".join(TEN_PARAGRAPHS[:3]) + "\n\n"
    assert texts[1] == "\n\n".join(TEN_PARAGRAPHS[3:7]) + "\n\n"
    assert texts[2] == "\n\n".join(TEN_PARAGRAPHS[7:]) + "\n\nThe answer is 5."  # the answer rides last
    assert tok.decode(episodes.prefix(2)) == texts[0] + texts[1]
    merged = make_segmenter(SegmentConfig(rule="markers", group_size=2), fmt)(ids)
    assert merged.ends == (episodes.ends[1], episodes.ends[2])


@pytest.fixture(scope="module")
def word():
    rows = generate_splits(0, {"train": 300}, num_steps=4, max_operand=9, stepwise_share=0.5)["train"]
    tok = build_word_tokenizer([r["question"] for r in rows] + [r["rationale"] for r in rows])
    return tok, PromptFormatter(tok)


def test_end_token_segmentation_of_the_synthetic_task(word):
    tok, fmt = word
    segment = make_segmenter(SegmentConfig(rule="end_tokens", end_texts=(".",)), fmt)
    ids = tok("2+8=10. 10-6=4. 4+4=8. 8-5=3.", add_special_tokens=False).input_ids
    episodes = segment(ids)
    assert episodes.count == 4 and sum(episodes.pieces(), []) == ids
    assert episodes.texts(tok) == ["2+8=10.", " 10-6=4.", " 4+4=8.", " 8-5=3."]
    full = ids + fmt.answer_ids("The answer is 3.")  # + end token: the answer is no episode
    episodes = segment(full)
    assert episodes.count == 4 and episodes.thinking == len(ids) and sum(episodes.pieces(), []) == full
    terse = segment(tok("Total: 7. The answer is 7.", add_special_tokens=False).input_ids)
    assert terse.count == 1 and tok.decode(terse.prefix(1)) == "Total: 7."
    empty = segment(fmt.completion_ids("The answer is 7."))
    assert empty.count == 0 and empty.prefix(0) == []


# ---------------------------------------------------------------- J
@pytest.fixture(scope="module")
def stories():
    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    fmt = PromptFormatter(tok)
    return tok, fmt, models.load_hf(STORIES_HF), transformers.AutoModelForCausalLM.from_pretrained(STORIES_HF).eval()


def _policies(model, microbatches=1):
    from latro_jax.algorithms import Sft, SftConfig
    learner = Learner(Sft(SftConfig(), token_context(microbatches=microbatches)), model,
                      OptimConfig(total_steps=1))
    return learner.policies()


@pytest.mark.slow
def test_likelihood_j_equals_transformers_on_x_c_suffix_target(stories):
    """J = exp(sum of log pi over the target " {gold}." + EOS), with x + c + suffix as context."""
    tok, fmt, model, ref = stories
    prover = MetaProver(ForcingConfig(estimator="likelihood"), get_task("gsm8k"), fmt)
    prompts = [tok("Tom has 3 apples.").input_ids, tok("Lily saw a dog.").input_ids]
    prefixes = [tok(" He eats one.", add_special_tokens=False).input_ids, []]
    golds = ["2", "7"]
    policies = _policies(model)
    got = prover.likelihood(policies.scorer, policies.params, prompts, prefixes, golds).j
    for x, c, gold, j in zip(prompts, prefixes, golds, got):
        context = x + c + (tok(" The answer is", add_special_tokens=False).input_ids if c
                           else tok("The answer is", add_special_tokens=False).input_ids)
        target = tok(tok.decode(c + context[len(x) + len(c):]) + f" {gold}.", add_special_tokens=False).input_ids
        target = target[len(context) - len(x):] + [tok.eos_token_id]
        seq = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(ref(seq).logits[0].double(), -1)
        expected = sum(float(logp[len(context) + t - 1, tok_id]) for t, tok_id in enumerate(target))
        assert j == pytest.approx(np.exp(expected), rel=1e-4, abs=1e-5)
        assert 0 < j < 1


@pytest.mark.slow
def test_mc_j_with_greedy_forcing_is_the_score_of_the_greedy_decode(stories):
    tok, fmt, model, ref = stories
    task = get_task("gsm8k")
    prover = MetaProver(ForcingConfig(sampling=SamplingParams(0.0), answer_tokens=6), task, fmt)
    prompts = [tok("Tom has 3 apples.").input_ids, tok("One day").input_ids]
    prefixes = [tok(" He eats 2.", add_special_tokens=False).input_ids, []]
    forced = prover.forced_prompts(prompts, prefixes)
    texts = []
    for p in forced:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6,
                               eos_token_id=list(fmt.stops.ids), pad_token_id=fmt.pad_id)
        texts.append("The answer is" + tok.decode(out[0, len(p):].tolist(), skip_special_tokens=True))
    golds = [task.extract(texts[0]) or "1", "12345"]  # the first greedy answer right, the second wrong
    result = prover.mc(rollout.Sampler(), model, prompts, prefixes, golds, jax.random.key(0))
    assert result.outcomes.shape == (2, 1)
    assert result.j.tolist() == [float(task.score(t, g)) for t, g in zip(texts, golds)]
    assert [t.replace(" ", "") for t in sum(result.texts, [])] == [t.replace(" ", "") for t in texts]


@pytest.mark.slow
def test_mc_j_lies_in_a_binomial_band_around_the_exact_success_probability(stories):
    """One-token forced answers at T = 1 on a story, graded by the ARC rule (the gold text in
    the answer): the exact P(correct) is the total probability of the vocabulary entries whose
    text scores right (enumerated with the model's logits, gold = the likeliest answer); J from
    m = 4000 samples lies within 4 sigma of it, and the same key gives the same J."""
    tok, fmt, model, _ = stories
    task = get_task("arc_challenge")
    prover = MetaProver(ForcingConfig(samples=4000, sampling=SamplingParams(1.0), answer_tokens=1), task, fmt)
    prompt, prefix = tok("Tim was sad. He lost his toy.").input_ids, tok(" Then", add_special_tokens=False).input_ids
    forced = prover.forced_prompts([prompt], [prefix])[0]
    logits = np.asarray(model(np.array([forced], np.int32)))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    texts = ["The answer is" + tok.decode([t], skip_special_tokens=True) for t in range(len(probs))]
    candidates = {task.extract(t) for t in texts} - {None, ""}
    p_of = lambda gold: sum(probs[t] for t, text in enumerate(texts) if task.score(text, gold))
    gold = max(sorted(candidates), key=p_of)
    p = p_of(gold)
    result = prover.mc(rollout.Sampler(), model, [prompt], [prefix], [gold], jax.random.key(3))
    sigma = np.sqrt(p * (1 - p) / 4000)
    assert p > 0.05 and abs(result.j[0] - p) <= 4 * sigma, (gold, result.j[0], p, sigma)
    again = prover.mc(rollout.Sampler(), model, [prompt], [prefix], [gold], jax.random.key(3))
    assert again.j[0] == result.j[0] and (again.outcomes == result.outcomes).all()  # measured: 0.247 vs 0.253


# ---------------------------------------------------------------- progress and regret
def test_regret_hand_values_and_mean_of_means():
    assert objectives.normalised_regret([10, 20, 30], [0.25, 0.5, 1.0], 15) == pytest.approx(0.8125)
    assert objectives.normalised_regret([10, 20, 30], [0.25, 0.5, 1.0], 30) == pytest.approx(0.583333, abs=1e-6)
    assert objectives.normalised_regret([10, 20, 30], [0.25, 0.5, 1.0], 60) == pytest.approx(0.291667, abs=1e-6)
    per_problem = [[0.0], [1.0, 1.0, 1.0]]  # one trace vs three
    assert objectives.mean_of_means(per_problem) == 0.5
    assert np.mean(sum(per_problem, [])) == 0.75  # pooled would differ


def test_progress_telescopes():
    rng = np.random.RandomState(0)
    for k in range(1, 8):
        j = rng.rand(k + 1)
        p = objectives.progress(j)
        assert len(p) == k and p.sum() == pytest.approx(j[-1] - j[0])
        assert p == pytest.approx(np.array([j[i + 1] - j[i] for i in range(k)]))


# ---------------------------------------------------------------- GRPO
SPEC_LOGP = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, -2.2, -0.9]])
SPEC_OLD = np.array([[-1.3, -1.9, -0.5, 0.0], [-0.3, -0.9, -2.4, -0.9]])
SPEC_REF = np.array([[-1.1, -2.0, -0.7, 0.0], [-0.5, -1.0, -2.0, -0.9]])
SPEC_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], float)


def np_group_advantages(r, scaling="group"):
    r = np.asarray(r, float)
    out = np.empty_like(r)
    for i, row in enumerate(r):
        centred = row - row.mean()
        if scaling == "none":
            out[i] = centred
        else:
            std = np.sqrt(((row - row.mean()) ** 2).sum() / (len(row) - 1)) if scaling == "group" else \
                np.sqrt(((r - r.mean()) ** 2).sum() / (r.size - 1))
            out[i] = centred / (std + 1e-4)
    return out


def np_grpo(logp, old, ref, mask, A, eps=0.2, beta=0.04, aggregation="token", max_length=None):
    """SPEC 2.5 transcribed: the loss and its gradient with respect to log pi."""
    rho = np.exp(logp - old)
    a = A[:, None]
    unclipped, clipped = rho * a, np.clip(rho, 1 - eps, 1 + eps) * a
    d_surrogate = np.where(unclipped <= clipped, rho * a, np.where((rho > 1 - eps) & (rho < 1 + eps), rho * a, 0.0))
    loss_t = -np.minimum(unclipped, clipped) + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    grad_t = -d_surrogate + beta * (1 - np.exp(ref - logp))
    rows, T = logp.shape
    if aggregation == "token":
        w = mask / mask.sum()
    elif aggregation == "sequence":
        w = mask / mask.sum(1, keepdims=True) / rows
    else:
        w = mask / (rows * (max_length or T))
    return float((loss_t * w).sum()), grad_t * w


@pytest.mark.slow
def test_grpo_hand_values_and_numpy_transcription_with_clipping_on_both_sides():
    A = objectives.group_advantages(np.array([[1.0, 0.0]]))[0]
    assert A == pytest.approx([0.7070068, -0.7070068], abs=1e-7)
    ratio = np.exp(SPEC_LOGP - SPEC_OLD)
    assert (ratio > 1.2).any() and (ratio < 0.8).any()  # both clip sides are exercised
    expected = {"token": 0.0930603, "sequence": -0.0099972, "dr_grpo": 0.0814278}
    for aggregation, value in expected.items():
        def loss(logp):
            losses = objectives.grpo_token_losses(logp, jnp.asarray(SPEC_OLD), jnp.asarray(SPEC_REF),
                                                  jnp.asarray(A), clip_eps=0.2, beta=0.04)
            return objectives.aggregate_token_losses(losses, jnp.asarray(SPEC_MASK), aggregation,
                                                     completion_tokens=SPEC_MASK.sum(), rows=2.0, max_length=4.0)
        got, grad = jax.value_and_grad(loss)(jnp.asarray(SPEC_LOGP))
        want, want_grad = np_grpo(SPEC_LOGP, SPEC_OLD, SPEC_REF, SPEC_MASK, A, aggregation=aggregation)
        assert float(got) == pytest.approx(value, abs=1e-7) and want == pytest.approx(value, abs=1e-7)
        np.testing.assert_allclose(grad, want_grad, atol=1e-7)
        garbage = np.where(SPEC_MASK > 0, SPEC_LOGP, 1e3)  # masked positions change nothing
        assert float(loss(jnp.asarray(garbage))) == pytest.approx(float(got), abs=1e-7)


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_group_advantages_match_numpy(scaling):
    r = np.random.RandomState(1).randint(0, 2, (5, 4)).astype(float)
    np.testing.assert_allclose(objectives.group_advantages(r, scaling), np_group_advantages(r, scaling), atol=1e-12)
    shifted = r + np.arange(5)[:, None] * 3.0  # a per-group constant leaves group advantages unchanged
    if scaling != "batch":
        np.testing.assert_allclose(objectives.group_advantages(shifted, scaling),
                                   objectives.group_advantages(r, scaling))


def test_mrt_advantage_readings_by_hand():
    assert objectives.termination_advantages(np.array([[1, 1, 1, 0]]), np.array([1.0])).tolist() == [[0, 0, 0, -1]]
    r, forced = np.array([[1.0, 0.0]]), np.array([[1.0, 1.0, 0.0]])
    joint = np.array([1, 0, 1, 1, 0.0])
    expected = (r - joint.mean()) / (joint.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(objectives.mixed_advantages(r, forced), expected)
    bonus = objectives.bonus_rewards(np.array([[1.0, 0.0]]), np.array([[1.0, 0.5]]), np.array([0.25]), 2.0)
    np.testing.assert_allclose(bonus, [[2.5, 0.5]])


# ---------------------------------------------------------------- algorithms on the synthetic task
@pytest.fixture(scope="module")
def synthetic(word):
    """The demo's word tokenizer, a tiny random model, 4 training examples."""
    tok, fmt = word
    task = get_task("synthetic")
    rows = generate_splits(0, {"train": 4}, num_steps=2, max_operand=5)["train"]
    examples = [task.example(r, "synthetic") for r in rows]
    config = models.ModelConfig(family="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                initializer_range=0.3, eos_token_id=(fmt.end_id,))
    ctx = Context(task, fmt)
    return SimpleJob(tok, fmt, task, examples, config, ctx)


@dataclasses.dataclass
class SimpleJob:
    tok: object
    fmt: object
    task: object
    examples: list
    config: object
    ctx: Context


def _learner(algorithm, job, seed=0):
    return Learner(algorithm, models.init_model(job.config, seed=seed),
                   OptimConfig(learning_rate=1e-2, eps=1e-3, schedule="constant", total_steps=10))


@pytest.mark.slow
def test_mrt_with_empty_prefixes_group_and_alpha_0_is_grpo_bit_for_bit(synthetic):
    grpo_cfg = GrpoConfig(rollout=GroupSampling(num_samples=4, max_tokens=10))
    grpo = _learner(Grpo(grpo_cfg, synthetic.ctx), synthetic)
    mrt = _learner(Mrt(dataclasses.replace(grpo_cfg.as_mrt()), synthetic.ctx), synthetic)
    mrt_cfg = mrt.algorithm.cfg
    assert (mrt_cfg.prefixes, mrt_cfg.advantage, mrt_cfg.alpha) == ("empty", "group", 0.0)
    for step in range(2):
        key = jax.random.key(step)
        a, b = grpo.update(synthetic.examples, key), mrt.update(synthetic.examples, key)
        untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith("_s")}
        assert untimed(a) == untimed(b)
    for x, y in zip(jax.tree.leaves(grpo.state.params), jax.tree.leaves(mrt.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_grpo_step_with_4_microbatches_equals_one(synthetic):
    one = _learner(Grpo(GrpoConfig(rollout=GroupSampling(num_samples=4, max_tokens=10)), synthetic.ctx), synthetic)
    four = _learner(Grpo(GrpoConfig(rollout=GroupSampling(num_samples=4, max_tokens=10)),
                         dataclasses.replace(synthetic.ctx, microbatches=4)),
                    synthetic)
    ro = one.algorithm.rollout(one.policies(), synthetic.examples, jax.random.key(5))
    ro.outcomes.rewards[:, :2] = 1.0  # make advantages non-zero
    s1, s4 = one.algorithm.score(one.policies(), ro), four.algorithm.score(four.policies(), ro)
    m1, m4 = one.apply(s1), four.apply(s4)
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5, abs=1e-7) and m1["grad_norm"] > 0
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)
    # Adam moves a parameter by lr * m / (sqrt(v) + eps) ~ 1e-2: where the gradient is ~1e-4,
    # its float rounding (batches of 4 vs 16 rows, shared prompts of 1 vs 4 questions) moves it ~1e-6
    for x, y in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(four.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-6)


@pytest.mark.slow
def test_mrt_with_shared_prompts_equals_per_row_passes(synthetic):
    """share_prompts (each question's prompt, with its pi_old prefix, run once for its G rows in
    the reference pass and the step) against one pass per row: the same reference log-probs of every
    completion token, loss and gradient."""
    cfg = MrtConfig(rollout=GroupSampling(num_samples=4, max_tokens=12), advantage="termination",
                    forcing=ForcingConfig(samples=2, answer_tokens=4))
    learners = [_learner(Mrt(dataclasses.replace(cfg, share_prompts=share), synthetic.ctx), synthetic)
                for share in (True, False)]
    ro = learners[0].algorithm.rollout(learners[0].policies(), synthetic.examples, jax.random.key(2))
    ro.outcomes.rewards[:, :2] = 1.0  # non-zero advantages
    shared, plain = (learner.algorithm.score(learner.policies(), ro) for learner in learners)
    assert shared.layout.shared_prefix[1] == 4  # one group per question
    assert plain.layout.shared_prefix is None
    mask = shared.arrays["completion_mask"] > 0
    np.testing.assert_allclose(shared.arrays["ref_logp"][mask], plain.arrays["ref_logp"][mask], rtol=1e-5, atol=1e-5)
    grads = [learner.trainer.gradients(s.arrays, s.scalars, s.layout) for learner, s in zip(learners, (shared, plain))]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 0


@pytest.mark.slow
def test_prefix_cuts_are_deterministic_within_the_episode_count_and_hold_no_answer(synthetic):
    mrt = Mrt(MrtConfig(rollout=GroupSampling(num_samples=2, max_tokens=16, sampling=SamplingParams(1.0))),
              synthetic.ctx)
    learner = _learner(mrt, synthetic, seed=3)
    prompts = [synthetic.fmt.prompt_ids(e.question) for e in synthetic.examples]
    keys = jax.random.split(jax.random.key(7), 2)
    first = mrt.prefixes(learner.policies(), prompts, *keys)
    assert first == mrt.prefixes(learner.policies(), prompts, *keys)
    other = [mrt.prefixes(learner.policies(), prompts, *jax.random.split(jax.random.key(s), 2)) for s in range(6)]
    assert any(o[0] != first[0] for o in other)
    for prefixes, counts in [first, *other]:
        for prefix, j in zip(prefixes, counts):
            text = synthetic.fmt.decode(prefix)
            assert "The answer is" not in text and text.count(".") == j  # whole episodes only


@pytest.mark.parametrize("advantage,estimator", [("termination", "mc"), ("termination", "likelihood"),
                                                 ("mixed", "mc"), ("group", "likelihood")])
@pytest.mark.slow
def test_every_mrt_reading_updates_with_both_estimators(synthetic, advantage, estimator):
    forcing = ForcingConfig(estimator=estimator, samples=3, answer_tokens=4)
    bonus = advantage == "group"
    cfg = MrtConfig(rollout=GroupSampling(num_samples=2, max_tokens=12), advantage=advantage, forcing=forcing,
                    continuation="episode" if bonus else "full", alpha=1.0 if bonus else 0.0)
    learner = _learner(Mrt(cfg, synthetic.ctx), synthetic)
    ro = learner.algorithm.rollout(learner.policies(), synthetic.examples, jax.random.key(1))
    assert ro.outcomes.j_prefix.shape == (4,) and ((0 <= ro.outcomes.j_prefix) & (ro.outcomes.j_prefix <= 1)).all()
    if estimator == "mc":
        forced = ro.outcomes.forced
        assert forced.shape == (4, 3) and ro.outcomes.j_prefix.tolist() == forced.mean(1).tolist()
    scored = learner.algorithm.score(learner.policies(), ro)
    o = ro.outcomes
    expected = {"termination": lambda: o.rewards - o.j_prefix[:, None],
                "mixed": lambda: objectives.mixed_advantages(o.rewards, o.forced),
                "group": lambda: objectives.group_advantages(1.0 * (o.j_after - o.j_prefix[:, None]))}[advantage]()
    np.testing.assert_allclose(scored.details["advantages"], expected, atol=1e-6)
    metrics = learner.apply(scored)
    assert np.isfinite(metrics["loss"]) and learner.step == 1


def test_alpha_is_refused_or_warned_where_it_cannot_act_and_reserves_budget_only_where_read(synthetic):
    """alpha > 0 with `termination` / `mixed` (which never read it): refused. `episode` rewards
    divided by their group std: warned (alpha cancels). `group` with full continuations: the
    bonus acts (J_after is the meta-prover's, not the outcome): no warning, and only there is
    the continuation's budget reserved before the forced answer."""
    for advantage in ("termination", "mixed"):
        with pytest.raises(ValueError, match=f"alpha=1.0 has no effect with advantage='{advantage}'"):
            MrtConfig(advantage=advantage, alpha=1.0)
    with pytest.warns(UserWarning, match="alpha=1.0 cancels"):
        Mrt(MrtConfig(advantage="group", alpha=1.0, continuation="episode"), synthetic.ctx)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bonus = Mrt(MrtConfig(rollout=GroupSampling(max_tokens=10), advantage="group", alpha=1.0), synthetic.ctx)
        plain = Mrt(MrtConfig(rollout=GroupSampling(max_tokens=10), advantage="termination"), synthetic.ctx)
    forced = bonus.prover.forced_tokens()
    assert bonus.tokens_after_prompt(None) == 10 + 10 + forced
    assert plain.tokens_after_prompt(None) == max(10 + 10, 10 + forced)


@pytest.mark.parametrize("bad,match", [
    (dict(advantage="group", rollout=GroupSampling(num_samples=1)), "G >= 2"), (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(advantage="mixed", forcing=ForcingConfig(estimator="likelihood")), "needs forcing.estimator='mc'"),
    (dict(forcing=dict(samples=0)), "m must be >= 1"), (dict(advantage="nope"), "advantage='nope'"),
])
def test_bad_mrt_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        if isinstance(bad.get("forcing"), dict):
            ForcingConfig(**bad["forcing"])
        MrtConfig(**bad)


def test_an_empty_suffix_is_refused():
    with pytest.raises(ValueError, match="suffix is empty"):
        ForcingConfig(suffix="   ")


# ---------------------------------------------------------------- MRT-STaR filters
def _episodes(*lengths):
    ends, total = [], 0
    for n in lengths:
        total += n
        ends.append(total)
    return Episodes(tuple(range(100, 100 + total)), total, tuple(ends))


def test_star_filters_on_hand_built_j_lists(synthetic):
    three = GroupSampling(num_samples=3, sampling=SamplingParams(1.0))
    star = lambda f, keep=1: MrtStar(MrtStarConfig(rollout=three, filter=f, keep_per_question=keep), synthetic.ctx)
    episodes = [_episodes(2, 2), _episodes(3), _episodes(1, 1, 1)]
    traces = [list(e.ids) for e in episodes]
    outcomes = np.array([1.0, 1.0, 0.0])
    j_values = [np.array([0.2, 0.6, 0.9]), np.array([0.5, 0.4]), np.array([0.0, 0.5, 0.5, 0.1])]
    forced = [[(np.array([1.0, 0.0]), [[7, 2], [8, 2]])] * 3, [(np.array([1.0, 1.0]), [[7, 2], [7, 2]])] * 2,
              [(np.array([0.0, 1.0]), [[9, 2], [7, 2]])] * 4]
    prompts, golds = [[1, 5]], ["7"]
    kept = star("outcome", 3).keep(prompts, golds, traces, outcomes, episodes, [], [], None, None)
    assert [k.completion for k in kept] == [traces[1], traces[0]]  # correct ones, fewer tokens first
    kept = star("nonneg", 3).keep(prompts, golds, traces, outcomes, episodes, j_values, forced, None, None)
    assert [k.completion for k in kept] == [traces[0]]  # trace 1 has p = -0.1
    kept = star("max_prefix", 3).keep(prompts, golds, traces, outcomes, episodes, j_values, forced, None, None)
    suffix = star("max_prefix").prover.suffix_ids
    assert [(k.j, k.completion) for k in kept] == [
        (0.9, traces[0] + suffix(traces[0]) + [7, 2]),                    # full thinking, J 0.9
        (0.5, suffix([]) + [7, 2]),                                        # best at the empty prefix
        (0.5, episodes[2].prefix(1) + suffix(episodes[2].prefix(1)) + [7, 2])]  # first max, a correct answer
    assert len(star("max_prefix", 1).keep(prompts, golds, traces, outcomes, episodes, j_values, forced,
                                          None, None)) == 1


@pytest.mark.slow
def test_a_star_round_that_keeps_nothing_takes_no_step(synthetic):
    cfg = MrtStarConfig(rollout=GroupSampling(num_samples=2, max_tokens=6, sampling=SamplingParams(1.0)),
                        filter="outcome")
    learner = _learner(MrtStar(cfg, synthetic.ctx), synthetic)
    before = [np.asarray(x) for x in jax.tree.leaves(learner.state.params)]
    metrics = learner.update(synthetic.examples, jax.random.key(0))  # a random model is never right
    assert metrics["skipped"] == 1.0 and metrics["kept_fraction"] == 0.0 and learner.step == 0
    assert all((np.asarray(x) == b).all() for x, b in zip(jax.tree.leaves(learner.state.params), before))


# ---------------------------------------------------------------- forced-answer evaluation
def test_forced_budget_curve_and_regret_on_scripted_generations(word, monkeypatch, tmp_path):
    """The greedy trace "2+3=5. 5+4=9. The answer is 9." (gold 9) is forced after 0, 1 and 2
    episodes; scripted forced answers are right only after both steps. Budgets (tokens) 0, 5
    and 100 give 0, 0, 1 (episode cuts: the same); regret at C0 = the trace's own length is
    1 - area of (0,0)-(6,0)-(12,1) over 12 = 0.75."""
    from latro_jax import evaluate as ev
    tok, fmt = word
    task = get_task("synthetic")
    trace = tok("2+3=5. 5+4=9.", add_special_tokens=False).input_ids
    full = trace + fmt.answer_ids("The answer is 9.")
    segment = make_segmenter(SegmentConfig(), fmt)(full)
    assert segment.count == 2
    steps = segment.ends

    def scripted(model, prompts, max_new_tokens, *, num_samples=1, **_):
        if max_new_tokens == 64:  # the greedy trace
            return generated([[full]])
        answers = [[tok(" 9.", add_special_tokens=False).input_ids + [fmt.end_id]]
                   if "4=9" in tok.decode(p) else [tok(" 1.", add_special_tokens=False).input_ids]
                   for p in prompts]
        return generated(answers)

    monkeypatch.setattr(rollout.sampling, "generate", scripted)
    example = Example(id="q", question="Ann has 2 pens. Ann gets 3 more. Ann gets 4 more. How many pens?", gold="9")
    for forced_at in ("tokens", "episode"):
        cfg = ev.EvalConfig(max_new_tokens=64, maj_k=0, forced_budgets=(0, 5, 100), forced_at=forced_at,
                            regret_cutoffs=(steps[1], 2 * steps[1]))
        summary = ev.evaluate(None, task, [example], fmt, cfg, progress=False)
        assert [summary[f"forced@{b}"] for b in (0, 5, 100)] == [0.0, 0.0, 1.0]
        area = (steps[1] - steps[0]) * 0.5
        assert summary[f"regret@{steps[1]}"] == pytest.approx(1 - area / steps[1])
        assert summary[f"regret@{2 * steps[1]}"] == pytest.approx(1 - (area + steps[1]) / (2 * steps[1]))


@pytest.mark.slow
def test_a_star_step_on_kept_traces_is_the_same_on_8_devices(synthetic):
    """The kept traces (here: gold rationales, as a filter would keep right ones) become
    completion rows padded to questions x keep_per_question; one step on a 2x4 mesh equals one
    device, and only the kept tokens count."""
    from latro_jax import sharding
    from latro_jax.algorithms.mrt_star import Kept, StarRollout
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    fmt, examples = synthetic.fmt, synthetic.examples
    prompts = [fmt.prompt_ids(e.question) for e in examples]
    kept = [Kept(q, fmt.completion_ids(examples[q].rationale)) for q in (0, 2, 3)]
    ro = StarRollout(prompts, kept, np.array([[1.0, 0.0]] * 4), [np.array([0.5])] * 8, np.ones(8))
    results = []
    for m in (None, mesh):
        cfg = MrtStarConfig(rollout=GroupSampling(num_samples=2, sampling=SamplingParams(1.0)), keep_per_question=2)
        learner = Learner(MrtStar(cfg, dataclasses.replace(synthetic.ctx, mesh=m)),
                          models.init_model(synthetic.config, seed=0, mesh=m),
                          OptimConfig(learning_rate=1e-3, eps=1e-3, schedule="constant", total_steps=10))
        scored = learner.algorithm.score(learner.policies(), ro)
        assert scored.arrays["tokens"].shape[0] == 8 and not scored.skip
        assert scored.scalars["completion_tokens"] == sum(len(k.completion) for k in kept)
        results.append((learner.apply(scored), models.param_arrays(learner.model())))
    (m1, p1), (m8, p8) = results
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5) and m1["loss"] > 0
    for k in p1:
        np.testing.assert_allclose(p1[k], p8[k], atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- J(empty) in regret, training rewards (SPEC 2.4, 2.6)
def test_regret_starts_at_j_of_the_empty_prefix():
    """SPEC 2.4's corrected curve: J(empty) = 0.5, then J = 1 after a first episode ending at 4
    thinking tokens: the curve rises linearly from 0.5 to 1 over x in [0, 4], regret at C0 = 16
    is (4 x 0.5 / 2) / 16 = 0.0625; right from the start: 0; no thinking: 1 - J(empty)."""
    assert objectives.normalised_regret([4], [1.0], 16, empty=0.5) == pytest.approx(0.0625)
    assert objectives.normalised_regret([3], [1.0], 16, empty=1.0) == 0.0
    assert objectives.normalised_regret([], [], 16, empty=0.25) == pytest.approx(0.75)
    assert objectives.normalised_regret([10, 20, 30], [0.25, 0.5, 1.0], 15) == pytest.approx(0.8125)  # J(empty) = 0


def test_forced_answers_right_from_the_start_give_regret_0_through_the_evaluation(word, monkeypatch):
    """evaluate() with forced answers scripted to be always right: a greedy trace with no thinking
    ("The answer is 9.") and a one-episode trace ("Total: 9. The answer is 9.") both have regret
    0 (before J(empty) was counted: 1.0 and 0.125 at C0 = 16)."""
    from latro_jax import evaluate as ev
    tok, fmt = word
    task = get_task("synthetic")
    right = tok(" 9.", add_special_tokens=False).input_ids + [fmt.end_id]
    for thinking in ("", "Total: 9."):
        full = tok(thinking, add_special_tokens=False).input_ids + fmt.answer_ids("The answer is 9.") \
            if thinking else fmt.answer_ids("The answer is 9.")

        def scripted(model, prompts, max_new_tokens, *, num_samples=1, **_):
            if max_new_tokens == 64:  # the greedy trace
                return generated([[full]])
            return generated([[right] for _ in prompts])

        monkeypatch.setattr(rollout.sampling, "generate", scripted)
        example = Example(id="q", question="Ann has 9 pens. How many pens?", gold="9")
        cfg = ev.EvalConfig(max_new_tokens=64, maj_k=0, regret_cutoffs=(16,))
        summary = ev.evaluate(None, task, [example], fmt, cfg, progress=False)
        assert summary["regret@16"] == 0.0, thinking


def test_training_rewards_need_a_finished_continuation_that_states_the_answer(synthetic, monkeypatch):
    """MRT-RL / GRPO rewards through the rollout (scripted continuations, gold 9): finished with
    "The answer is 9." -> 1; the same text cut by the budget -> 0; finished but stating no answer
    although its text ends in the gold number -> 0; finished with a wrong answer -> 0. The
    evaluation's rule (Task.score) still falls back to the last number."""
    tok, fmt, task = synthetic.tok, synthetic.fmt, synthetic.task
    texts = [("4+5=9. The answer is 9.", True), ("4+5=9. The answer is 9.", False), ("4+5=9.", True),
             ("4+5=9. The answer is 8.", True)]
    rows = [tok(t, add_special_tokens=False).input_ids + ([fmt.end_id] if done else []) for t, done in texts]
    width = max(map(len, rows))

    def scripted(model, prompts, max_new_tokens, *, num_samples=1, **_):
        assert len(prompts) == 1 and num_samples == 4
        return generated([rows], finished=np.array([done for _, done in texts]))

    monkeypatch.setattr(rollout.sampling, "generate", scripted)
    grpo = Grpo(GrpoConfig(rollout=GroupSampling(num_samples=4, max_tokens=width), loss=PolicyLoss(beta=0.0)),
                synthetic.ctx)
    learner = _learner(grpo, synthetic)
    example = Example(id="q", question=synthetic.examples[0].question, gold="9")
    ro = grpo.rollout(learner.policies(), [example], jax.random.key(0))
    assert ro.outcomes.rewards.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert [task.score(t, "9") for t, _ in texts] == [True, True, True, False]  # evaluation keeps its fallback


@pytest.mark.slow
def test_prefixes_come_from_pi_old_and_j_is_forced_after_them(synthetic, monkeypatch):
    """MRT-RL's rollout wiring, with the sampler wrapped to record its calls: the traces that
    give the prefixes are sampled from pi_old (here a model other than the policy; its traces are
    scripted to a two-episode "2+3=5. 5+4=9. The answer is 9."), and every forced prompt of J(c)
    is x + c + the termination suffix for the prefix c of its question (c non-empty here)."""
    tok, fmt = synthetic.tok, synthetic.fmt
    trace = tok("2+3=5. 5+4=9.", add_special_tokens=False).input_ids + fmt.answer_ids("The answer is 9.")
    real, calls = rollout.sampling.generate, []

    def recording(model, prompts, max_new_tokens, **kw):
        calls.append((model, [list(p) for p in prompts], max_new_tokens))
        if len(calls) == 1:  # the traces the prefixes are cut from
            return generated([[trace] for _ in prompts])
        return real(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(rollout.sampling, "generate", recording)
    cfg = MrtConfig(rollout=GroupSampling(num_samples=2, max_tokens=len(trace)), loss=PolicyLoss(beta=0.0),
                    prefixes="traces", advantage="termination", forcing=ForcingConfig(samples=2, answer_tokens=3))
    algorithm = Mrt(cfg, synthetic.ctx)
    learner = _learner(algorithm, synthetic, seed=0)
    other = models.init_model(synthetic.config, seed=1)
    policies = dataclasses.replace(learner.policies(), old=nnx.split(other)[1])
    examples = synthetic.examples
    ro = algorithm.rollout(policies, examples, jax.random.key(3))
    embed = lambda m: np.asarray(nnx.state(m, nnx.Param)["embed"]["embedding"][...])
    np.testing.assert_array_equal(embed(calls[0][0]), embed(other))  # pi_old, not pi_theta
    assert not np.array_equal(embed(calls[0][0]), embed(learner.model()))
    assert ro.prefix_episodes.tolist() != [0] * len(examples)  # some prefixes hold an episode
    prompts = [fmt.prompt_ids(e.question) for e in examples]
    forced = [p for _, ps, n in calls if n == cfg.forcing.answer_tokens for p in ps]
    assert forced == algorithm.prover.forced_prompts(prompts, ro.prefixes)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "mrt"])
def test_the_reference_is_scored_at_the_policys_temperature(synthetic, algorithm):
    """The first update at T = 0.7 with beta > 0: the policy is the reference, so the k3 KL is
    exactly 0 -- unless one of them is scored at another temperature."""
    sampling = SamplingParams(temperature=0.7)
    if algorithm == "grpo":
        algo = Grpo(GrpoConfig(rollout=GroupSampling(num_samples=4, max_tokens=8, sampling=sampling),
                               loss=PolicyLoss(beta=0.04)), synthetic.ctx)
    else:
        algo = Mrt(MrtConfig(rollout=GroupSampling(num_samples=4, max_tokens=8, sampling=sampling),
                             loss=PolicyLoss(beta=0.04), prefixes="traces", advantage="termination",
                             forcing=ForcingConfig(samples=2, answer_tokens=3)),
                   synthetic.ctx)
    assert algo.temperature == 0.7
    metrics = _learner(algo, synthetic).update(synthetic.examples[:2], jax.random.key(0))
    assert metrics["kl"] == 0.0


def test_a_forced_answer_is_graded_alone_not_with_its_prefix(synthetic, monkeypatch):
    """J by mc after a prefix that holds the gold ("4+5=9."): a forced answer with no number
    scores 0 (grading prefix + answer would find the 9 by the last-number fallback), a right
    one scores 1."""
    tok, fmt = synthetic.tok, synthetic.fmt
    prefix = tok("4+5=9.", add_special_tokens=False).input_ids
    for answer, expected in ((" nine.", 0.0), (" 9.", 1.0)):
        ids = tok(answer, add_special_tokens=False).input_ids + [fmt.end_id]
        monkeypatch.setattr(rollout.sampling, "generate", lambda model, prompts, n, *, num_samples=1, **_:
                            generated([[ids] * num_samples for _ in prompts]))
        prover = MetaProver(ForcingConfig(samples=2, answer_tokens=3), synthetic.task, fmt)
        prompt = fmt.prompt_ids(synthetic.examples[0].question)
        assert prover.mc(rollout.Sampler(), None, [prompt], [prefix], ["9"],
                         jax.random.key(0)).j.tolist() == [expected], answer


def _script_two_step_trace(monkeypatch, word, forced_answer: str):
    """evaluate()'s sampler scripted: the greedy trace "2+3=5. 5+4=9. The answer is 9." and every
    forced answer `forced_answer`; returns (the thinking's ids, the list the forced prompts go to)."""
    tok, fmt = word
    thinking = tok("2+3=5. 5+4=9.", add_special_tokens=False).input_ids
    full = thinking + fmt.answer_ids("The answer is 9.")
    answer = tok(forced_answer, add_special_tokens=False).input_ids + [fmt.end_id]
    forced_prompts = []

    def scripted(model, prompts, max_new_tokens, *, num_samples=1, **_):
        if max_new_tokens == 64:
            return generated([[full]])
        forced_prompts.extend(prompts)
        return generated([[answer] for _ in prompts])

    monkeypatch.setattr(rollout.sampling, "generate", scripted)
    return thinking, forced_prompts


TWO_STEP = Example(id="q", question="Ann has 2 pens. Ann gets 3 more. Ann gets 4 more. How many pens?", gold="9")


def test_budget_cuts_never_reach_past_the_thinking(word, monkeypatch):
    """Forced-answer budgets larger than the greedy trace's thinking cut at the thinking's end:
    the forced prompt is x + "2+3=5. 5+4=9." + suffix, never with the answer phrase or its gold."""
    from latro_jax import evaluate as ev
    thinking, forced_prompts = _script_two_step_trace(monkeypatch, word, " 1.")
    fmt = word[1]
    cfg = ev.EvalConfig(max_new_tokens=64, maj_k=0, forced_budgets=(len(thinking) + 2, 100))
    ev.evaluate(None, get_task("synthetic"), [TWO_STEP], fmt, cfg, progress=False)
    prover = MetaProver(cfg.forcing, get_task("synthetic"), fmt)
    assert forced_prompts == prover.forced_prompts([fmt.prompt_ids(TWO_STEP.question)], [thinking])  # one prefix


@pytest.mark.slow
def test_a_star_round_trains_epochs_passes_over_its_kept_traces(synthetic):
    """epochs = 3: one round (update) takes three optimizer steps on the kept set, the same
    parameters as three single-step applications of that batch; the schedule counts them."""
    from latro_jax.algorithms.mrt_star import Kept, StarRollout
    from latro_jax.job_config import parse
    fmt, examples = synthetic.fmt, synthetic.examples
    prompts = [fmt.prompt_ids(e.question) for e in examples]
    kept = [Kept(q, fmt.completion_ids(examples[q].rationale)) for q in (0, 2)]
    ro = StarRollout(prompts, kept, np.array([[1.0, 0.0]] * 4), [np.array([0.5])] * 8, np.ones(8))
    three = _learner(MrtStar(MrtStarConfig(rollout=GroupSampling(num_samples=2, sampling=SamplingParams(1.0)),
                                           keep_per_question=1, epochs=3), synthetic.ctx), synthetic)
    one = _learner(MrtStar(MrtStarConfig(rollout=GroupSampling(num_samples=2, sampling=SamplingParams(1.0)),
                                         keep_per_question=1, epochs=1), synthetic.ctx), synthetic)
    metrics = three.apply(three.algorithm.score(three.policies(), ro))
    losses = [one.apply(one.algorithm.score(one.policies(), ro))["loss"] for _ in range(3)]
    assert three.step == 3 and one.step == 3
    assert metrics["first_loss"] == pytest.approx(losses[0]) and metrics["loss"] == pytest.approx(losses[2])
    for k, v in models.param_arrays(three.model()).items():
        np.testing.assert_allclose(v, models.param_arrays(one.model())[k], atol=1e-6, err_msg=k)
    from configs.tiny import get_config
    config = get_config()
    config.stages = "mrt_star"
    config.mrt_star.epochs = 3
    assert parse(config).stages[0].stage.optim.total_steps == 3 * config.mrt_star.steps


def test_the_whole_thinking_is_ended_by_the_final_suffix(word, monkeypatch):
    """forcing.final_suffix (R1: "\\n</think>") ends a prefix that is the whole thinking; any
    shorter cut gets the suffix. Budgets 3 (a partial cut) and 100 (the whole thinking)."""
    from latro_jax import evaluate as ev
    thinking, forced_prompts = _script_two_step_trace(monkeypatch, word, " 9.")
    tok, fmt = word
    forcing = ForcingConfig(suffix=" The answer is", final_suffix=" Total:", samples=1,
                            sampling=SamplingParams(temperature=0.0))
    cfg = ev.EvalConfig(max_new_tokens=64, maj_k=0, forced_budgets=(3, 100), forcing=forcing)
    summary = ev.evaluate(None, get_task("synthetic"), [TWO_STEP], fmt, cfg, progress=False)
    prompt = fmt.prompt_ids(TWO_STEP.question)
    ends = [tok.decode(p[len(prompt):]) for p in forced_prompts]
    assert ends == [tok.decode(thinking[:3] + tok(" The answer is", add_special_tokens=False).input_ids),
                    tok.decode(thinking + tok(" Total:", add_special_tokens=False).input_ids)], ends
    assert summary["forced@3"] == summary["forced@100"] == 1.0  # "Total: 9." graded on the final suffix too


def test_sampled_traces_give_pass_at_1_and_per_problem_means_of_regret(word, monkeypatch):
    """traces = 2 (the analysis recipe's 16, smaller): per problem a sampled trace that answers at
    once and rightly ("The answer is 9.") and one with an episode "4+4=8." that answers wrongly;
    forced answers are scripted right only after that episode. pass@1 = 0.5; regret at 16 is the
    mean over the two traces: 1 (never right before answering) and L/32 (right from x = L, the
    episode's length) -- the greedy trace ("1+1=2. ...", never forced right) would give 1."""
    from latro_jax import evaluate as ev
    tok, fmt = word
    greedy = tok("1+1=2.", add_special_tokens=False).input_ids + fmt.answer_ids("The answer is 2.")
    episode = tok("4+4=8.", add_special_tokens=False).input_ids
    right, wrong = fmt.answer_ids("The answer is 9."), episode + fmt.answer_ids("The answer is 8.")

    def scripted(model, prompts, max_new_tokens, *, num_samples=1, **_):
        if max_new_tokens == 64:
            traces = [[greedy]] if num_samples == 1 else [[right, wrong]]
            return generated(traces)
        answers = [tok(" 9." if "4+4" in tok.decode(p).replace(" ", "") else " 1.", add_special_tokens=False).input_ids
                   + [fmt.end_id] for p in prompts]
        return generated([[a] for a in answers])

    monkeypatch.setattr(rollout.sampling, "generate", scripted)
    example = Example(id="q", question="Ann has 9 pens. How many pens?", gold="9")
    cfg = ev.EvalConfig(max_new_tokens=64, maj_k=0, traces=2, regret_cutoffs=(16,))
    summary = ev.evaluate(None, get_task("synthetic"), [example], fmt, cfg, progress=False)
    assert summary["greedy"] == 0.0 and summary["pass@1"] == 0.5
    assert summary["regret@16"] == pytest.approx((1.0 + len(episode) / 32) / 2)


def test_prefixes_longer_than_max_prefix_tokens_are_never_drawn(synthetic, monkeypatch):
    """A pi_old trace "2+3=5. 5+4=9. ..." of two episodes: without a cap, j in {0, 1} and some of
    16 questions get the first episode as prefix; with max_prefix_tokens shorter than that
    episode every prefix is empty (the cut is drawn among those that fit the prompt)."""
    tok, fmt = synthetic.tok, synthetic.fmt
    first = tok("2+3=5.", add_special_tokens=False).input_ids
    trace = first + tok(" 5+4=9.", add_special_tokens=False).input_ids + fmt.answer_ids("The answer is 9.")
    monkeypatch.setattr(rollout.sampling, "generate", lambda model, prompts, n,
                        **kw: generated([[trace] for _ in prompts]))
    prompts = [fmt.prompt_ids(synthetic.examples[0].question)] * 16
    for cap, drawn in ((0, {0, 1}), (len(first) - 1, {0})):
        algorithm = Mrt(MrtConfig(rollout=GroupSampling(num_samples=2, max_tokens=len(trace)),
                                  max_prefix_tokens=cap), synthetic.ctx)
        prefixes, counts = algorithm.prefixes(_learner(algorithm, synthetic).policies(), prompts,
                                              jax.random.key(0), jax.random.key(1))
        assert set(counts) == drawn and all(len(p) <= (cap or len(trace)) for p in prefixes)
