"""Defaults shared by every recipe (SPEC 1.5 where the paper fixes a value)."""

import ml_collections


def optim(lr: float, schedule: str = "linear", warmup_steps: int = 0, weight_decay: float = 0.0):
    return dict(learning_rate=lr, schedule=schedule, warmup_steps=warmup_steps, b1=0.9,
                b2=0.999, eps=1e-8, weight_decay=weight_decay, grad_clip=0.0)


def get_base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "latro"  # comma list, run in order: sft, latro
    c.model = dict(
        path="",  # HF folder or hub id; empty: build from `init`
        init=dict(family="llama", hidden_size=0, intermediate_size=0, num_layers=0, num_heads=1,
                  num_kv_heads=1, head_dim=0, max_position_embeddings=1024,
                  tie_word_embeddings=True, initializer_range=0.02),
        dtype="bfloat16", param_dtype="float32", remat="full")
    c.tokenizer = dict(path="", char=False)  # path defaults to model.path
    c.task = dict(name="gsm8k", source="../shared/data/gsm8k", config_name="",
                  train_split="train", eval_split="test", sft_examples=7473)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sft = dict(steps=0, batch_size=64, microbatches=1, optim=optim(1e-5))
    c.latro = dict(steps=117, batch_size=24, num_samples=16, beta=0.05, nonstop_penalty=2.0,
                   sft_coef=1.0, max_rationale_tokens=500, temperature=1.0, top_k=0, top_p=1.0,
                   microbatches=1, logprob_chunk=128, optim=optim(5e-7))
    c.eval = dict(max_new_tokens=500, batch_size=64, maj_k=8, temperature=1.0, limit=0)
    c.checkpoint = dict(every=10, keep=3)
    c.export = dict(hf=True)
    return ml_collections.ConfigDict(c)
