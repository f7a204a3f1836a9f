"""LoRA adapters (models/lora.py): the adapted forward against NumPy and transformers, the merged
and PEFT exports loaded by transformers / peft, what trains and what the reference is, and a
LoRA run resumed bit-exactly whose checkpoints hold the adapters and name their base."""

import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.numpy import load_file
import transformers
from flax import nnx

from configs.tiny import get_config
from hf_models import make_hf_model, torch_logits
from latro_jax import checkpoint, convert, job as jobs, models, run
from latro_jax.algorithms import Learner
from latro_jax.models import lora
from latro_jax.scoring import Scorer

CONFIG = lora.LoRAConfig(rank=4, alpha=8.0)


def _randomise_b(model, seed: int = 5, std: float = 0.1) -> None:
    """Give every adapter a random B (A is random from the start), so that each one matters."""
    flat = nnx.to_flat_state(nnx.state(model, lora.LoRAWeight))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    nnx.update(model, nnx.from_flat_state([
        (path, var.replace(var.get_value() + std * jax.random.normal(key, var.shape)) if str(path[-1]).endswith("_b")
         else var) for (path, var), key in zip(flat, keys)]))


def _host_adapters(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, lora.LoRAWeight))}


def test_the_adapted_mlp_is_base_plus_scaled_BA_and_zero_B_is_the_base_exactly(tmp_path):
    config = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    model = models.init_model(config, seed=0)
    tokens = np.random.RandomState(0).randint(0, 64, (2, 9)).astype(np.int32)
    base = np.asarray(model(tokens))
    lora.attach(model, CONFIG, seed=1)
    np.testing.assert_array_equal(np.asarray(model(tokens)), base)  # B = 0: the base, bit for bit
    _randomise_b(model)
    assert np.abs(np.asarray(model(tokens)) - base).max() > 1e-2
    mlp = model.unstack_layers()[1].mlp
    x = np.random.RandomState(1).randn(2, 5, 32).astype(np.float32)
    w = {k: np.asarray(v) for k, v in models.param_arrays(model).items()}
    a = _host_adapters(model)
    s = CONFIG.alpha / CONFIG.rank
    proj = lambda h, kernel, t: h @ kernel + s * (h @ a[f"layers/mlp/lora/{t}_a"][1]) @ a[f"layers/mlp/lora/{t}_b"][1]
    gate = proj(x, w["layers/mlp/gate_up_kernel"][1][:, 0], "gate")
    up = proj(x, w["layers/mlp/gate_up_kernel"][1][:, 1], "up")
    h = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), proj(h, w["layers/mlp/down_proj/kernel"][1], "down"),
                               rtol=1e-5, atol=1e-5)
    # the merged export at weights of a trained model's scale (initializer_range 0.02): to 1e-5
    merged = models.save_hf(model, str(tmp_path / "hf"))
    np.testing.assert_allclose(np.asarray(models.load_hf(merged)(tokens)), np.asarray(model(tokens)), atol=1e-5)


def _numpy_merged_state_dict(ref: torch.nn.Module, model, family: str) -> dict[str, torch.Tensor]:
    """The HF state dict of `ref` with every adapter of `model` folded in by NumPy:
    W[out, in] += (alpha / r) (A B)^T, on HF's own (fused, for Phi-3) weights."""
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    a, s, c = _host_adapters(model), CONFIG.alpha / CONFIG.rank, model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    rows = {"q": ("self_attn.q_proj", 0), "k": ("self_attn.k_proj", 0), "v": ("self_attn.v_proj", 0),
            "o": ("self_attn.o_proj", 0), "gate": ("mlp.gate_proj", 0), "up": ("mlp.up_proj", 0),
            "down": ("mlp.down_proj", 0)}
    if family == "phi3":
        rows.update(q=("self_attn.qkv_proj", 0), k=("self_attn.qkv_proj", q), v=("self_attn.qkv_proj", q + kv),
                    gate=("mlp.gate_up_proj", 0), up=("mlp.gate_up_proj", c.intermediate_size))
    for t, (module, start) in rows.items():
        group = "attn" if t in "qkvo" else "mlp"
        for i in range(c.num_layers):
            A, B = a[f"layers/{group}/lora/{t}_a"][i], a[f"layers/{group}/lora/{t}_b"][i]
            delta = s * (A @ B.reshape(B.shape[0], -1)).T
            weight = state[f"model.layers.{i}.{module}.weight"]
            weight[start:start + delta.shape[0]] += torch.from_numpy(delta)
    return state


@pytest.mark.parametrize("name", ["llama", "phi3_longrope"])
def test_adapted_model_matches_numpy_merge_and_its_merged_and_peft_exports_in_transformers(name, tmp_path):
    """Our adapted forward (adapters applied in the graph) against transformers on weights merged
    by NumPy; the merged HF export and the PEFT folder (peft on the base model) give the same
    logits. Phi-3's fused qkv_proj / gate_up_proj take the exact fused adapter."""
    from peft import PeftModel
    ref = make_hf_model(name, str(tmp_path / "base"))
    model = models.load_hf(str(tmp_path / "base"))
    lora.attach(model, CONFIG, seed=1)
    _randomise_b(model)
    tokens = np.random.RandomState(0).randint(0, 96, (2, 24)).astype(np.int32)
    ours = np.asarray(model(tokens))
    family = model.config.family
    merged_ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    merged_ref.load_state_dict(_numpy_merged_state_dict(ref, model, family))
    np.testing.assert_allclose(ours, torch_logits(merged_ref, tokens), atol=1e-4)
    merged = models.save_hf(model, str(tmp_path / "hf"))
    # W + sAB rounded once against xW + s(xA)B: fp32 rounding alone, measured up to 1.5e-5 on
    # these O(1) logits (the tiny models' weights are large: initializer_range 0.2)
    np.testing.assert_allclose(np.asarray(models.load_hf(merged)(tokens)), ours, rtol=1e-5, atol=3e-5)
    exported = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    np.testing.assert_allclose(ours, torch_logits(exported, tokens), atol=1e-4)
    folder = models.peft_io.save_peft(model, str(tmp_path / "peft"), str(tmp_path / "base"))
    adapter_config = json.load(open(os.path.join(folder, "adapter_config.json")))
    fused = {"qkv_proj", "gate_up_proj"} if family == "phi3" else set()
    assert set(adapter_config["rank_pattern"]) == fused
    peft_model = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval(), folder).eval()
    np.testing.assert_allclose(ours, torch_logits(peft_model, tokens), atol=1e-4)


def _lora_job(stages: str = "latro", **lora_config):
    config = get_config()
    config.stages = stages
    config.model.lora = dict(rank=4, alpha=8.0, **lora_config)
    return jobs.build(config)


def _live_bytes() -> int:
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays())


def test_only_adapters_train_and_the_reference_is_the_base_with_no_second_copy():
    """A LaTRO learner on a LoRA model: its train state and moments are the adapters' alone, the
    base's arrays are shared (live bytes grow by adapters, not by a weight copy), the reference
    scores exactly as the base model without adapters, before and after an update that moves
    B (A's gradient is zero while B = 0) and leaves the base as it was."""
    job = _lora_job()
    (stage,) = job.stages
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(job.model, nnx.Param)))
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(job.model, lora.LoRAWeight)))
    plain = models.model_from_arrays(job.model.config, models.param_arrays(job.model).__getitem__, mesh=job.mesh)
    before = _live_bytes()
    learner = Learner(stage.algorithm, job.model, stage.config.stage.optim)
    grown = _live_bytes() - before
    # the adapters, their two Adam moments and the reference's adapter copy; a frozen copy of the
    # base would add base_bytes (2.3 x the adapters of this tiny model at rank 4)
    assert grown <= 4 * adapter_bytes + 4096 < adapter_bytes + base_bytes, (grown, adapter_bytes, base_bytes)
    assert all(isinstance(v, lora.LoRAWeight) for _, v in nnx.to_flat_state(learner.state.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((learner.state.params, learner.state.opt_state)))
    assert state_bytes < 3.1 * adapter_bytes  # the adapters and their two Adam moments
    rows = {"tokens": np.random.RandomState(0).randint(1, job.model.config.vocab_size, (8, 20)).astype(np.int32),
            "valid": np.ones((8, 20), bool)}
    policies = learner.policies()
    plain_scorer = Scorer(nnx.split(plain)[0], plain.config, mesh=job.mesh)
    base_logp = np.asarray(plain_scorer.token_logprobs(nnx.state(plain), rows))
    np.testing.assert_array_equal(np.asarray(policies.scorer.token_logprobs(policies.reference, rows)), base_logp)
    base_before, adapters_before = models.param_arrays(job.model), _host_adapters(learner.model())
    learner.update(stage.examples[:stage.config.stage.batch_size], run.rollout_key(0, "latro", 0))
    after = learner.policies()
    np.testing.assert_array_equal(np.asarray(after.scorer.token_logprobs(after.reference, rows)), base_logp)
    assert np.abs(np.asarray(after.scorer.token_logprobs(after.params, rows)) - base_logp).max() > 1e-6
    for name, array in models.param_arrays(learner.model()).items():
        np.testing.assert_array_equal(array, base_before[name], err_msg=name)
    adapters_after = _host_adapters(learner.model())
    for name, array in adapters_after.items():
        moved = np.abs(array - adapters_before[name]).max()
        assert (moved > 0) if name.endswith("_b") else (moved == 0), name


@pytest.mark.slow
def test_a_lora_run_resumes_bit_exactly_and_its_checkpoints_hold_adapters_naming_their_base(tmp_path):
    """Four LaTRO updates with LoRA in one go, and two then resumed to four: the same adapters bit
    for bit. A checkpoint's params item holds the adapters only, its config the base (here the
    init seed) with its checksums; restore_model rebuilds the adapted model from them (what
    --mode=export reads) and refuses a base whose weights differ. The run exports the merged
    model and the PEFT folder."""
    def train(workdir, steps, **extra):
        config = get_config()
        config.stages = "latro"
        config.model.lora = dict(rank=4, alpha=8.0)
        config.latro.steps = steps
        config.eval.update(every=0, limit=2)
        config.export.peft = True
        return run.train(jobs.build(config), str(workdir), **extra)

    train(tmp_path / "whole", 4)
    train(tmp_path / "run", 2)
    train(tmp_path / "run", 4, allow_config_change=True)
    whole = checkpoint.restore_model(str(tmp_path / "whole" / "checkpoints" / "latro"))
    resumed = checkpoint.restore_model(str(tmp_path / "run" / "checkpoints" / "latro"))
    expected, got = _host_adapters(whole), _host_adapters(resumed)
    assert expected and set(expected) == set(got)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert max(np.abs(v).max() for k, v in expected.items() if k.endswith("_b")) > 0  # B trained
    step_dir = tmp_path / "whole" / "checkpoints" / "latro" / "4"
    record = json.load(open(step_dir / "model_config" / "metadata"))[checkpoint.LORA_KEY]
    assert record["rank"] == 4 and record["base"]["path"] == "" and record["base"]["seed"] == 0
    with checkpoint.manager(str(step_dir.parent), create=False) as mngr:
        saved = mngr.restore(4, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    names = ["/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
    assert sorted(names) == sorted(expected)  # the adapters alone: no base weight
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "whole" / "hf")).eval()
    np.testing.assert_allclose(np.asarray(whole(tokens)), torch_logits(hf, tokens), atol=1e-5)
    assert os.path.isfile(tmp_path / "whole" / "peft" / "adapter_model.safetensors")
    ckpt = str(tmp_path / "whole" / "checkpoints" / "latro")  # the converter writes the same two folders
    convert.orbax_to_hf(ckpt, str(tmp_path / "hf2"), peft_out=str(tmp_path / "peft2"))
    for folder, name in (("hf", "model.safetensors"), ("peft", "adapter_model.safetensors")):
        ours, theirs = load_file(str(tmp_path / "whole" / folder / name)), load_file(str(tmp_path / f"{folder}2" / name))
        assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours), folder
    checkpoint.save_model(str(tmp_path / "plain"), models.load_hf(str(tmp_path / "whole" / "hf")))
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        convert.orbax_to_hf(str(tmp_path / "plain"), str(tmp_path / "hf3"), peft_out=str(tmp_path / "p3"))
    assert not os.path.exists(tmp_path / "hf3") and not os.path.exists(tmp_path / "p3")
    record["base"]["seed"] = 1
    meta_path = step_dir / "model_config" / "metadata"
    meta = json.load(open(meta_path))
    meta[checkpoint.LORA_KEY] = record
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="other base weights"):
        checkpoint.restore_model(str(tmp_path / "whole" / "checkpoints" / "latro"))


def test_lora_config_is_checked():
    for bad, match in [(dict(rank=-1), "rank=-1"), (dict(rank=4, targets=("q", "qq")), "targets"),
                       (dict(rank=4, alpha=0.0), "alpha")]:
        config = get_config()
        config.model.lora = bad
        with pytest.raises(jobs.ConfigError, match=match):
            jobs.build(config, load_model=False)
    config = get_config()
    config.export.peft = True
    with pytest.raises(jobs.ConfigError, match="export.peft"):
        jobs.build(config, load_model=False)
