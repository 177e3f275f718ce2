"""The package layout: the layers contract (import-linter, pyproject.toml), every module
imports, no import cycles, and CI runs the README's test command."""

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "condlora"


def modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in SRC.rglob("*.py")
    )


def imports(module: str) -> set[str]:
    """Every condlora module that `module` imports (at any depth of its code), relative
    imports resolved against its package."""
    path = SRC.parent / Path(*module.split("."))
    is_package = path.is_dir()
    path = path / "__init__.py" if is_package else path.with_suffix(".py")
    here = module.split(".") if is_package else module.split(".")[:-1]
    known, found = set(modules()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            if not name.startswith("condlora"):
                continue
            subs = {f"{name}.{a.name}" for a in node.names} & known
            found |= subs  # `from pkg import submodule` imports the submodule ...
            if len(subs) < len(node.names):  # ... and `from pkg import name` the package
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("condlora"))
    return found & known


@pytest.mark.parametrize("module", modules())
def test_every_module_imports(module):
    importlib.import_module(module)


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    """import-linter's check of pyproject.toml's layers contract on the package in `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [shutil.which("lint-imports") or "lint-imports", "--no-logo", "--no-cache"]
    command.append(str(REPO / "pyproject.toml"))
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=src)


def test_the_layers_contract_holds_and_names_every_package():
    result = lint_imports(SRC.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    top, apps = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    assert top["layers"] and apps["containers"] == ["condlora.apps"]

    def named(contract: dict, prefix: str) -> set[str]:
        return {prefix + p.strip() for layer in contract["layers"] for p in layer.split("|")}

    def children(folder: Path, prefix: str) -> set[str]:
        return {prefix + p.stem for p in folder.iterdir() if p.suffix == ".py" or p.is_dir()} - {
            prefix + "__init__",
            prefix + "__pycache__",
        }

    # every package and every top-level module has its place, in both contracts
    assert named(top, "") == children(SRC, "condlora.")
    assert named(apps, "condlora.apps.") == children(SRC / "apps", "condlora.apps.")


def test_every_package_states_what_it_holds():
    for init in SRC.rglob("__init__.py"):
        if "__pycache__" not in init.parts:
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


@pytest.mark.parametrize(
    "where, planted",
    [
        ("core/labels.py", "from ..apps.serve import server as _planted  # noqa"),  # relative, up
        ("apps/quickstart.py", "from .serve import server as _planted  # noqa"),  # within apps
        ("lora/io.py", "from condlora.nets import unet as _planted  # noqa"),  # sideways
        ("train/config.py", "import condlora.apps.quickstart as _planted  # noqa"),
    ],
)
def test_a_planted_upward_import_breaks_the_contract(tmp_path, where, planted):
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy / "condlora", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "condlora" / where
    target.write_text(target.read_text() + "\n" + planted + "\n")
    result = lint_imports(copy)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def test_no_module_imports_a_private_name_from_another():
    private = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("condlora"):
                names = [a.name for a in node.names if a.name.startswith("_")]
                private += [f"{path.relative_to(SRC)}: {node.module}.{n}" for n in names]
    assert not private, private


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


@pytest.mark.slow
def test_markers_follow_what_a_test_does():
    def collected(marker: str, *paths: str) -> set[str]:  # one pytest start: about 10 s
        command = ["-m", "pytest", "-q", "--co", "-p", "no:randomly", "-m", marker, *paths]
        out = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, cwd=REPO
        ).stdout
        return {line.split("::")[1].split("[")[0] for line in out.splitlines() if "::" in line}

    page = "test_the_page_writes_a_lora_for_a_held_out_subject_and_refuses_a_bad_upload"
    assert collected("browser", "tests/test_serve.py") == {page}
    spawns = collected("subprocess", "tests/test_serve.py", "tests/test_train.py")
    assert page in spawns  # its server fixture spawns
    assert "test_two_processes_split_the_global_batch" in spawns
    assert "test_ema_matches_plain_formula" not in spawns  # in-process: no marker
