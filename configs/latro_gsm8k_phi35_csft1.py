"""LaTRO on GSM8K with Phi-3.5-mini-instruct: c_sft = 1 (the paper's
derivation, SPEC 1.2) instead of the released code's c_sft = 0 (configs/latro_gsm8k_phi35.py).

    python -m latro_jax.main --config=configs/latro_gsm8k_phi35_csft1.py --workdir=... \\
        --config.model.path=/data/Phi-3.5-mini-instruct
"""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("microsoft/Phi-3.5-mini-instruct", "gsm8k", stages="latro", sft_coef=1.0)
