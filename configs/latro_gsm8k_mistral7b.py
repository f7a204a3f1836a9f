"""LaTRO on GSM8K with Mistral-7B-Instruct-v0.3 (SPEC 1.5): K = 16, L = 500, T = 1, beta = 0.05,
24 questions (384 rationales) per update, ~117 updates, AdamW lr 5e-7 linear decay to 0, full
fine-tuning with bf16 compute. Point model.path at a local copy (or keep the hub id online):

    python -m latro_jax.main --config=configs/latro_gsm8k_mistral7b.py --workdir=... \\
        --config.model.path=/data/Mistral-7B-Instruct-v0.3

The mesh shards parameters over 8 devices per host (fsdp) and rationales over the rest; on a
TPU v5p-64 / 8-GPU node use --config.mesh.fsdp=8 (default) and raise latro.microbatches if
memory is short (384 rationales x ~1000 tokens per update)."""

from configs.base import get_base


def get_config():
    c = get_base()
    c.stages = "latro"
    c.model.update(path="mistralai/Mistral-7B-Instruct-v0.3", dtype="bfloat16", param_dtype="float32", remat="full")
    c.task.update(name="gsm8k", source="../shared/data/gsm8k", train_split="train", eval_split="test")
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.latro.update(steps=117, batch_size=24, num_samples=16, beta=0.05, microbatches=8)
    c.eval.update(max_new_tokens=500, maj_k=8)
    return c
