"""LaTRO beside its likelihood-reward relatives (VeriFree, JEPO, RLPR) and outcome-reward GRPO
beside its variants (DAPO, GSPO, CISPO, RLOO), all from the SFT warm start of configs/compare.py (the same
task, data and seed), with its budget: 80 updates of 16 questions x 8 samples at lr 5e-5.

    python launch/compare.py --root=/tmp/families --config=configs/compare_families.py \\
        --methods=latro,verifree,jepo,rlpr,grpo,dapo,gspo,cispo,rloo --seeds=0,1,2

The likelihood family samples rationales of at most 56 tokens (LaTRO's budget); the GRPO family
completions of at most 64 at T 1, beta 0. DAPO's overlong shaping starts 16 tokens before the
budget; GSPO takes 4 mini-batch updates per rollout (its paper's), the others one; RLOO samples
GRPO's 8 per question (its default is 2) with the KL (0.05) in the reward. RLPR samples GRPO's
completions with its own loss (clip 0.2 / 0.27, 4 mini-batch updates per rollout) and std filter
(from update 11).
"""

from configs.compare import RL, RL_OPTIM, SAMPLES, get_config as compare


def get_config():
    c = compare()
    for section in ("verifree", "jepo"):
        c[section].update(max_rationale_tokens=c.latro.max_rationale_tokens, num_samples=SAMPLES, **RL)
        c[section].optim.update(RL_OPTIM)
    for section in ("dapo", "gspo", "cispo", "rloo", "rlpr"):
        c[section].update(rollout=c.grpo.rollout.to_dict(), **RL)
        c[section].optim.update(RL_OPTIM)
    c.dapo.update(overlong_cache=16)
    return c
