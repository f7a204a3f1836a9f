"""The sampler against transformers generate, the definitions of temperature / top-k / top-p,
teacher-forced log-probabilities, stops, shared prefill, static shapes and meshes."""

import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from hf_models import FAMILY_CONFIGS, STORIES_HF, make_hf_model
from latro_jax import models, sampling, sharding
from latro_jax.sampling import SamplingParams
from latro_jax.stops import Stops


@pytest.fixture(scope="module")
def stories():
    return models.load_hf(STORIES_HF)


def _hf_greedy(model, prompts, max_new, pad_id=0, eos=None):
    """transformers generate(do_sample=False) on left-padded ragged prompts."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=pad_id)
    return out[:, width:].tolist()


@pytest.mark.slow
def test_greedy_200_tokens_from_bos_match_transformers(stories):
    ref = transformers.AutoModelForCausalLM.from_pretrained(STORIES_HF).eval()
    expected = _hf_greedy(ref, [[1]], 200, eos=None)[0]
    out = sampling.generate(stories, [[1]], 200)
    assert out.tokens[0][0] == expected
    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    assert tok.decode(out.tokens[0][0]).startswith("Once upon a time, there was a little girl named Lily.")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_greedy_ragged_batch_matches_transformers(name, tmp_path):
    """Ragged prompts in one batch give, row by row, what transformers generates for each
    prompt alone (Phi-3's longrope switch happens inside the 40 new tokens)."""
    ref = make_hf_model(name, str(tmp_path))
    model = models.load_hf(str(tmp_path))
    rng = np.random.RandomState(4)
    prompts = [rng.randint(3, 96, n).tolist() for n in (5, 19, 1, 12)]
    out = sampling.generate(model, prompts, 40, stops=Stops((2,)))
    for i, prompt in enumerate(prompts):
        expected = _hf_greedy(ref, [prompt], 40, eos=2)[0]
        assert out.tokens[i][0] == expected, f"prompt {i}"
        assert out.finished[i] == (expected[-1] == 2)


def _reference_keep(logits, top_k, top_p):
    """NumPy reference: which tokens each filter keeps, straight from the definitions."""
    keep = np.ones_like(logits, bool)
    if top_k:
        kth = np.sort(logits)[-top_k]
        keep &= logits >= kth
    if top_p < 1:
        masked = np.where(keep, logits, -np.inf)
        probs = np.exp(masked - masked.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        kept = order[mass_before < top_p]
        top = np.zeros_like(keep)
        top[kept] = True
        keep &= top
    return keep


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (7, 0.8), (1, 1.0), (0, 0.01)])
def test_top_k_top_p_keep_exactly_their_definition(top_k, top_p):
    logits = np.random.RandomState(top_k).randn(6, 50).astype(np.float32) * 3
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    got = np.isfinite(np.asarray(sampling.process_logits(logits, params)))
    for row in range(6):
        np.testing.assert_array_equal(got[row], _reference_keep(logits[row] / 0.7, top_k, top_p))


def _tiny_vocab_model():
    config = models.ModelConfig(family="llama", vocab_size=12, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                initializer_range=0.5)
    return models.init_model(config, seed=3)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.3, 4, 1.0),
                                                     (1.0, 0, 0.7)])
@pytest.mark.slow
def test_sampled_frequencies_match_the_sampling_distribution(temperature, top_k, top_p):
    """Chi-square goodness of fit of 8000 first tokens against the NumPy definition: softmax of
    logits / T over the tokens top-k and top-p keep (_reference_keep)."""
    model = _tiny_vocab_model()
    prompt = [3, 7, 1]
    logits = np.asarray(model(np.array([prompt], np.int32)))[0, -1].astype(np.float64) / temperature
    keep = _reference_keep(logits, top_k, top_p)
    probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    out = sampling.generate(model, [prompt], 1, sampling=SamplingParams(temperature, top_k, top_p),
                            num_samples=8000, seed=11)
    draws = out.token_array[:, 0]
    counts = np.bincount(draws, minlength=12)
    assert counts[~keep].sum() == 0  # filtered tokens never appear
    support = probs > 0
    stat, p = scipy.stats.chisquare(counts[support], 8000 * probs[support])
    assert p > 1e-3, (stat, p, counts, probs)
    # log-probabilities are those of the sampling distribution
    np.testing.assert_allclose(out.logprob_array[:, 0], np.log(probs[draws]), atol=1e-5)


@pytest.mark.slow
def test_logprobs_equal_teacher_forced_forward_pass(stories):
    prompts = [[1, 403, 407, 261, 300], [1, 67]]
    out = sampling.generate(stories, prompts, 30, sampling=SamplingParams(0.8), num_samples=2, seed=5)
    for i, prompt in enumerate(prompts):
        for k in range(2):
            gen = out.tokens[i][k]
            seq = np.array([prompt + gen], np.int32)
            logits = np.asarray(stories(seq))[0] / 0.8
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            expected = [logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(gen)]
            np.testing.assert_allclose(out.logprobs[i][k], expected, atol=2e-4)


@pytest.mark.slow
def test_shared_prefill_equals_k_copies_of_the_prompt(stories):
    prompts = [[1, 403, 407], [1, 67, 89, 12, 40]]
    shared = sampling.generate(stories, prompts, 24, sampling=SamplingParams(1.0), num_samples=3, seed=9)
    copies = sampling.generate(stories, [p for p in prompts for _ in range(3)], 24,
                               sampling=SamplingParams(1.0), num_samples=1, seed=9)
    np.testing.assert_array_equal(shared.token_array, copies.token_array)
    np.testing.assert_allclose(shared.logprob_array, copies.logprob_array, atol=1e-4)
    # and the samples of one prompt differ from each other
    assert len({tuple(s) for s in shared.tokens[0]}) > 1


@pytest.mark.slow
def test_stop_ids_and_stop_sequences_cut_rows_at_the_right_place(stories):
    prompt = [1, 403, 407, 261]
    free = sampling.generate(stories, [prompt], 60).tokens[0][0]
    stop_id = free[10]
    first = free.index(stop_id)
    out = sampling.generate(stories, [prompt], 60, stops=Stops((stop_id,)))
    assert out.tokens[0][0] == free[:first + 1]
    assert out.finished[0] and out.lengths[0] == first + 1
    assert (out.token_array[0, first + 1:] == 0).all() and (out.logprob_array[0, first + 1:] == 0).all()

    seq = free[20:23]
    end = next(j + 3 for j in range(len(free)) if free[j:j + 3] == seq)
    out = sampling.generate(stories, [prompt], 60, stops=Stops(phrases=(tuple(seq), (511, 510))))
    assert out.tokens[0][0] == free[:end] and out.finished[0]

    out = sampling.generate(stories, [prompt], 60, stops=Stops((free[0],)))
    assert out.tokens[0][0] == free[:1]  # stop at the first token
    out = sampling.generate(stories, [prompt], 60, stops=Stops((511,)))
    assert out.tokens[0][0] == free and not out.finished[0]


@pytest.mark.slow
def test_rows_stop_independently_and_finished_rows_do_not_change(stories):
    prompts = [[1, 403, 407, 261], [1, 67, 89]]
    free = sampling.generate(stories, prompts, 50)
    stop = free.tokens[0][0][5]
    out = sampling.generate(stories, prompts, 50, stops=Stops((stop,)))
    for i in range(2):
        f = free.tokens[i][0]
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert out.tokens[i][0] == f[:cut]


@pytest.mark.slow
def test_no_recompilation_within_a_prompt_bucket(stories):
    rng = np.random.RandomState(0)
    make = lambda n: [rng.randint(3, 500, n).tolist() for _ in range(3)]
    assert [sampling.bucket(n) for n in (33, 40, 41, 72, 129, 500)] == [40, 40, 48, 80, 160, 512]
    sampling.generate(stories, make(35), 16, sampling=SamplingParams(1.0), num_samples=2)
    before = sampling._generate_core._cache_size()
    for n in (33, 38, 40):  # same 40-token prompt bucket, same batch bucket
        sampling.generate(stories, make(n), 16, sampling=SamplingParams(1.0), num_samples=2, seed=n)
    sampling.generate(stories, make(36), 15, sampling=SamplingParams(1.0), num_samples=2)  # same 16-token generation bucket
    assert sampling._generate_core._cache_size() == before


@pytest.mark.slow
def test_a_fixed_prompt_width_serves_every_shorter_prompt_and_changes_no_draw(stories):
    """A stage's prompt width (its longest prompt, rounded up to 16 columns) is every call's
    prompt columns, whatever the call's own longest; a longer prompt gets its bucket. Padding
    the prompts further leaves the draws and their log-probs as they were."""
    assert [sampling.prompt_columns(n, w) for n, w in ((201, 201), (100, 160), (250, 160), (30, 0), (20, 20))] \
        == [208, 160, 256, 32, 20]
    prompts = [[1, 403, 407, 261, 5, 9], [1, 67, 89], [1, 300]]
    kw = dict(sampling=SamplingParams(1.0), num_samples=2, seed=4)
    plain = sampling.generate(stories, prompts, 24, **kw)
    wide = sampling.generate(stories, prompts, 24, prompt_width=70, **kw)
    assert (plain.prompt_width, wide.prompt_width) == (16, 80)
    np.testing.assert_array_equal(plain.token_array, wide.token_array)
    np.testing.assert_allclose(plain.logprob_array, wide.logprob_array, atol=1e-5)


@pytest.mark.slow
def test_eight_device_mesh_gives_the_same_tokens_as_one_device(stories):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = models.load_hf(STORIES_HF, mesh=mesh)
    prompts = [[1, 403, 407, 261], [1, 67, 89], [1, 300]]
    for kw in (dict(), dict(sampling=SamplingParams(1.0), num_samples=2, seed=3)):
        one = sampling.generate(stories, prompts, 40, **kw)
        many = sampling.generate(sharded, prompts, 40, mesh=mesh, **kw)
        np.testing.assert_array_equal(one.token_array, many.token_array)
        np.testing.assert_allclose(one.logprob_array, many.logprob_array, atol=1e-4)


@pytest.mark.slow
def test_rows_per_call_draws_one_calls_samples_in_calls_of_one_shape(stories, monkeypatch):
    """generate(rows_per_call=R) runs R // K prompts per call (at least one), each call padded to
    the same shape (the last too), and draws what one call draws (row-keyed); it refuses to keep
    a cache (reserve_slots) that no call holds whole."""
    prompts = [[1, 403 + i, 7 * i + 3][:2 + i % 2] for i in range(10)]
    shapes, core = [], sampling._generate_core

    def spy(graphdef, state, prompts, *args, **kw):
        shapes.append(prompts.shape[0])
        return core(graphdef, state, prompts, *args, **kw)

    monkeypatch.setattr(sampling, "_generate_core", spy)
    for samples, rows, calls in ((1, 0, [16]), (1, 9, [16, 16]), (3, 2, [8] * 10), (3, 12, [8] * 3)):
        kw = dict(sampling=SamplingParams(1.0), num_samples=samples, seed=4)
        one = sampling.generate(stories, prompts, 12, **kw)
        shapes.clear()
        split = sampling.generate(stories, prompts, 12, rows_per_call=rows, **kw)
        assert shapes == calls, (samples, rows)
        np.testing.assert_array_equal(one.token_array, split.token_array)
        np.testing.assert_array_equal(one.finished, split.finished)
        np.testing.assert_allclose(one.logprob_array, split.logprob_array, atol=1e-5)
    with pytest.raises(ValueError, match="reserve_slots.*rows_per_call"):
        sampling.generate(stories, prompts, 4, rows_per_call=5, reserve_slots=4)


@pytest.mark.slow
def test_progress_bar_does_not_change_results(stories, capsys):
    a = sampling.generate(stories, [[1, 403]], 20, sampling=SamplingParams(1.0), seed=1)
    b = sampling.generate(stories, [[1, 403]], 20, sampling=SamplingParams(1.0), seed=1, progress=True)
    assert a.tokens == b.tokens
    assert "generate" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(num_samples=0), "num_samples"), (dict(max_new_tokens=0), "max_new_tokens")])
def test_bad_arguments_are_refused(stories, kwargs, match):
    sampler = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p") if k in kwargs}
    kw = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        sampling.generate(stories, [[1]], sampling=SamplingParams(**sampler), **kw)
