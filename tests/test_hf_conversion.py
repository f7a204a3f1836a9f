"""Two-way HF conversion: bit-identical round trips, exports transformers can load, Orbax
checkpoints in between, sharded files, and clear errors on bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from hf_models import STORIES_HF, make_hf_model, torch_logits
from latro_jax import convert, models
from latro_jax.models import hf_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def _assert_same_tensors(original_dir, exported_dir, tied=False):
    a, b = _hf_tensors(original_dir), _hf_tensors(exported_dir)
    if tied:  # an explicit copy of a tied embedding is not written back
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _params_equal(m1, m2):
    p1, p2 = models.param_arrays(m1), models.param_arrays(m2)
    assert sorted(p1) == sorted(p2)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_stories260k_load_save_load_is_bit_identical(tmp_path):
    m1 = models.load_hf(STORIES_HF)
    out = models.save_hf(m1, str(tmp_path / "export"), tokenizer_dir=STORIES_HF)
    _params_equal(m1, models.load_hf(out))
    _assert_same_tensors(STORIES_HF, out, tied=True)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Once upon a time").input_ids[0] == 1


@pytest.mark.parametrize("name", ["llama3_rope", "qwen2_tied", "phi3_longrope", "mistral"])
def test_hf_ours_hf_loads_in_transformers_with_same_logits(name, tmp_path):
    ref = make_hf_model(name, str(tmp_path / "src"))
    out = models.save_hf(models.load_hf(str(tmp_path / "src")), str(tmp_path / "export"))
    _assert_same_tensors(str(tmp_path / "src"), out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, 96, (2, 40)).astype(np.int32)
    np.testing.assert_array_equal(torch_logits(back, tokens), torch_logits(ref, tokens))


def test_sharded_export_with_index_round_trips(tmp_path):
    ref = make_hf_model("llama", str(tmp_path / "src"))
    model = models.load_hf(str(tmp_path / "src"))
    out = models.save_hf(model, str(tmp_path / "export"), max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.isfile(os.path.join(out, hf_io.INDEX_FILE))
    index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
    assert set(index["weight_map"].values()) == set(files)
    _params_equal(model, models.load_hf(out))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, 96, (1, 16)).astype(np.int32)
    np.testing.assert_array_equal(torch_logits(back, tokens), torch_logits(ref, tokens))


@pytest.mark.e2e
def test_hf_to_orbax_to_hf_command_line(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for args in (["hf_to_orbax", f"--hf={STORIES_HF}", f"--out={ckpt}"],
                 ["orbax_to_hf", f"--ckpt={ckpt}", f"--out={out}", f"--tokenizer={STORIES_HF}"]):
        subprocess.run([sys.executable, "-m", "latro_jax.convert", *args], cwd=ROOT, env=env,
                       check=True, capture_output=True)
    _assert_same_tensors(STORIES_HF, str(out), tied=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(STORIES_HF).eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = np.random.RandomState(0).randint(0, 512, (2, 30)).astype(np.int32)
    np.testing.assert_array_equal(torch_logits(back, tokens), torch_logits(ref, tokens))


def test_bf16_checkpoint_round_trips_through_orbax(tmp_path):
    src = tmp_path / "src"
    ref = make_hf_model("qwen2_tied", str(src))
    ref.to(dtype=__import__("torch").bfloat16).save_pretrained(str(src))
    convert.hf_to_orbax(str(src), str(tmp_path / "ckpt"))
    out = convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "export"))
    _assert_same_tensors(str(src), out)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = models.load_hf(STORIES_HF)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        models.save_hf(model, str(tmp_path / "export"))
    assert os.listdir(tmp_path) == []


def test_existing_export_is_not_overwritten_by_default(tmp_path):
    model = models.load_hf(STORIES_HF)
    (tmp_path / "export").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        models.save_hf(model, str(tmp_path / "export"))
    models.save_hf(model, str(tmp_path / "export"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export"]


# ------------------------------------------------------------------ bad input
@pytest.fixture
def stories_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(STORIES_HF, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_missing_config_json(stories_copy):
    (stories_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_hf(str(stories_copy))


def test_missing_weights(stories_copy):
    (stories_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        models.load_hf(str(stories_copy))


def test_unsupported_architecture(stories_copy):
    cfg = json.load(open(stories_copy / "config.json"))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(stories_copy / "config.json", "w"))
    with pytest.raises(models.ConfigError, match="GPT2LMHeadModel.*not supported"):
        models.load_hf(str(stories_copy))


def test_missing_tensor(stories_copy):
    tensors = load_file(str(stories_copy / "model.safetensors"))
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(stories_copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.3\.mlp\.up_proj\.weight"):
        models.load_hf(str(stories_copy))


def test_extra_tensor(stories_copy):
    tensors = load_file(str(stories_copy / "model.safetensors"))
    tensors["model.layers.5.mlp.up_proj.weight"] = tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(stories_copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.5.*num_hidden_layers"):
        models.load_hf(str(stories_copy))


def test_shape_mismatch(stories_copy):
    tensors = load_file(str(stories_copy / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight"] = np.zeros((64, 60), np.float32)
    save_file(tensors, str(stories_copy / "model.safetensors"))
    with pytest.raises(models.ConfigError, match=r"shape mismatch: model\.layers\.1\.self_attn\.o_proj\.weight \(64, 60\)"):
        models.load_hf(str(stories_copy))


def test_unreadable_safetensors(stories_copy):
    path = stories_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(models.ConfigError, match=r"cannot read .*model\.safetensors.*re-download"):
        models.load_hf(str(stories_copy))
