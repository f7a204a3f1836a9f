"""HF <-> latro_jax weight conversion, written as data: one table of rules per model family.

A rule maps one or more HF tensors to one or more of our parameters with a transform and its
inverse. Per-layer rules name HF tensors with `{i}` and address our stacked layer arrays
(leading axis = layer); the loader applies them layer by layer.

Our parameter paths are the NNX state paths joined with '/'. HF linear weights are [out, in];
our kernels are [in, out].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from latro_jax.models.config import ModelConfig

Arrays = Sequence[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[Arrays], list[np.ndarray]]
    to_hf: Callable[[Arrays], list[np.ndarray]]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]


def _copy(xs: Arrays) -> list[np.ndarray]:
    return list(xs)


def _transpose(xs: Arrays) -> list[np.ndarray]:
    return [np.ascontiguousarray(x.T) for x in xs]


def copy(hf: str, ours: str) -> Rule:
    return Rule((hf,), (ours,), _copy, _copy)


def linear(hf: str, ours: str) -> Rule:
    """HF weight [out, in] <-> our kernel [in, out]."""
    return Rule((hf,), (ours,), _transpose, _transpose)


def _qkv_to_ours(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int, head_dim: int):
    """HF q [H*D, ...], k and v [KVH*D, ...] (weights [out, in] or biases [out]) -> our fused
    head-grouped layout: kernel [in, KVH, G+2, D] or bias [KVH, G+2, D]."""
    rest = q.shape[1:]
    fused = np.concatenate([q.reshape(kv_heads, -1, head_dim, *rest),
                            k.reshape(kv_heads, 1, head_dim, *rest),
                            v.reshape(kv_heads, 1, head_dim, *rest)], axis=1)
    return np.ascontiguousarray(np.moveaxis(fused, 3, 0) if rest else fused)


def _qkv_to_hf(fused: np.ndarray) -> list[np.ndarray]:
    """Inverse of _qkv_to_ours: [q, k, v] in HF layout."""
    if fused.ndim == 4:
        fused = np.moveaxis(fused, 0, 3)  # [KVH, G+2, D, in]
    groups, rest = fused.shape[1] - 2, fused.shape[3:]
    parts = fused[:, :groups], fused[:, groups], fused[:, groups + 1]
    return [np.ascontiguousarray(p.reshape(-1, *rest)) for p in parts]


def qkv(hf: Sequence[str], ours: str, config: ModelConfig) -> Rule:
    """Separate HF q/k/v projections (weights or biases) <-> our fused qkv parameter."""
    to_ours = lambda xs: [_qkv_to_ours(*xs, config.num_kv_heads, config.head_dim)]
    return Rule(tuple(hf), (ours,), to_ours, lambda xs: _qkv_to_hf(xs[0]))


def fused_qkv(hf: str, ours: str, config: ModelConfig) -> Rule:
    """Phi-3's qkv_proj [(H + 2 KVH) * D, in] <-> our fused qkv kernel."""
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    to_ours = lambda xs: [_qkv_to_ours(*np.split(xs[0], [q_rows, q_rows + kv_rows]),
                                       config.num_kv_heads, config.head_dim)]
    to_hf = lambda xs: [np.ascontiguousarray(np.concatenate(_qkv_to_hf(xs[0]), axis=0))]
    return Rule((hf,), (ours,), to_ours, to_hf)


def _gate_up_to_ours(gate_up: np.ndarray) -> np.ndarray:
    """[gate; up] rows [2 * I, in] -> kernel [in, 2, I]."""
    return np.ascontiguousarray(gate_up.reshape(2, -1, gate_up.shape[-1]).transpose(2, 0, 1))


def _gate_up_to_hf(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.transpose(1, 2, 0).reshape(-1, kernel.shape[0]))


def gate_up(hf: Sequence[str], ours: str) -> Rule:
    """HF gate_proj and up_proj (or Phi-3's fused gate_up_proj) <-> our kernel [in, 2, I]."""
    if len(hf) == 1:
        return Rule(tuple(hf), (ours,), lambda xs: [_gate_up_to_ours(xs[0])],
                    lambda xs: [_gate_up_to_hf(xs[0])])
    return Rule(tuple(hf), (ours,), lambda xs: [_gate_up_to_ours(np.concatenate(xs, axis=0))],
                lambda xs: np.split(_gate_up_to_hf(xs[0]), 2, axis=0))


L = "model.layers.{i}."


def rules_for(config: ModelConfig) -> list[Rule]:
    """The conversion table of config.family."""
    c = config
    rules = [copy("model.embed_tokens.weight", "embed/embedding")]
    if c.family == "phi3":
        rules += [fused_qkv(L + "self_attn.qkv_proj.weight", "layers/attn/qkv_kernel", c),
                  gate_up([L + "mlp.gate_up_proj.weight"], "layers/mlp/gate_up_kernel")]
    else:
        rules += [qkv([L + f"self_attn.{p}_proj.weight" for p in "qkv"], "layers/attn/qkv_kernel", c),
                  gate_up([L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"],
                          "layers/mlp/gate_up_kernel")]
    if c.attention_bias:
        rules.append(qkv([L + f"self_attn.{p}_proj.bias" for p in "qkv"], "layers/attn/qkv_bias", c))
    rules += [
        linear(L + "self_attn.o_proj.weight", "layers/attn/o_proj/kernel"),
        linear(L + "mlp.down_proj.weight", "layers/mlp/down_proj/kernel"),
        copy(L + "input_layernorm.weight", "layers/attn_norm/scale"),
        copy(L + "post_attention_layernorm.weight", "layers/mlp_norm/scale"),
        copy("model.norm.weight", "norm/scale"),
    ]
    if not c.tie_word_embeddings:
        rules.append(linear("lm_head.weight", "lm_head/kernel"))
    return rules


def hf_names(rules: Sequence[Rule], num_layers: int) -> list[str]:
    """Every HF tensor name the table expects, in checkpoint order."""
    names = []
    for rule in rules:
        for template in rule.hf:
            if rule.per_layer:
                names += [template.format(i=i) for i in range(num_layers)]
            else:
                names.append(template)
    return names


def ignorable(name: str, config: ModelConfig) -> bool:
    """HF tensors that carry no information for us: RoPE buffers, and the explicit copy of a
    tied embedding some exporters write."""
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight")
