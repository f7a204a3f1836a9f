"""LaTRO on ARC-Challenge with Llama-3.1-8B-Instruct: c_sft = 1 (the paper's
derivation, SPEC 1.2) instead of the released code's c_sft = 0 (configs/latro_arc_llama31_8b.py).

    python -m latro_jax.main --config=configs/latro_arc_llama31_8b_csft1.py --workdir=... \\
        --config.model.path=/data/Llama-3.1-8B-Instruct
"""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("meta-llama/Llama-3.1-8B-Instruct", "arc", stages="latro", sft_coef=1.0)
