"""LaTRO on GSM8K with Phi-3.5-mini-instruct (SPEC 1.5; see configs/base.py:paper_recipe), with
c_sft = 0 as the released code trains (configs/latro_gsm8k_phi35_csft1.py: the derivation's
c_sft = 1).

    python -m latro_jax.main --config=configs/latro_gsm8k_phi35.py --workdir=... \\
        --config.model.path=/data/Phi-3.5-mini-instruct
"""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("microsoft/Phi-3.5-mini-instruct", "gsm8k", stages="latro")
