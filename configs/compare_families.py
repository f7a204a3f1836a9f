"""LaTRO beside its likelihood-reward relatives (VeriFree, JEPO, RLPR) and outcome-reward GRPO
beside its variants (DAPO, GSPO, CISPO, RLOO), all from one SFT warm start on the chain task (configs/compare.py's
before issue 36: 4-step problems, 50% worked -- 30% of those with a restatement, 30% with a slip
and its fix -- 50% terse), with its budget: 80 updates of 16 questions x 8 samples at lr 5e-5.

    python launch/compare.py --root=/tmp/families --config=configs/compare_families.py \\
        --methods=latro,verifree,jepo,rlpr,grpo,dapo,gspo,cispo,rloo --seeds=0,1,2

The likelihood family samples rationales of at most 56 tokens (LaTRO's budget); the GRPO family
completions of at most 64 at T 1, beta 0. DAPO's overlong shaping starts 16 tokens before the
budget; GSPO takes 4 mini-batch updates per rollout (its paper's), the others one; RLOO samples
GRPO's 8 per question (its default is 2) with the KL (0.05) in the reward. RLPR samples GRPO's
completions with its own loss (clip 0.2 / 0.27, 4 mini-batch updates per rollout) and std filter
(from update 11).
"""

from configs.compare import QUESTIONS, RL_OPTIM, SAMPLES, rl_methods
from configs.demo import get_config as demo

STEPS = 80
RL = dict(steps=STEPS, batch_size=QUESTIONS)  # every RL method's updates and questions per update


def chain_comparison():
    """configs/compare.py before issue 36: the chain task, LaTRO, GRPO, MRT-RL, MRT-STaR, STaR."""
    c = demo()
    c.task.synthetic.update(stepwise_share=0.5, restate_share=0.3, slip_share=0.3)
    c.stages = "sft"
    rl_methods(c, steps=STEPS, rollout_tokens=64, latro_tokens=56, mrt_budget="full", eval_tokens=64,
               forced_budgets=(8, 16, 24, 32, 48, 64))
    return c


def get_config():
    c = chain_comparison()
    for section in ("verifree", "jepo"):
        c[section].update(max_rationale_tokens=c.latro.max_rationale_tokens, num_samples=SAMPLES, **RL)
        c[section].optim.update(RL_OPTIM)
    for section in ("dapo", "gspo", "cispo", "rloo", "rlpr"):
        c[section].update(rollout=c.grpo.rollout.to_dict(), **RL)
        c[section].optim.update(RL_OPTIM)
    c.dapo.update(overlong_cache=16)
    return c
