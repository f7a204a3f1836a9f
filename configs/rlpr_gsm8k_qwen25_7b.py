"""RLPR (arXiv 2506.18254) with its published hyper-parameters on GSM8K (SPEC 3; see
configs/base.py:family_recipe for the values and which are ours). Model: the paper's Qwen2.5-7B
base; any Llama / Mistral / Qwen2 / Phi-3 checkpoint by path.

    python -m latro_jax.main --config=configs/rlpr_gsm8k_qwen25_7b.py --workdir=... \\
        --config.model.path=/data/Qwen2.5-7B
"""

from configs.base import family_recipe


def get_config():
    return family_recipe("rlpr", "Qwen/Qwen2.5-7B")
