"""The package's layering, read from its source: no import circle among latro_jax's modules (the
imports a module runs when it loads, TYPE_CHECKING blocks left out), and the sampler called from
the one completion rollout."""

import ast
import os
import re

import latro_jax

PACKAGE = os.path.dirname(latro_jax.__file__)


def _modules() -> dict[str, str]:
    """module name -> source path, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def _load_time_imports(path: str, modules: dict[str, str], name: str) -> set[str]:
    """The package modules `path` imports when it loads: module-level statements (inside try/if
    too, but not `if TYPE_CHECKING:` or `if __name__ == "__main__":`), not imports inside
    functions. `from latro_jax import x` names module x where x is one."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" in test or "__main__" in test:
                    continue
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        found.add(f"{base}.{a.name}")
                    elif base in modules:
                        found.add(base)
    visit(ast.parse(open(path).read()).body)
    return found - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph as a path a -> ... -> a, or None."""
    state, stack = {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _load_time_imports(path, modules, name) for name, path in modules.items()}
    # a package's __init__ re-exports its modules: importing the package is importing them, but
    # a module inside it importing a sibling through the package is not a circle of layers
    return {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}


def test_no_import_circle_among_the_package_modules():
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the layers the pipeline relies on: the log-prob math and the sampler below scoring and rollout
    assert "latro_jax.scoring" not in graph["latro_jax.sampling"]
    assert "latro_jax.rollout" not in graph["latro_jax.sampling"] | graph["latro_jax.scoring"]
    assert graph["latro_jax.logprobs"] <= {"latro_jax.models"}


def test_the_cycle_finder_finds_a_planted_circle():
    graph = _graph()
    graph["latro_jax.logprobs"] = graph["latro_jax.logprobs"] | {"latro_jax.rollout"}
    assert _cycle(graph) is not None


def test_the_sampler_is_called_from_the_completion_rollout_only():
    calls = {name for name, path in _modules().items()
             if re.search(r"\bsampling\.generate\(|(?<![\w.])generate\(", open(path).read())
             and name != "latro_jax.sampling"}
    assert calls == {"latro_jax.rollout"}, calls
