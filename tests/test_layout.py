"""The package layout: who may import whom (DESIGN.md section 5), read from the source's AST."""

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "condlora"
# Each package may import itself and the packages listed; `core` is the ground floor.
ALLOWED = {
    "core": set(),
    "lora": {"core"},
    "nets": {"core"},
    "diffusion": {"core"},
    "data": {"core"},
    "metrics": {"core"},
    "train": {"core"},
    "conditioning": {"core", "lora", "nets", "diffusion", "data", "metrics", "train"},
    "synthesis": {"core", "lora", "nets", "diffusion", "data", "metrics", "train", "conditioning"},
    "evaluation": {"core", "lora", "nets", "diffusion", "data", "metrics", "train", "conditioning"},
    # the web page sits on both halves (and the diagnostics); only the roof imports it
    "serve": {
        "core",
        "lora",
        "nets",
        "diffusion",
        "data",
        "metrics",
        "train",
        "conditioning",
        "synthesis",
        "evaluation",
    },
}


def modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in SRC.rglob("*.py")
    )


def imports(module: str) -> set[str]:
    """Every condlora module that `module` imports (at any depth of its code)."""
    path = SRC.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    known, found = set(modules()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("condlora"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs  # `from pkg import submodule` imports the submodule ...
            if len(subs) < len(node.names):  # ... and `from pkg import name` the package
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("condlora"))
    return found & known


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (SRC / parts[-1]).is_dir() else parts[-1]


@pytest.mark.parametrize("module", modules())
def test_every_module_imports(module):
    importlib.import_module(module)


def test_imports_only_point_down():
    wrong = []
    for module in modules():
        own = package(module)
        if own not in ALLOWED:  # cli.py and the package root: the roof may import anything
            continue
        for target in imports(module):
            other = package(target)
            if other != own and other not in ALLOWED[own] and other in ALLOWED:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = {m: imports(m) for m in modules()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_ci_runs_exactly_the_readme_test_command():
    readme = (SRC.parents[1] / "README.md").read_text()
    ci = (SRC.parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:]]
    assert ci in blocks, f"{ci!r} is not one of the README's commands"
    assert "condlora quickstart" in blocks[0]  # the first command runs the main job
