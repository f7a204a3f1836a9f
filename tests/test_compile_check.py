"""latro_jax.compile_check: one update of the tiny model compiled for a TPU topology by libtpu's
compiler (no TPU), its figures against the model's arithmetic and the mesh's split.

Needs libtpu, which the test environment does not install (in the same environment every jax
process would print libtpu's initialisation warnings on stderr): these tests skip without it.
Run them with `pip install "jax[tpu]==0.10.2"` in a separate virtual environment, e.g.
    python -m venv --system-site-packages /tmp/tpuenv && /tmp/tpuenv/bin/pip install "jax[tpu]==0.10.2"
    JAX_PLATFORMS=cpu /tmp/tpuenv/bin/python -m pytest -q tests/test_compile_check.py
"""

import math

import pytest

pytest.importorskip("libtpu", reason='the TPU compiler comes with libtpu: pip install "jax[tpu]==0.10.2" '
                                     "(in a separate environment; see this module's docstring)")

from configs.tiny import get_config  # noqa: E402
from latro_jax import compile_check as cc, job as jobs, sampling  # noqa: E402
from latro_jax.models.build import param_shapes  # noqa: E402
from latro_jax.update_plan import Lengths  # noqa: E402

LAYERS, TOPOLOGY = 4, "v5e:2x4"
LENGTHS = Lengths(prompt=20, answer=8, rationale=30)


def _config(**mesh):
    config = get_config()
    config.stages = "latro"
    config.model.init.num_layers = LAYERS
    config.mesh.update(**(mesh or dict(data=2, fsdp=4, tensor=1)))
    return config


@pytest.fixture(scope="module")
def checked():
    """(programs by name, the stage's report, the model config) of LaTRO's update on 2 x 4 chips."""
    [(programs, report)] = cc.check(_config(), TOPOLOGY, lengths=LENGTHS, say=lambda _: None)
    job = jobs.build(_config(), load_model=False)
    return {p.name: p for p in programs}, report, jobs.init_model_config(job.config, len(job.tokenizer), job.fmt)


def test_every_program_of_the_update_compiles_for_the_topology(checked):
    programs, report, _ = checked
    assert list(programs) == ["generate:rationales", "prefill:rationales", "decode:rationales", "score:reference",
                              "step"]
    assert not any(p.refused for p in programs.values()) and report.fits
    assert programs["decode:rationales"].repeat == 12 and programs["step"].calls == 1
    assert all(p.total_bytes > 0 and p.flops > 0 for p in programs.values())


def test_parameters_are_split_over_fsdp_not_replicated(checked):
    """Bytes per chip of one parameter copy = the matrices' bytes / fsdp plus the norm scales
    (replicated by design), counted from the model's shapes."""
    _, report, config = checked
    shapes = param_shapes(config)
    split = sum(math.prod(s) * 4 for name, s in shapes.items() if not name.endswith("scale")) / 4
    replicated = sum(math.prod(s) * 4 for name, s in shapes.items() if name.endswith("scale"))
    assert report.state.params == pytest.approx(split + replicated, rel=1e-6)
    assert report.state.optimizer == pytest.approx(2 * (split + replicated), rel=1e-3)  # Adam's two moments
    assert report.state.copies == 1  # the reference


def test_costs_are_the_models_arithmetic(checked):
    """FLOPs per chip of the sampler's programs against 2 x (matmul parameters) per token plus
    attention's 4 x heads x head_dim x key slots, for the rows one chip holds, with at most 20% on
    top for the elementwise work (norms, rotary, softmax, SiLU): the extrapolation from 1- and
    2-layer compiles must land on the 4-layer model's figures."""
    programs, _, c = checked
    per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * \
        c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    head = c.hidden_size * c.vocab_size
    decode, prefill = programs["decode:rationales"], programs["prefill:rationales"]
    slots = sampling.bucket(20) + sampling.bucket(12) + sampling.bucket(1 + 8)  # prompt, generation, answer slots
    rows = 8 * 4 // 8  # 2 questions padded to 8 prompts x K = 4, over 8 chips
    attention = lambda queries: 4 * c.num_heads * c.head_dim * queries * slots * LAYERS
    want_decode = rows * (2 * (LAYERS * per_layer + head)) + attention(rows)
    assert want_decode <= decode.flops <= 1.2 * want_decode
    prompts = 1  # 8 prompts over 8 chips
    want_prefill = prompts * 20 * 2 * LAYERS * per_layer + 2 * head * prompts + attention(prompts * 20)
    assert want_prefill <= prefill.flops <= 1.2 * want_prefill
    step = programs["step"]  # forward + backward of one row per chip, at least 3 forwards
    assert step.flops > 3 * 2 * 44 * LAYERS * per_layer


def test_hlo_collectives_are_counted_by_kind_and_bytes():
    hlo = """
  %all-gather.1 = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p), replica_groups={{0,1,2,3}}, dimensions={0}
  %ar = f32[16]{0} all-reduce(f32[16]{0} %x), replica_groups={}, to_apply=%add
  %ars = (f32[4]{0}, f32[2,2]{1,0}) all-reduce-start(f32[4]{0} %a, f32[2,2]{1,0} %b), to_apply=%add
  %ard = (f32[4]{0}, f32[2,2]{1,0}) all-reduce-done((f32[4]{0}, f32[2,2]{1,0}) %ars)
  %cp = s32[3]{0} collective-permute(s32[3]{0} %y), source_target_pairs={{0,1}}
  %add.3 = f32[16]{0} add(f32[16]{0} %ar, f32[16]{0} %ar)
"""
    assert cc.collectives(hlo) == {"all-gather": [1, 8 * 128 * 2], "all-reduce": [2, 16 * 4 + 8 * 4],
                                   "collective-permute": [1, 12]}


def test_a_mesh_the_topology_cannot_hold_is_one_clear_error():
    with pytest.raises(cc.CheckError, match=r"v4:2x2x1 \(4 devices\).*--config.mesh.fsdp=4"):
        cc.check(_config(data=1, fsdp=8, tensor=1), "v4:2x2x1", lengths=LENGTHS, say=lambda _: None)
    with pytest.raises(cc.CheckError, match="<chip>:<shape>"):
        cc.topology_devices("v9z:3x3")


def test_a_program_too_large_for_hbm_is_reported_not_raised():
    """A rollout whose KV cache cannot fit a v5e chip's 16 GB: the generate program is refused by
    XLA and reported with the temporaries it needed; the stage does not fit."""
    config = _config()
    config.model.init.update(hidden_size=1024, intermediate_size=2048, num_heads=16, num_kv_heads=16, head_dim=64,
                             max_position_embeddings=8192)
    config.latro.update(batch_size=64, num_samples=16, max_rationale_tokens=4000)
    [(programs, report)] = cc.check(config, TOPOLOGY, lengths=LENGTHS, say=lambda _: None)
    refused = {p.name: p for p in programs if p.refused}
    assert "generate:rationales" in refused and "RESOURCE_EXHAUSTED" in refused["generate:rationales"].refused
    assert refused["generate:rationales"].temp_bytes > 16e9 and not report.fits
    # the float32 cache alone: 1024 rows x 4096+ slots x 4 layers x (k, v) x 16 heads x 64, over 8 chips
    cache = 1024 * (20 + 4096) * LAYERS * 2 * 16 * 64 * 4 / 8
    assert refused["generate:rationales"].temp_bytes > cache
    # the fix the check names: the sampler in calls of 128 rows (8 questions x K) compiles one such
    # call (its bfloat16 cache 1/16 of the one above, held about twice while the prompts' cache
    # is repeated K times), run 8 times; with bfloat16 compute the frozen reference is a
    # bfloat16 copy (half the parameters' bytes)
    config.latro.sample_rows_per_call = 128
    config.model.dtype = "bfloat16"
    [(programs, report)] = cc.check(config, TOPOLOGY, lengths=LENGTHS, say=lambda _: None)
    generate = {p.name: p for p in programs}["generate:rationales"]
    assert not generate.refused and generate.calls == 8 and generate.shapes.startswith("8 prompts")
    assert cache / 16 < generate.temp_bytes < cache / 4
    assert report.state.copy * 2 == report.state.params
