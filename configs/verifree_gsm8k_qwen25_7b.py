"""VeriFree (arXiv 2505.21493) with its published hyper-parameters on GSM8K (SPEC 3; see
configs/base.py:family_recipe for the values and which are ours). Model: Qwen2.5-7B base (the
paper's Qwen3 base models are not a family latro_jax loads); any Llama / Mistral / Qwen2 / Phi-3
checkpoint by path.

    python -m latro_jax.main --config=configs/verifree_gsm8k_qwen25_7b.py --workdir=... \\
        --config.model.path=/data/Qwen2.5-7B
"""

from configs.base import family_recipe


def get_config():
    return family_recipe("verifree", "Qwen/Qwen2.5-7B")
