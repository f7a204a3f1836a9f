"""LaTRO on ARC-Challenge with Mistral-7B-Instruct-v0.3: c_sft = 1 (the paper's
derivation, SPEC 1.2) instead of the released code's c_sft = 0 (configs/latro_arc_mistral7b.py).

    python -m latro_jax.main --config=configs/latro_arc_mistral7b_csft1.py --workdir=... \\
        --config.model.path=/data/Mistral-7B-Instruct-v0.3
"""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("mistralai/Mistral-7B-Instruct-v0.3", "arc", stages="latro", sft_coef=1.0)
