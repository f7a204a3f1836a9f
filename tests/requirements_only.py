"""Run Python as if only requirements.txt were installed: every top-level module of an installed
distribution outside requirements.txt's dependency closure (torch, jinja2 through torch, pytest,
...) is made unimportable. What the runtime path imports that the README's install does not
bring then fails here as it would on a user's machine.

    python tests/requirements_only.py -c "from latro_jax import run; ..."
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys

from packaging.requirements import Requirement

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: str = REQUIREMENTS) -> set[str]:
    """Normalised names of the distributions requirements.txt installs: its lines and, recursively,
    their unconditional dependencies (no extras) as installed here."""
    with open(requirements) as f:
        stack = [_norm(Requirement(line).name) for line in (l.split("#")[0].strip() for l in f) if line]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(_norm(req.name))
    return seen


def outside_modules(requirements: str = REQUIREMENTS) -> list[str]:
    """Top-level modules that only distributions outside the closure provide."""
    inside = closure(requirements)
    return sorted(module for module, dists in metadata.packages_distributions().items()
                  if not any(_norm(d) in inside for d in dists))


def block_outside(requirements: str = REQUIREMENTS) -> list[str]:
    """Make those modules unimportable (sys.modules[name] = None: `import` raises ImportError and
    importlib.util.find_spec returns None, as for a package that is not installed)."""
    blocked = [m for m in outside_modules(requirements) if m not in sys.modules]
    for module in blocked:
        sys.modules[module] = None
    return blocked


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "-c":
        sys.exit(__doc__)
    block_outside()
    sys.path.insert(0, os.path.dirname(REQUIREMENTS))
    exec(compile(sys.argv[2], "<requirements-only>", "exec"), {"__name__": "__main__"})
