"""MRT-RL on DeepSeek-R1-Distill-Qwen-1.5B with DeepScaleR problems, evaluated on
MATH-500 (SPEC 2.6; see configs/base.py:r1_mrt_recipe for the values and which were not
published).

    python -m latro_jax.main --config=configs/mrt_r1distill_qwen15b.py --workdir=... \\
        --config.model.path=/data/DeepSeek-R1-Distill-Qwen-1.5B \\
        --config.task.source=/data/deepscaler --config.task.eval_source=/data/math500
"""

from configs.base import r1_mrt_recipe


def get_config():
    return r1_mrt_recipe("mrt")
