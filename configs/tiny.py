"""A seconds-long run of the whole job, for tests: both stages, checkpoints, eval, export."""

from configs.demo import get_config as demo


def get_config():
    c = demo()
    c.model.init.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=16)
    c.task.sft_examples = 16
    c.task.synthetic.sizes = dict(test=8, validation=8, train=64)
    c.task.val_split = "validation"
    c.sft.update(steps=4, batch_size=8)
    c.sft.optim.warmup_steps = 0
    c.latro.update(steps=4, batch_size=2, num_samples=4, max_rationale_tokens=12)
    for section in ("verifree", "jepo"):
        c[section].update(steps=2, batch_size=2, num_samples=4, max_rationale_tokens=12)
        c[section].optim.update(learning_rate=5e-5)  # the demo's LaTRO rate
    c.verifree.answer_weight = "one"  # a random model finishes no rationale: every R (so w = R) is 0
    for section in ("grpo", "dapo", "gspo", "cispo", "rloo", "rlpr", "mrt", "mrt_star"):
        c[section].update(steps=2, batch_size=2, rollout=dict(num_samples=4, max_tokens=12))
        c[section].optim.update(learning_rate=2e-3, warmup_steps=0)
    c.dapo.update(overlong_cache=4, drop_uniform_groups=False)  # a random model's groups are all wrong
    c.gspo.update(batch_size=4)  # two mini-batches (updates_per_rollout) of 2 questions x 4 = 8 rows
    c.gspo.loss.update(updates_per_rollout=2)
    c.rlpr.update(batch_size=4)  # as gspo
    c.rlpr.loss.update(updates_per_rollout=2)
    c.rlpr.std_filter.update(warmup_start=1, warmup_end=1)  # the filter acts from the second update
    c.mrt.forcing.update(samples=2, answer_tokens=4)
    c.mrt_star.update(keep_per_question=4)  # 2 questions x 4 = 8 rows: one per fake device
    c.mrt_star.forcing.update(samples=2, answer_tokens=4)
    c.eval.update(max_new_tokens=12, batch_size=8, maj_k=2, every=2)
    c.checkpoint.update(every=2, keep=2)
    return c
