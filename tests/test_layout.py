"""The package's layout stays true: stages import one way, no module imports itself back, no module over 400 lines.
The same for scripts/: no file over 400 lines, no import circle among its modules, which may import finetune but
finetune never them; and gpu_check's modules import only the standard library when loaded (it runs before the
wheels are in).

Imports are read from the source (every `import` and `from ... import`, those inside functions included: a lazy
import is a dependency all the same).
"""

import ast
import sys
from collections.abc import Collection
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "finetune"
#: Run as `python scripts/NAME.py`: scripts/ itself is on the path, so a script imports another as `import NAME`.
SCRIPTS = ROOT / "scripts"
#: Stages from the bottom up: a stage may import the stages before it and itself, never one after it.
STAGES = ["data", "models", "batching", "recipe", "evaluation", "export", "training"]
#: Modules below every stage (import nothing of finetune) and the entry points above them all.
SHARED = {"finetune.errors", "finetune.console"}
ENTRY = {"finetune", "finetune.__main__", "finetune.cli"}
MAX_LINES = 400


def module_files(folder: Path, root: Path) -> dict[str, Path]:
    """Every module under `folder`, by the dotted name it is imported as from `root`."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def modules() -> dict[str, Path]:
    return module_files(PACKAGE, ROOT)


def scripts() -> dict[str, Path]:
    return module_files(SCRIPTS, SCRIPTS)


def imports(name: str, path: Path, known: Collection[str] | None = None) -> set[str]:
    """The modules among `known` (default: finetune's) that `name` imports, and any others under the same top-level
    names (a `from X import y` counts as X.y where that is a module, else X)."""
    known = modules() if known is None else known
    roots = {k.split(".")[0] for k in known}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in roots}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in roots:
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle of `graph` (module -> the modules it imports), each as the path that closes it."""
    found, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own modules (its __init__) is no cycle
                continue
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # An edge from a module to its own package (`from . import x`) is the package's __init__ running first.
    return [c for c in found if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]


def lines(path: Path) -> int:
    return path.read_text(encoding="utf-8", errors="replace").count("\n")


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
    found = cycles({name: imports(name, path) for name, path in modules().items()})
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_over_400_lines(name):
    count = lines(modules()[name])
    assert count <= MAX_LINES, f"{name}: {count} lines; split it by concern"


def test_scripts_import_one_another_without_a_circle():
    known = scripts()
    found = cycles({name: imports(name, path, known) for name, path in known.items()})
    assert not found, "import circles among scripts/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_finetune_never_imports_a_script():
    """Scripts use the package; the package must work installed, where scripts/ is not there to import."""
    names = {name.split(".")[0] for name in scripts()} | {"scripts"}
    wrong = [f"{name} imports {target}" for name, path in modules().items() for target in imports(name, path, names)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in SCRIPTS.rglob("*")
                                        if p.is_file() and "__pycache__" not in p.parts))
def test_no_script_over_400_lines(path):
    count = lines(ROOT / path)
    assert count <= MAX_LINES, f"{path}: {count} lines; split it by concern"


def test_gpu_check_loads_with_the_standard_library_alone():
    """scripts/gpu_check.py runs before the GPU machine's wheels are installed: what it and the scripts it imports
    import when loaded (module level; a function may import more, in a step that has the wheels) is stdlib."""
    known, todo, seen, wrong = scripts(), ["gpu_check"], {"gpu_check"}, []
    while todo:
        name = todo.pop()
        for node in ast.parse(known[name].read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            for top in {t.split(".")[0] for t in targets} - {"__future__"}:
                if top in known and top not in seen:
                    seen.add(top)
                    todo.append(top)
                elif top not in known and top not in sys.stdlib_module_names:
                    wrong.append(f"scripts/{name}.py imports {top}")
    assert not wrong, "\n".join(wrong)


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
