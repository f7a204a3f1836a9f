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


def _split_rows_transposed(sizes: Sequence[int]) -> Callable[[Arrays], list[np.ndarray]]:
    """Fused HF weight [sum(sizes), in] -> one kernel [in, size] per part."""
    cuts = np.cumsum(sizes)[:-1]
    return lambda xs: _transpose(np.split(xs[0], cuts, axis=0))


def _concat_rows_transposed(xs: Arrays) -> list[np.ndarray]:
    """Inverse of _split_rows_transposed: kernels [in, size] -> fused [sum(sizes), in]."""
    return [np.ascontiguousarray(np.concatenate([x.T for x in xs], axis=0))]


def copy(hf: str, ours: str) -> Rule:
    return Rule((hf,), (ours,), _copy, _copy)


def linear(hf: str, ours: str) -> Rule:
    return Rule((hf,), (ours,), _transpose, _transpose)


def fused_linear(hf: str, ours: Sequence[str], sizes: Sequence[int]) -> Rule:
    return Rule((hf,), tuple(ours), _split_rows_transposed(sizes), _concat_rows_transposed)


L = "model.layers.{i}."


def rules_for(config: ModelConfig) -> list[Rule]:
    """The conversion table of config.family."""
    c = config
    rules = [copy("model.embed_tokens.weight", "embed/embedding")]
    if c.family == "phi3":
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        rules += [
            fused_linear(L + "self_attn.qkv_proj.weight",
                         ["layers/attn/q_proj/kernel", "layers/attn/k_proj/kernel",
                          "layers/attn/v_proj/kernel"], [q, kv, kv]),
            fused_linear(L + "mlp.gate_up_proj.weight",
                         ["layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel"],
                         [c.intermediate_size, c.intermediate_size]),
        ]
    else:
        rules += [linear(L + f"self_attn.{p}_proj.weight", f"layers/attn/{p}_proj/kernel")
                  for p in "qkv"]
        rules += [linear(L + f"mlp.{p}_proj.weight", f"layers/mlp/{p}_proj/kernel")
                  for p in ("gate", "up")]
    if c.attention_bias:
        rules += [copy(L + f"self_attn.{p}_proj.bias", f"layers/attn/{p}_proj/bias") for p in "qkv"]
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
