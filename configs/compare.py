"""LaTRO vs outcome-reward GRPO vs MRT-RL vs MRT-STaR (and vanilla STaR) from one SFT warm start
on the synthetic task, on a 2-core CPU (launch/compare.py runs it; docs/results.md reports it).

    python launch/compare.py --root=/tmp/compare --seeds=0,1,2

The warm-start data mixes rationale styles that make episodes differ in progress: 50% worked
step by step (of which 30% restate a running value -- a zero-progress episode -- and 30% slip
and correct: "2+8=11. Wait, 2+8=10."), 50% terse ("Total: 7."). Every RL method then runs the
same number of updates (`steps`) on the same questions (16 per update) with the same samples
per question (8) and learning rate; MRT-STaR and STaR keep one trace per question and fine-tune
on them for 3 epochs (one optimizer step each) per round. Evaluation: greedy and maj@4 on 200
held-out problems, the forced-answer accuracy
curve (budgets of 8..64 tokens) and normalised regret at 16, 24 and 32 tokens.
"""

from configs.demo import get_config as demo

STEPS, QUESTIONS, SAMPLES, LR = 80, 16, 8, 5e-5
RL = dict(steps=STEPS, batch_size=QUESTIONS)  # every RL method's updates and questions per update
RL_OPTIM = dict(learning_rate=LR, schedule="constant", warmup_steps=0, weight_decay=0.0)


def get_config():
    c = demo()
    c.task.synthetic.update(stepwise_share=0.5, restate_share=0.3, slip_share=0.3)
    c.stages = "sft"
    group = dict(num_samples=SAMPLES, max_tokens=64, sampling=dict(temperature=1.0, top_k=0, top_p=1.0))
    c.latro.update(max_rationale_tokens=56, num_samples=SAMPLES, **RL)
    c.latro.optim.update(RL_OPTIM)
    end = dict(rule="end_tokens", end_texts=(".",), group_size=1, thinking_end=())
    forcing = dict(suffix=" The answer is", estimator="mc", samples=4,
                   sampling=dict(temperature=1.0, top_k=0, top_p=1.0), answer_tokens=4)
    for section in ("grpo", "mrt"):
        c[section].update(rollout=group, loss=dict(beta=0.0), **RL)
        c[section].optim.update(RL_OPTIM)
    c.mrt.update(prefixes="traces", advantage="termination", budget="full", segment=end, forcing=forcing)
    c.mrt_star.update(rollout=group, filter="max_prefix", keep_per_question=1, segment=end, forcing=forcing, **RL)
    c.mrt_star.optim.update(RL_OPTIM)
    c.star = dict(c.mrt_star.to_dict(), algorithm="mrt_star", filter="outcome")
    c.grpo_matched = dict(c.grpo.to_dict(), algorithm="grpo")  # steps set by launch/compare.py
    c.eval.update(max_new_tokens=64, batch_size=100, maj_k=4, forced_budgets=(8, 16, 24, 32, 48, 64),
                  forced_at="tokens", regret_cutoffs=(16, 24, 32), segment=end)
    c.eval.forcing.update(answer_tokens=4)
    c.checkpoint.update(every=20, keep=2)
    return c
