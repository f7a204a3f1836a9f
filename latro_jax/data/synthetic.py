"""A synthetic multi-step arithmetic reasoning task, generated in code from a seed.

    Ann has 3 apples. Ann gets 4 more. Ann gives 2 away. How many apples?
    rationale, worked step by step: 3+4=7. 7-2=5. The answer is 5.
    rationale, terse:               Total: 5. The answer is 5.

Each problem chains `num_steps` additions / subtractions (results never negative), so the
answer needs every intermediate result. A share `stepwise_share` of the gold rationales writes
every intermediate result; the others state only the total, which a small model must then
compute in one go and gets wrong far more often. One seeded stream of distinct
problems is cut into test, validation and train (in that order), so the splits never share a
question; the rationale styles come from a second stream, so they never change the problems.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from latro_jax.data.tasks import answer_text

NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal")
ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs")
SPLITS = ("test", "validation", "train")


def make_problem(rng: random.Random, num_steps: int, max_operand: int,
                 stepwise: bool = True) -> dict[str, Any]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, max_operand)
    sentences, steps = [f"{name} has {value} {item}."], []
    for _ in range(num_steps):
        n = rng.randint(1, max_operand)
        if n <= value and rng.random() < 0.5:
            sentences.append(f"{name} gives {n} away.")
            steps.append(f"{value}-{n}={value - n}.")
            value -= n
        else:
            sentences.append(f"{name} gets {n} more.")
            steps.append(f"{value}+{n}={value + n}.")
            value += n
    sentences.append(f"How many {item}?")
    work = " ".join(steps) if stepwise else f"Total: {value}."
    return {"question": " ".join(sentences), "answer": str(value),
            "rationale": work + " " + answer_text(str(value))}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The knobs of `generate_splits` (config section task.synthetic)."""

    seed: int = 0
    sizes: dict = dataclasses.field(default_factory=dict)  # split name -> number of problems
    num_steps: int = 2
    max_operand: int = 9
    stepwise_share: float = 1.0


def generate_splits(seed: int, sizes: dict[str, int], num_steps: int = 2, max_operand: int = 9,
                    stepwise_share: float = 1.0) -> dict[str, list[dict[str, Any]]]:
    """Disjoint splits of distinct problems, deterministic in (seed, sizes, knobs)."""
    if num_steps < 1 or max_operand < 1:
        raise ValueError(f"synthetic task: num_steps={num_steps} and max_operand={max_operand} must be >= 1")
    if not 0.0 <= stepwise_share <= 1.0:
        raise ValueError(f"synthetic task: stepwise_share={stepwise_share} must lie in [0, 1]")
    rng, seen, out = random.Random(seed), set(), {}
    style = random.Random(f"rationale-style-{seed}")
    wanted = sum(sizes.get(s, 0) for s in SPLITS)
    attempts = 0
    for split in SPLITS:
        rows = out.setdefault(split, [])
        while len(rows) < sizes.get(split, 0):
            attempts += 1
            if attempts > 50 * wanted + 1000:
                raise ValueError(f"synthetic task: cannot draw {wanted} distinct problems with "
                                 f"num_steps={num_steps}, max_operand={max_operand}; raise them.")
            stepwise = style.random() < stepwise_share
            problem = make_problem(rng, num_steps, max_operand, stepwise)
            if problem["question"] not in seen:
                seen.add(problem["question"])
                rows.append({"id": f"{split}-{len(rows)}", **problem})
    return out
