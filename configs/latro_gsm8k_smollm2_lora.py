"""LaTRO on GSM8K with SmolLM2-135M-Instruct and LoRA adapters: configs/latro_gsm8k_smollm2.py
with the base weights frozen and adapters of rank 16 (alpha 32) on every projection (q, k, v,
o, gate, up, down) trained instead. The reference of the KL term is the base itself (no second
copy of the weights) and the optimizer holds moments for the adapters alone.

    (make /tmp/smollm2 as configs/latro_gsm8k_smollm2.py says, then)
    python -m latro_jax.main --config=configs/latro_gsm8k_smollm2_lora.py --workdir=/tmp/latro_smollm2_lora

Writes <workdir>/hf (the adapters merged into the weights, loadable by transformers alone) and
<workdir>/peft (the adapters as a PEFT folder: PeftModel.from_pretrained(base, folder)). Learning
rate 1e-4 (LoRA's usual range; the full fine-tune's 1e-6 barely moves B from zero in 8 updates).
Measured figures: docs/training.md, "LoRA".
"""

from configs.base import optim
from configs.latro_gsm8k_smollm2 import get_config as full_fine_tuning


def get_config():
    c = full_fine_tuning()
    c.model.lora.update(rank=16, alpha=32.0)
    c.latro.optim = optim(1e-4, "constant")
    c.export.peft = True
    return c
