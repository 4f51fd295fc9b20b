"""The package's layout stays true: stages import one way, no module imports itself back, no module over 400 lines.

Imports are read from the source (every `import` and `from ... import`, those inside functions included: a lazy
import is a dependency all the same).
"""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "finetune"
#: Stages from the bottom up: a stage may import the stages before it and itself, never one after it.
STAGES = ["data", "models", "batching", "recipe", "evaluation", "export", "training"]
#: Modules below every stage (import nothing of finetune) and the entry points above them all.
SHARED = {"finetune.errors", "finetune.console"}
ENTRY = {"finetune", "finetune.__main__", "finetune.cli"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """The finetune modules `name` imports (a `from X import y` counts as X.y where that is a module, else X)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "finetune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "finetune":
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return found - {name}


def stage(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module in ENTRY:
        return "entry"
    return module.split(".")[1]


def rank(module: str) -> int:
    s = stage(module)
    return -1 if s == "shared" else len(STAGES) if s == "entry" else STAGES.index(s)


def test_every_module_belongs_to_a_stage():
    assert {stage(m) for m in modules()} == set(STAGES) | {"shared", "entry"}


def test_stages_import_one_way():
    wrong = []
    for name, path in modules().items():
        for target in imports(name, path):
            if rank(target) > rank(name) or (stage(name) == "shared" and target != name):
                wrong.append(f"{name} ({stage(name)}) imports {target} ({stage(target)})")
    assert not wrong, "imports against the stage order " + " < ".join(STAGES) + ":\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: imports(name, path) for name, path in modules().items()}
    # A package's __init__ re-exports its modules; an edge into the package itself is an edge into those.
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own modules (its __init__) is no cycle
                continue
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # An edge from a module to its own package (`from . import x`) is the package's __init__ running first.
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_over_400_lines(name):
    lines = modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by concern"


@pytest.mark.parametrize("stage_name", STAGES)
def test_each_stage_says_what_it_does_and_exports_its_names(stage_name):
    init = PACKAGE / stage_name / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"finetune/{stage_name}/__init__.py: no docstring"
    exported = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in n.targets))
    module = __import__(f"finetune.{stage_name}", fromlist=["*"])
    assert exported and all(hasattr(module, n) for n in exported)
    # A public name must not shadow a module of the stage (`finetune.export.merge` the function, not a module).
    assert not {n for n in exported if (PACKAGE / stage_name / f"{n}.py").exists()}


def test_the_recipe_names_exactly_the_metrics_evaluation_implements():
    from finetune.evaluation.metrics import METRICS
    from finetune.recipe import METRIC_NAMES

    assert tuple(METRICS) == METRIC_NAMES
