"""The paper's SFT baseline on GSM8K with Mistral-7B-Instruct-v0.3: completion-only fine-tuning on the gold
rationales ("####" replaced by "The answer is" for GSM8K)."""

from configs.base import get_base, optim


def get_config():
    c = get_base()
    c.stages = "sft"
    c.model.update(path="mistralai/Mistral-7B-Instruct-v0.3", dtype="bfloat16", param_dtype="float32", remat="full")
    c.task.update(name="gsm8k", source="../shared/data/gsm8k", train_split="train", eval_split="test")
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.sft.update(steps=300, batch_size=64, microbatches=4, optim=optim(1e-6, "cosine", warmup_steps=30))
    c.eval.update(max_new_tokens=500, maj_k=8)
    return c
