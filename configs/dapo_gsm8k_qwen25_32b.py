"""DAPO (arXiv 2503.14476) with its published hyper-parameters on GSM8K (SPEC 3; see
configs/base.py:family_recipe for the values and which are ours). Model: the paper's model
(Qwen2.5-32B base); any Llama / Mistral / Qwen2 / Phi-3 checkpoint by path.

    python -m latro_jax.main --config=configs/dapo_gsm8k_qwen25_32b.py --workdir=... \\
        --config.model.path=/data/Qwen2.5-32B
"""

from configs.base import family_recipe


def get_config():
    return family_recipe("dapo", "Qwen/Qwen2.5-32B")
