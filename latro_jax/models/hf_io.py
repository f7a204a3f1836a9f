"""Hugging Face folders in and out: `load_hf` reads config.json + safetensors (one file, or shards
with model.safetensors.index.json) without torch; `save_hf` writes the same layout atomically
(a temporary folder renamed into place), so a failed export never leaves a half folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from latro_jax.models import hf_mapping, lora
from latro_jax.models.build import model_from_arrays, param_arrays, param_shapes
from latro_jax.models.config import ConfigError, ModelConfig, read_config
from latro_jax.models.transformer import Remat, Transformer

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def resolve_model_dir(path_or_id: str) -> str:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub (cached)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise FileNotFoundError(f"{path_or_id} is a file; pass the model folder that holds config.json.")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES])
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local folder and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {e}). Pass the path of a downloaded HF model folder.") from e


class SafetensorsReader:
    """Name -> lazily read tensor over one or several safetensors files."""

    def __init__(self, model_dir: str):
        index_path = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{model_dir}: no *.safetensors weights (and no {INDEX_FILE}). latro_jax reads "
                "safetensors only; convert .bin/.pth weights with transformers' save_pretrained.")
        self._handles = {}
        self._where = {}
        self._stack = contextlib.ExitStack()
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index_path} lists {name}, which is missing; re-download it.")
            try:
                handle = self._stack.enter_context(safe_open(path, framework="numpy"))
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConfigError(f"cannot read {path}: {e}. The file is damaged or not safetensors; "
                                 "re-download or re-export it.") from e
            self._handles[path] = handle
            self._where.update({k: path for k in keys})

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except SafetensorError as e:
            raise ConfigError(f"cannot read tensor {name} from {self._where[name]}: {e}. "
                             "The file is damaged; re-download or re-export it.") from e

    def close(self):
        self._stack.close()


def _check_names(reader: SafetensorsReader, config: ModelConfig, expected: list[str], where: str):
    present = {n for n in reader.names() if not hf_mapping.ignorable(n, config)}
    missing = [n for n in expected if n not in present]
    extra = sorted(present - set(expected))
    if missing:
        raise ConfigError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"expected for a {config.family} model with {config.num_layers} layers; "
                         "the weights are incomplete or config.json does not describe them.")
    if extra:
        raise ConfigError(f"{where}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"for a {config.family} model per config.json; check num_hidden_layers, "
                         "tie_word_embeddings and architectures.")


def load_hf(path: str, dtype="float32", param_dtype="float32", *, remat: Remat = "none",
            mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """Load an HF checkpoint folder (or hub id) into a latro_jax Transformer.

    dtype is the compute dtype, param_dtype the storage dtype of the parameters; with `mesh`
    the parameters are placed sharded by the model's partition rules.
    """
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    rules = hf_mapping.rules_for(config)
    reader = SafetensorsReader(model_dir)
    try:
        _check_names(reader, config, hf_mapping.hf_names(rules, config.num_layers), model_dir)
        shapes = param_shapes(config)
        ours = {}
        for rule in rules:
            ours.update(_convert_rule(reader, rule, config, shapes, model_dir))
        return model_from_arrays(config, ours.pop, dtype=dtype, param_dtype=param_dtype,
                                 remat=remat, mesh=mesh, source=model_dir)
    finally:
        reader.close()


def _convert_rule(reader: SafetensorsReader, rule: hf_mapping.Rule, config: ModelConfig,
                  shapes: dict[str, tuple], where: str) -> dict[str, np.ndarray]:
    """Our arrays of one rule (stacked over layers for per-layer rules), each converted part
    checked against the shape the config implies."""
    layers = range(config.num_layers) if rule.per_layer else [None]
    want = [shapes[name][1:] if rule.per_layer else shapes[name] for name in rule.ours]
    parts = []
    for i in layers:
        hf = [reader.get(n.format(i=i)) for n in rule.hf]
        converted = rule.to_ours(hf)
        if [tuple(x.shape) for x in converted] != want:
            got = ", ".join(f"{n.format(i=i)} {tuple(x.shape)}" for n, x in zip(rule.hf, hf))
            raise ConfigError(f"{where}: tensor shape mismatch: {got}; config.json implies "
                             f"{', '.join(rule.ours)} of shape(s) {want} in latro_jax layout "
                             "([in, out] kernels). The weights do not belong to this config.json.")
        parts.append(converted)
    return {name: np.stack([p[j] for p in parts]) if rule.per_layer else parts[0][j]
            for j, name in enumerate(rule.ours)}


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights as HF tensors (name -> array), in checkpoint order; LoRA adapters,
    when it has them, merged into their kernels (lora.merged)."""
    config = model.config
    ours = param_arrays(lora.merged(model))
    out = {}
    for rule in hf_mapping.rules_for(config):
        layers = range(config.num_layers) if rule.per_layer else [None]
        for i in layers:
            parts = [ours[name] if i is None else ours[name][i] for name in rule.ours]
            for template, arr in zip(rule.hf, rule.to_hf(parts)):
                out[template.format(i=i)] = arr
    return out


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    return shards + [current]


def save_hf(model: Transformer, out_dir: str, tokenizer_dir: str | None = None, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> str:
    """Write `model` as an HF folder (safetensors, sharded past max_shard_bytes with an index;
    config.json; generation_config.json; tokenizer files copied from tokenizer_dir).

    The folder is assembled under a temporary name beside out_dir and renamed into place. In a
    multi-process run every process must call this (the weights are gathered collectively);
    only process 0 writes.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True.")
    if tokenizer_dir is not None and not any(
            os.path.isfile(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...).")
    tensors = hf_state_dict(model)  # collective in multi-process runs
    broken = [name for name, arr in tensors.items() if not np.isfinite(arr.astype(np.float32)).all()]
    if broken:
        raise ValueError(f"refusing to export to {out_dir}: {len(broken)} tensors hold NaN or Inf "
                         f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}).")
    if jax.process_index() != 0:
        return out_dir
    dtype = str(next(iter(tensors.values())).dtype)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                     "weight_map": weight_map}
            _write_json(os.path.join(tmp, INDEX_FILE), index)
        config = model.config
        _write_json(os.path.join(tmp, "config.json"), config.to_hf_dict(dtype))
        generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                      "eos_token_id": list(config.eos_token_id)}
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        for fname in TOKENIZER_FILES if tokenizer_dir else ():
            src = os.path.join(tokenizer_dir, fname)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, fname))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: an export is for others to read
        for fname in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fname), 0o644)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _replace_dir(src: str, dst: str) -> None:
    """Move the finished folder src to dst; an existing dst is swapped out, then deleted."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    old = dst + ".old-" + os.path.basename(src)
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
