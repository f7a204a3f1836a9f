"""Logit parity of latro_jax models against transformers (torch, CPU, float32)."""

import numpy as np
import pytest
import transformers

from hf_models import FAMILY_CONFIGS, STORIES_HF, make_hf_model, torch_logits
from latro_jax import models

TOL = 1e-4


def _ours(model, tokens, valid=None):
    return np.asarray(model(tokens, valid=valid))


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_family_logits_match_transformers(name, tmp_path):
    ref = make_hf_model(name, str(tmp_path))
    model = models.load_hf(str(tmp_path))
    tokens = np.random.RandomState(0).randint(0, 96, (2, 24)).astype(np.int32)
    diff = np.abs(_ours(model, tokens) - torch_logits(ref, tokens)).max()
    assert diff <= TOL, f"{name}: max |dlogits| = {diff}"


@pytest.mark.slow
def test_phi3_longrope_short_and_long_sequences(tmp_path):
    """Below original_max_position_embeddings (32) the short factors apply, above it the long
    ones and the attention factor; both must match transformers."""
    ref = make_hf_model("phi3_longrope", str(tmp_path))
    model = models.load_hf(str(tmp_path))
    rng = np.random.RandomState(1)
    for length in (20, 32, 33, 90):
        tokens = rng.randint(0, 96, (2, length)).astype(np.int32)
        diff = np.abs(_ours(model, tokens) - torch_logits(ref, tokens)).max()
        assert diff <= TOL, f"length {length}: max |dlogits| = {diff}"


def test_left_padding_matches_transformers_attention_mask(tmp_path):
    ref = make_hf_model("llama", str(tmp_path))
    model = models.load_hf(str(tmp_path))
    tokens = np.random.RandomState(2).randint(3, 96, (3, 16)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0
    mask[2, :11] = 0
    tokens[mask == 0] = 0
    ours = _ours(model, tokens, valid=mask.astype(bool))
    theirs = torch_logits(ref, tokens, attention_mask=mask)
    diff = np.abs(ours - theirs)[mask == 1].max()
    assert diff <= TOL


@pytest.mark.slow
def test_stories260k_logits_match_transformers():
    ref = transformers.AutoModelForCausalLM.from_pretrained(STORIES_HF).eval()
    model = models.load_hf(STORIES_HF)
    tokens = np.random.RandomState(0).randint(0, 512, (2, 64)).astype(np.int32)
    diff = np.abs(_ours(model, tokens) - torch_logits(ref, tokens)).max()
    assert diff <= TOL, diff


def test_bf16_compute_close_to_fp32():
    """bf16 compute with fp32 parameters stays close to fp32 logits. Measured on stories260K:
    max |dlogits| / max |logits| = 0.014, greedy-token agreement 97.7% (transformers in bf16:
    0.015 and 98.4% against its fp32)."""
    fp32 = models.load_hf(STORIES_HF, dtype="float32")
    bf16 = models.load_hf(STORIES_HF, dtype="bfloat16", param_dtype="float32")
    tokens = np.random.RandomState(0).randint(0, 512, (2, 64)).astype(np.int32)
    a, b = _ours(fp32, tokens), _ours(bf16, tokens)
    assert b.dtype == np.float32
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel < 0.03, rel
    # The argmax (greedy token) agrees almost everywhere.
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_gradients_of_no_remat(tmp_path, remat):
    """Rematerialisation recomputes the forward pass inside the backward one: the gradients of
    a token log-likelihood must equal those without it (forward values cannot tell)."""
    import jax
    from flax import nnx
    from latro_jax import logprobs
    make_hf_model("qwen2_tied", str(tmp_path))
    tokens = np.random.RandomState(0).randint(0, 96, (2, 12)).astype(np.int32)
    valid = np.ones_like(tokens, bool)

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: logprobs.token_logprobs(nnx.merge(graphdef, p), tokens, valid, chunk_size=5).sum()
        return jax.tree.leaves(jax.grad(loss)(params))

    plain, rematted = grads(models.load_hf(str(tmp_path))), grads(models.load_hf(str(tmp_path), remat=remat))
    assert max(float(np.abs(g).max()) for g in plain) > 1e-2
    for g, h in zip(plain, rematted):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=3e-5)  # measured: 9e-6 (summation order)


def test_split_of_fused_matmul_outputs_has_the_slices_gradient():
    """transformer.split (q/k/v and gate/up out of their fused matmuls) concatenates the pieces'
    gradients where slicing would pad and add them: the same numbers, bitwise, pieces in order."""
    import jax
    import jax.numpy as jnp
    from latro_jax.models import transformer
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 3, 6, 4), jnp.float32)
    cotangents = tuple(jnp.asarray(rng.randn(2, 3, n, 4), jnp.float32) for n in (4, 1, 1))
    pieces, vjp = jax.vjp(lambda x: transformer.split(x, 2, (4, 1, 1)), x)
    sliced, vjp_sliced = jax.vjp(lambda x: (x[:, :, :4], x[:, :, 4:5], x[:, :, 5:]), x)
    for a, b in zip(pieces, sliced):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(vjp(cotangents)[0], vjp_sliced(cotangents)[0])
    np.testing.assert_array_equal(vjp(cotangents)[0][:, :, 5], cotangents[2][:, :, 0])


def test_bf16_parameters_are_stored_in_bf16_and_compute_as_transformers_on_rounded_weights(tmp_path):
    """param_dtype="bfloat16" stores every parameter in bf16; with float32 compute the logits
    equal transformers' float32 model whose weights were rounded to bf16."""
    import torch
    ref = make_hf_model("llama3_rope", str(tmp_path))
    model = models.load_hf(str(tmp_path), dtype="float32", param_dtype="bfloat16")
    assert {str(v.dtype) for v in models.param_arrays(model).values()} == {"bfloat16"}
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    tokens = np.random.RandomState(0).randint(0, 96, (2, 24)).astype(np.int32)
    rounded = torch_logits(ref, tokens)
    assert np.abs(_ours(model, tokens) - rounded).max() <= TOL
    unrounded = torch_logits(make_hf_model("llama3_rope", str(tmp_path / "again")), tokens)
    assert np.abs(rounded - unrounded).max() > 100 * TOL  # the rounding is visible


@pytest.mark.slow
def test_sharded_load_on_8_device_mesh_matches_single_device():
    from latro_jax import sharding
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    single = models.load_hf(STORIES_HF)
    sharded = models.load_hf(STORIES_HF, mesh=mesh)
    kernel = sharded.layers.attn.qkv_kernel[...]
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor", None, None)
    assert len(kernel.addressable_shards) == 8
    tokens = np.random.RandomState(0).randint(0, 512, (4, 32)).astype(np.int32)
    np.testing.assert_allclose(_ours(sharded, tokens), _ours(single, tokens), atol=TOL)


@pytest.mark.slow
def test_fsdp_keeps_rows_split_and_gathers_weights():
    """Under an fsdp mesh the compiled log-likelihood (forward + backward) runs each chip's own
    rows through every matmul, the weights all-gathered: no matmul over all rows (which is what
    XLA chose when it sharded activations by the hidden axis the fsdp-sharded weights contract
    over: every chip then held every row and all-reduced it after each matmul)."""
    import re
    import jax
    from flax import nnx
    from latro_jax import logprobs, sharding
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    model = models.init_model(models.ModelConfig(
        family="llama", vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, bos_token_id=1, eos_token_id=(2,)), mesh=mesh, dtype="bfloat16", remat="full")
    graphdef, params = nnx.split(model)
    rows, width = 8, 96
    tokens, valid = (sharding.put_global(np.ones((rows, width), dtype), sharding.batch_sharding(mesh))
                     for dtype in (np.int32, bool))
    loss = lambda p: logprobs.token_logprobs(nnx.merge(graphdef, p), tokens, valid, chunk_size=32).sum()
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    dots = [list(map(int, m.split(","))) for m in re.findall(r"= \w+\[([\d,]+)\]\S* dot\(", hlo)]
    assert "all-gather(" in hlo and any(rows * width // 8 in d for d in dots), dots  # a chip's own tokens
    assert not any(rows * width in d for d in dots), dots  # no matmul over every row's tokens


@pytest.mark.slow
def test_attention_by_query_chunks_matches_transformers_and_whole_row_attention(tmp_path):
    """set_query_chunk(5) (attention 5 query positions at a time, the last chunk padded) on a
    sliding-window model (each chunk's mask must keep the window) with left padding: logits
    against transformers; under remat, the token log-likelihood's gradients equal whole-row
    attention's; the shared-prefix pass (chunk 4) equals the plain one; the sampler (its
    prefill chunked, its one-token decode steps not) draws the same tokens."""
    import jax
    from flax import nnx
    from latro_jax import logprobs, sampling
    from latro_jax.sampling import SamplingParams
    ref = make_hf_model("mistral_window", str(tmp_path))
    plain, chunked = models.load_hf(str(tmp_path), remat="full"), models.load_hf(str(tmp_path), remat="full")
    chunked.set_query_chunk(5)
    rng = np.random.RandomState(3)
    tokens = rng.randint(3, 96, (3, 23)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :6] = 0
    tokens[mask == 0] = 0
    ours = _ours(chunked, tokens, valid=mask.astype(bool))
    assert np.abs(ours - torch_logits(ref, tokens, attention_mask=mask))[mask == 1].max() <= TOL

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: logprobs.token_logprobs(nnx.merge(graphdef, p), tokens, mask.astype(bool), chunk_size=7).sum()
        return jax.tree.leaves(jax.grad(loss)(params))

    for g, h in zip(grads(plain), grads(chunked)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=3e-5)
    shared = np.concatenate([np.repeat(tokens[:2, :9], 2, axis=0), rng.randint(3, 96, (4, 14))], axis=1)
    chunked.set_query_chunk(4)
    prefix, own = chunked.shared_prefix_hidden_states(shared, np.ones_like(shared, bool), width=9, group=2)
    whole, _ = plain.hidden_states(shared)
    np.testing.assert_allclose(own, whole[:, 9:], atol=2e-5)
    np.testing.assert_allclose(prefix, whole[::2, :9], atol=2e-5)
    prompts = [tokens[0, :13].tolist(), tokens[2, :7].tolist()]
    kw = dict(sampling=SamplingParams(1.0), num_samples=2, seed=2)
    np.testing.assert_array_equal(sampling.generate(plain, prompts, 10, **kw).token_array,
                                  sampling.generate(chunked, prompts, 10, **kw).token_array)
