"""Defaults shared by every recipe (SPEC 1.5 where the paper fixes a value)."""

import ml_collections


def optim(lr: float, schedule: str = "linear", warmup_steps: int = 0, weight_decay: float = 0.0):
    return dict(learning_rate=lr, schedule=schedule, warmup_steps=warmup_steps, b1=0.9,
                b2=0.999, eps=1e-8, weight_decay=weight_decay, grad_clip=0.0)


def get_base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "latro"  # comma list of stage sections, run in order
    c.model = dict(
        path="",  # HF folder or hub id; empty: build from `init`
        init=dict(family="llama", hidden_size=0, intermediate_size=0, num_layers=0, num_heads=1,
                  num_kv_heads=1, head_dim=0, max_position_embeddings=1024,
                  tie_word_embeddings=True, initializer_range=0.02),
        dtype="bfloat16", param_dtype="float32", remat="full")
    c.tokenizer = dict(path="", build="")  # path defaults to model.path; build: "", "char", "words"
    c.task = dict(name="gsm8k", source="../shared/data/gsm8k", config_name="",
                  train_split="train", eval_split="test", val_split="", sft_examples=7473)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Stage sections: the stage keys (algorithm = the section name unless given, steps,
    # batch_size = questions per update, microbatches, logprob_chunk, optim) and the algorithm's
    # own keys (latro_jax/algorithms/<name>.py: its Config dataclass documents each one).
    c.sft = dict(steps=1, batch_size=64, microbatches=1, optim=optim(1e-5))
    c.latro = dict(steps=117, batch_size=24, num_samples=16, beta=0.05, nonstop_penalty=2.0,
                   sft_coef=1.0, max_rationale_tokens=500,
                   sampling=dict(temperature=1.0, top_k=0, top_p=1.0),
                   microbatches=1, logprob_chunk=128, optim=optim(5e-7))
    # every: validate on task.val_split every N updates (0 = off); the checkpoint with the best
    # validation greedy accuracy is kept besides the last `checkpoint.keep`.
    c.eval = dict(max_new_tokens=500, batch_size=64, maj_k=8, temperature=1.0, limit=0, every=0)
    c.checkpoint = dict(every=10, keep=3)
    c.export = dict(hf=True)
    return ml_collections.ConfigDict(c)


PAPER_TASKS = {  # SPEC 1.5: beta and number of updates per task
    "gsm8k": dict(name="gsm8k", source="../shared/data/gsm8k", beta=0.05, steps=117),
    "arc": dict(name="arc_challenge", source="../shared/data/arc_challenge", beta=0.25, steps=35),
}


def paper_recipe(model_path: str, task: str, stages: str, sft_coef: float = 0.0) -> ml_collections.ConfigDict:
    """The paper's set-up for one model and task: full fine-tuning with bf16 compute and remat,
    parameters sharded over 8 devices (fsdp), 500-token greedy / maj@8 evaluation. stages
    "latro": K = 16, L = 500, T = 1, 24 questions per update, AdamW 5e-7 linear decay, and
    c_sft = 0 as the released code trains (its default, never changed by its training script;
    SPEC 1.2) -- the *_csft1 recipes use the derivation's c_sft = 1. stages "sft": the SFT
    baseline on the gold rationales."""
    t = PAPER_TASKS[task]
    c = get_base()
    c.stages = stages
    c.model.update(path=model_path, dtype="bfloat16", param_dtype="float32", remat="full")
    c.task.update(name=t["name"], source=t["source"], train_split="train", eval_split="test")
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.latro.update(steps=t["steps"], batch_size=24, num_samples=16, beta=t["beta"], sft_coef=sft_coef,
                   microbatches=8)
    c.sft.update(steps=300, batch_size=64, microbatches=4, optim=optim(1e-6, "cosine", warmup_steps=30))
    c.eval.update(max_new_tokens=500, maj_k=8)
    return c
