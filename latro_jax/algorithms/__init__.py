"""Training algorithms behind one contract (core.py): rollout -> scored batch -> update.

ALGORITHMS is the registry run.py looks stages up in: adding an algorithm is a module holding
its class and one entry here.
"""

from latro_jax.algorithms.core import Algorithm, Context, Learner, Policies, ScoredBatch
from latro_jax.algorithms.grpo_variants import Cispo, Dapo, Gspo, Rloo
from latro_jax.algorithms.latro import Latro, LatroConfig
from latro_jax.algorithms.likelihood import Jepo, Verifree
from latro_jax.algorithms.mrt import Grpo, GrpoConfig, Mrt, MrtConfig
from latro_jax.algorithms.mrt_star import MrtStar, MrtStarConfig
from latro_jax.algorithms.rlpr import Rlpr
from latro_jax.algorithms.sft import Sft, SftConfig

ALGORITHMS: dict[str, type] = {cls.name: cls for cls in (Sft, Latro, Verifree, Jepo, Grpo, Dapo, Gspo, Cispo, Rloo,
                                                         Rlpr, Mrt, MrtStar)}


def get(name: str) -> type:
    """The algorithm class registered as `name`."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "Context", "Grpo", "GrpoConfig", "Latro", "LatroConfig", "Learner",
           "Mrt", "MrtConfig", "MrtStar", "MrtStarConfig", "Policies", "ScoredBatch", "Sft", "SftConfig", "get"]
