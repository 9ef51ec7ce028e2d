"""The package's shape holds: layers import only downward, no import circle (lazy imports included), no private
name used across modules, thin experiments, registries that refuse duplicates and name their choices, and user
errors that are the project's own classes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from codi_lens.core.errors import ChoiceError, CodiLensError
from codi_lens.core.registry import Registry
from codi_lens.run.cli import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "codi_lens"

#: Layer of each part of the package, lowest first; a module may import its own layer and those below.
LAYERS = {
    "core": 0,
    "loading": 1,
    "data": 2,
    "run": 3,
    "metrics": 4,
    "stats": 4,
    "interventions": 5,
    **dict.fromkeys(
        ["patching", "saes", "accuracy", "importance", "attention", "lens", "probes", "early_answers",
         "value_patching", "activations", "features", "pathways", "reading", "training", "logit_attribution",
         "feature_screen", "feature_report"],
        6,
    ),
    "plotting": 7,
    "reports": 8,
    "__init__": 9,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def imports_of(path: Path) -> set[str]:
    """Every codi_lens module a file imports, at any depth (inside functions and TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("codi_lens"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("codi_lens")}
    return found


def package_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_of_the_package_has_a_layer():
    unplaced = {m for m in package_graph() if m.count(".") >= 1 and m.split(".")[1] not in LAYERS}
    assert not unplaced


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in package_graph().items()
        for target in targets
        if target != module and layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_core_imports_nothing_of_codi_lens_outside_itself():
    outside = {(m, t) for m, ts in package_graph().items() if m.startswith("codi_lens.core") for t in ts}
    assert all(t.startswith("codi_lens.core") for _, t in outside), sorted(outside)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import circles."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_anywhere():
    # A package's __init__ re-exports its modules; a module importing its own package's __init__ is a circle.
    graph = {m: {t for t in ts if t != m} for m, ts in package_graph().items()}
    assert not _cycles(graph)


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_used_across_modules():
    """ruff's SLF rule over the package, with no exemption for it anywhere in the package."""
    assert not [p for p in PACKAGE.rglob("*.py") if "noqa: SLF" in p.read_text()]
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "SLF", "--no-cache", str(PACKAGE)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]


EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiments_are_thin(path):
    """An experiment parses flags, calls the library and reports: no experiment imports another, none is
    much past 150 lines, no main() past 60."""
    tree = ast.parse(path.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.startswith("experiments")}
    assert len(path.read_text().splitlines()) <= 165
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert all(n.end_lineno - n.lineno + 1 <= 60 for n in mains)


def test_a_registry_refuses_duplicates_and_names_its_choices():
    registry: Registry[int] = Registry("colour")
    registry.add("red", 1)
    registry.add("blue", 2)
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        registry.add("red", 3)
    with pytest.raises(ChoiceError, match="unknown colour 'green'; choose from red, blue"):
        registry["green"]
    assert registry.parse_list("blue, red", "--colours") == ["blue", "red"]
    with pytest.raises(ChoiceError, match="--colours: unknown colour 'pink'; choose from red, blue"):
        registry.parse_list("red,pink", "--colours")
    with pytest.raises(ChoiceError, match="--colours: unknown colour .empty."):
        registry.parse_list(" , ", "--colours")


def test_user_errors_are_only_the_projects_own():
    assert (CodiLensError,) == USER_ERRORS
    assert not issubclass(KeyError, CodiLensError) and not issubclass(FileNotFoundError, CodiLensError)
