"""LoRA adapters out as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained(base, folder)` loads on top of the HF base model.

PEFT's LoRA on a Linear W [out, in] adds (lora_alpha / r) lora_B lora_A x with lora_A [r, in]
and lora_B [out, r]: ours transposed (A [in, r], B [r, out] in our output layout, which for q /
k / v flattens to HF's row order). Llama, Mistral and Qwen2 name the projections q_proj, k_proj,
v_proj, o_proj (self_attn) and gate_proj, up_proj, down_proj (mlp). Phi-3 fuses qkv_proj and
gate_up_proj: their adapter is the exact fusion of ours, rank n r for n fused targets, A the
targets' A stacked and B block-diagonal (zero rows for a projection without an adapter), with
rank_pattern / alpha_pattern n r / n alpha so that the scale stays alpha / r.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from safetensors.numpy import save_file

from latro_jax import sharding
from latro_jax.models import lora

PREFIX = "base_model.model.model.layers.{i}."
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PHI3_FUSED = {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}


def _host(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """target -> (A [L, in, r], B [L, r, out flattened]) as float32 host arrays."""
    host = lambda x: sharding.to_host(x).astype(np.float32)
    return {t: (host(a), host(b).reshape(*b.shape[:2], -1)) for t, (a, b) in lora.weights(model).items()}


def peft_tensors(model) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """(PEFT tensor name -> array, rank_pattern, target module names) of the model's adapters."""
    config, weights = model.config, _host(model)
    r = lora.config_of(model).rank
    tensors, ranks, names = {}, {}, []

    def put(module: str, a: np.ndarray, b: np.ndarray):  # a [L, in, r'], b [L, r', out]
        for i in range(config.num_layers):
            tensors[PREFIX.format(i=i) + module + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[PREFIX.format(i=i) + module + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
        names.append(module.split(".")[-1])

    fused = PHI3_FUSED if config.family == "phi3" else {}
    out_shape = {t: shape for targets in lora.shapes(config).values() for t, shape in targets.items()}
    for module, parts in fused.items():
        present = [t for t in parts if t in weights]
        if not present:
            continue
        a = np.concatenate([weights[t][0] for t in present], axis=2)
        outs = [int(np.prod(out_shape[t][1])) for t in parts]
        b = np.zeros((config.num_layers, len(present) * r, sum(outs)), np.float32)
        for k, t in enumerate(present):
            start = sum(outs[:parts.index(t)])
            b[:, k * r:(k + 1) * r, start:start + outs[parts.index(t)]] = weights[t][1]
        put(module, a, b)
        if len(present) > 1:
            ranks[module.split(".")[-1]] = len(present) * r
    done = {t for parts in fused.values() for t in parts}
    for t in lora.TARGETS:
        if t in weights and t not in done:
            put(MODULES[t], *weights[t])
    return tensors, ranks, names


def save_peft(model, out_dir: str, base_model: str = "", *, overwrite: bool = False) -> str:
    """Write the model's adapters as a PEFT LoRA folder (assembled beside out_dir and renamed into
    place; process 0 writes). base_model: the base's path or hub id, recorded in the config."""
    if not lora.has_adapters(model):
        raise ValueError("the model has no LoRA adapters to export (model.lora.rank is 0)")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True.")
    tensors, ranks, names = peft_tensors(model)  # collective in multi-process runs
    if jax.process_index() != 0:
        return out_dir
    cfg = lora.config_of(model)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(set(names)), "rank_pattern": ranks,
        "alpha_pattern": {k: v * cfg.scale for k, v in ranks.items()}, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
