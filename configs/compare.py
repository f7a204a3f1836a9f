"""MRT against outcome-reward GRPO (with and without a length penalty), MRT-STaR, STaR and LaTRO
from one SFT warm start, on a task where episodes can waste tokens (launch/compare.py runs it;
docs/results.md reports it).

    python benchmarks/mrt_precheck.py --model=<root>/s0/sft/hf     # the task's pre-check
    python launch/compare.py --root=/tmp/compare --seeds=0,1,2

The task (data/synthetic.py `search`): "Which of 4, 9, 7, 2 added to 5 makes 12?", worked by
checking one candidate per sentence ("5+4=9 no. 5+9=14 no. 5+7=12 yes."). 70% of the
warm-start rationales go on checking 1-4 more candidates after the find (re-checking from the
first when the list runs out) -- episodes that make no progress -- the others stop at it.
Every RL method has the same training budget of BUDGET thinking tokens (a continuation cut by
it earns nothing; MRT's prefix counts against it: budget "remaining"): every trace that stops
at the find fits it (at most 38 tokens with the answer), 63% of the wasteful ones do not. Every
RL method runs the same number of updates (`steps`) on the same questions (16 per update) with
the same samples per question (8) and learning rate; MRT-STaR and STaR keep one trace per
question and fine-tune on them for 3 epochs per round; grpo_matched is GRPO given MRT-RL's
sampled + scored tokens (launch/compare.py sets its steps). Evaluation at a generous
EVAL_TOKENS: greedy and maj@4 on 200 held-out problems, the forced-answer accuracy curve and
normalised regret at 3 cutoffs.
"""

from configs.demo import get_config as demo

STEPS, QUESTIONS, SAMPLES, LR = 60, 16, 8, 5e-5
BUDGET, EVAL_TOKENS = 38, 72
RL_OPTIM = dict(learning_rate=LR, schedule="constant", warmup_steps=0, weight_decay=0.0)


def rl_methods(c, *, steps: int, rollout_tokens: int, latro_tokens: int, mrt_budget: str, eval_tokens: int,
               forced_budgets: tuple[int, ...]) -> None:
    """What every comparison sets alike: LaTRO, GRPO, MRT-RL (termination), MRT-STaR, STaR and
    grpo_matched with `steps` updates of QUESTIONS questions x SAMPLES samples at RL_OPTIM, T 1,
    beta 0, episodes ending at ".", J by 4 forced answers at T 1; the evaluation at eval_tokens."""
    rl = dict(steps=steps, batch_size=QUESTIONS)
    group = dict(num_samples=SAMPLES, max_tokens=rollout_tokens, sampling=dict(temperature=1.0, top_k=0, top_p=1.0))
    c.latro.update(max_rationale_tokens=latro_tokens, num_samples=SAMPLES, **rl)
    c.latro.optim.update(RL_OPTIM)
    end = dict(rule="end_tokens", end_texts=(".",), group_size=1, thinking_end=())
    forcing = dict(suffix=" The answer is", estimator="mc", samples=4,
                   sampling=dict(temperature=1.0, top_k=0, top_p=1.0), answer_tokens=4)
    for section in ("grpo", "mrt"):
        c[section].update(rollout=group, loss=dict(beta=0.0), **rl)
        c[section].optim.update(RL_OPTIM)
    c.mrt.update(prefixes="traces", advantage="termination", budget=mrt_budget, segment=end, forcing=forcing)
    c.mrt_star.update(rollout=group, filter="max_prefix", keep_per_question=1, segment=end, forcing=forcing, **rl)
    c.mrt_star.optim.update(RL_OPTIM)
    c.star = dict(c.mrt_star.to_dict(), algorithm="mrt_star", filter="outcome")
    c.grpo_matched = dict(c.grpo.to_dict(), algorithm="grpo")  # steps set by launch/compare.py
    c.eval.update(max_new_tokens=eval_tokens, batch_size=100, maj_k=4, forced_budgets=forced_budgets,
                  forced_at="tokens", regret_cutoffs=(16, 24, 32), segment=end)
    c.eval.forcing.update(answer_tokens=4)
    c.checkpoint.update(every=20, keep=2)


def get_config():
    c = demo()
    c.task.synthetic = dict(seed=0, sizes=dict(test=200, train=6000), problem="search", candidates=4,
                            max_operand=9, wasteful_share=0.7)
    c.stages = "sft"
    rl_methods(c, steps=STEPS, rollout_tokens=BUDGET, latro_tokens=BUDGET, mrt_budget="remaining",
               eval_tokens=EVAL_TOKENS, forced_budgets=(8, 16, 24, 32, 40, 56, 72))
    c.grpo_length = dict(c.grpo.to_dict(), algorithm="grpo", length_penalty=0.5)
    c.mrt_episode = dict(c.mrt.to_dict(), algorithm="mrt", continuation="episode", advantage="group", alpha=1.0)
    return c
