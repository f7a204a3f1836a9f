"""LaTRO on GSM8K with Llama-3.1-8B-Instruct (SPEC 1.5; see configs/base.py:paper_recipe), with
c_sft = 0 as the released code trains (configs/latro_gsm8k_llama31_8b_csft1.py: the derivation's
c_sft = 1).

    python -m latro_jax.main --config=configs/latro_gsm8k_llama31_8b.py --workdir=... \\
        --config.model.path=/data/Llama-3.1-8B-Instruct
"""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("meta-llama/Llama-3.1-8B-Instruct", "gsm8k", stages="latro")
