"""configs/compare.py at test sizes: a tiny model, a few problems, one update per method
(tests/test_compare.py runs launch/compare.py on it in seconds)."""

from configs.compare import get_config as compare


def get_config():
    c = compare()
    c.model.init.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=16)
    c.task.sft_examples = 16
    c.task.synthetic.sizes = dict(test=8, train=64)
    c.sft.update(steps=2, batch_size=8)
    c.sft.optim.warmup_steps = 0
    c.latro.update(steps=1, batch_size=2, num_samples=4, max_rationale_tokens=12)
    for section in ("grpo", "grpo_length", "mrt", "mrt_episode", "mrt_star", "star", "grpo_matched"):
        c[section].update(steps=1, batch_size=2, rollout=dict(num_samples=4, max_tokens=12))
    for section in ("mrt_star", "star"):
        c[section].keep_per_question = 4
    c.eval.update(max_new_tokens=12, batch_size=8, maj_k=2, forced_budgets=(4, 8, 12), regret_cutoffs=(4, 8, 12))
    c.checkpoint.update(every=1, keep=1)
    return c
