"""LaTRO on GSM8K with Mistral-7B-Instruct-v0.3 (SPEC 1.5; see configs/base.py:paper_recipe), with
c_sft = 0 as the released code trains (configs/latro_gsm8k_mistral7b_csft1.py: the derivation's
c_sft = 1).

    python -m latro_jax.main --config=configs/latro_gsm8k_mistral7b.py --workdir=... \\
        --config.model.path=/data/Mistral-7B-Instruct-v0.3
"""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("mistralai/Mistral-7B-Instruct-v0.3", "gsm8k", stages="latro")
