"""The embedded default: a tiny Llama-family model trained from scratch on the synthetic
arithmetic task, on a laptop CPU in minutes.

    python -m latro_jax.main --config=configs/demo.py --workdir=/tmp/latro_demo

Stages: SFT warm start on 1,500 four-step problems whose gold rationales are mostly terse
("Total: 7."; 40% are worked step by step), then LaTRO on answer-only problems; greedy and
maj@4 accuracy on 200 held-out problems before and after each stage (results.json), training
curves (training.png), and the final model in <workdir>/hf. The warm start mostly answers
tersely and is then mostly wrong (four additions are too many to do at once); LaTRO finds that
working step by step makes the gold answer likely."""

from configs.base import get_base, optim


def get_config():
    c = get_base()
    c.stages = "sft,latro"
    c.model.init.update(family="llama", hidden_size=96, intermediate_size=288, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=24, max_position_embeddings=256,
                        tie_word_embeddings=True, initializer_range=0.02)
    c.model.update(dtype="float32", param_dtype="float32", remat="none")
    c.tokenizer.build = "words"  # words whole, digits single: ~1/3 the positions of characters
    c.task.update(name="synthetic", source="synthetic", eval_split="test", sft_examples=1500)
    c.task.synthetic = dict(seed=0, sizes=dict(test=200, train=6000), num_steps=4, max_operand=9,
                            stepwise_share=0.4)
    c.sft.update(steps=1200, batch_size=32, optim=optim(2e-3, "cosine", warmup_steps=20))
    c.latro.update(steps=100, batch_size=16, num_samples=8, beta=0.05, sft_coef=1.0,
                   max_rationale_tokens=44, optim=optim(5e-5, "constant"))
    c.eval.update(max_new_tokens=56, batch_size=100, maj_k=4, limit=0)
    c.checkpoint.update(every=200, keep=2)
    return c
